"""Key pairs and security groups, per project (EC2.md §2, rows 12-15 and 19-22).

Key pairs are the REST key pairs (``app.logic.keypairs``): one per (project, name), each with
a ``key-`` id; a VM launched with ``KeyName`` gets its public key. Security groups are
``app.logic.secgroups``. Both answer with EC2's codes: ``InvalidKeyPair.*``,
``InvalidGroup.*``, ``InvalidPermission.*``, ``DependencyViolation``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from app.api.ec2.protocol import Ec2Error, Params, invalid, missing
from app.api.ec2.router import Ctx, action
from app.logic import ec2, firewall, keypairs, secgroups
from app.logic import errors as e
from app.models import KeyPair, SecurityGroup

# -- key pairs ------------------------------------------------------------------------------


def _key_name(p: Params) -> str:
    name = p.require("KeyName")
    if len(name) > 255 or not name.isprintable():
        raise invalid("KeyName", name[:64], "A key name has up to 255 printable characters.")
    return name


def _key_item(k: KeyPair, **extra: Any) -> dict[str, Any]:
    return {
        "keyPairId": k.ec2_id,
        "keyName": k.name,
        "keyFingerprint": k.fingerprint,
        "keyType": k.key_type,
        "createTime": k.created_at,
        **extra,
    }


async def _new_key(ctx: Ctx, name: str, public_key: str | None, key_type: str) -> keypairs.Created:
    try:
        return await keypairs.create(ctx.session, actor=ctx.actor, name=name, public_key=public_key, key_type=key_type)
    except e.AlreadyExists:
        raise Ec2Error("InvalidKeyPair.Duplicate", f"The keypair '{name}' already exists.") from None
    except e.BadRequest:
        raise Ec2Error("InvalidKeyPair.Format", "Key is not in valid OpenSSH public key format") from None


@action("CreateKeyPair")
async def create_key_pair(ctx: Ctx) -> dict[str, Any]:
    name = _key_name(ctx.params)
    key_type = ctx.params.get("KeyType") or "rsa"
    if key_type not in keypairs.KEY_TYPES:
        raise invalid("KeyType", key_type, "Expected rsa or ed25519.")
    if (ctx.params.get("KeyFormat") or "pem") != "pem":
        raise invalid("KeyFormat", ctx.params.get("KeyFormat"), "Only pem is offered.")
    created = await _new_key(ctx, name, None, key_type)
    k = created.keypair
    return {
        "keyName": k.name,
        "keyFingerprint": k.fingerprint,
        "keyMaterial": created.private_key,
        "keyPairId": k.ec2_id,
    }


@action("ImportKeyPair")
async def import_key_pair(ctx: Ctx) -> dict[str, Any]:
    name = _key_name(ctx.params)
    material = ctx.params.require("PublicKeyMaterial")
    try:  # botocore sends the OpenSSH line base64-encoded (a blob); older tools send it as is
        public = base64.b64decode(material, validate=True).decode()
    except (binascii.Error, ValueError):
        public = material
    k = (await _new_key(ctx, name, public, "ed25519")).keypair
    return {"keyName": k.name, "keyFingerprint": k.fingerprint, "keyPairId": k.ec2_id}


@action("DescribeKeyPairs")
async def describe_key_pairs(ctx: Ctx) -> dict[str, Any]:
    names, ids = ctx.params.many("KeyName"), ctx.params.many("KeyPairId")
    for i in ids:
        if not ec2.well_formed(i, "key"):
            raise Ec2Error("InvalidKeyPair.NotFound", f"The key pair '{i}' does not exist")
    keys = await keypairs.listed(
        ctx.session, project_id=ctx.project_id, names=names, ec2_ids=ids, filters=ctx.params.filters()
    )
    with_public = ctx.params.flag("IncludePublicKey")
    return {"keySet": [_key_item(k, publicKey=k.public_key if with_public else None) for k in keys]}


@action("DeleteKeyPair")
async def delete_key_pair(ctx: Ctx) -> dict[str, Any]:
    name, key_id = ctx.params.get("KeyName"), ctx.params.get("KeyPairId")
    if not name and not key_id:
        raise missing("KeyName")
    keypair = await keypairs.delete_if_there(ctx.session, project_id=ctx.project_id, name=name, ec2_id=key_id)
    return {"return": True, "keyPairId": keypair.ec2_id if keypair else None}


# -- security groups ------------------------------------------------------------------------


def group_ids(ids: list[str]) -> list[str]:
    """Security group ids as given, each of the ``sg-`` form (else ``InvalidGroupId.Malformed``)."""
    for i in ids:
        if not ec2.well_formed(i, "sg"):
            raise Ec2Error("InvalidGroupId.Malformed", f'Invalid id: "{i}" (expecting "sg-...")')
    return ids


async def find_groups(ctx: Ctx, ids: list[str], names: list[str]) -> list[SecurityGroup]:
    group_ids(ids)
    try:
        return await secgroups.find(ctx.session, ctx.project_id, ec2_ids=ids, names=names)
    except e.NotFound as exc:
        raise Ec2Error("InvalidGroup.NotFound", exc.message) from None


async def _one_group(ctx: Ctx) -> SecurityGroup:
    group_id, name = ctx.params.get("GroupId"), ctx.params.get("GroupName")
    if not group_id and not name:
        raise missing("GroupId")
    (group,) = await find_groups(ctx, [group_id] if group_id else [], [] if group_id else [name or ""])
    return group


@action("CreateSecurityGroup")
async def create_security_group(ctx: Ctx) -> dict[str, Any]:
    name, description = ctx.params.require("GroupName"), ctx.params.require("GroupDescription")
    try:
        group = await secgroups.create(ctx.session, project_id=ctx.project_id, name=name, description=description)
    except e.AlreadyExists:
        raise Ec2Error("InvalidGroup.Duplicate", f"The security group '{name}' already exists") from None
    except e.BadRequest as exc:
        raise invalid(str(exc.details.get("field")), name, exc.message) from None
    return {"return": True, "groupId": group.ec2_id}


def _rule_items(rules: list[Any], owner: str) -> list[dict[str, Any]]:
    """Rules as ipPermissions: one item per (protocol, ports), its CIDRs and groups inside."""
    merged: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in rules:
        item = merged.setdefault(
            (r.protocol, r.from_port, r.to_port),
            {
                "ipProtocol": r.protocol,
                "fromPort": None if r.protocol == "-1" else r.from_port,
                "toPort": None if r.protocol == "-1" else r.to_port,
                "groups": [],
                "ipRanges": [],
                "ipv6Ranges": [],
                "prefixListIds": [],
            },
        )
        if r.cidr and ":" in r.cidr:
            item["ipv6Ranges"].append({"cidrIpv6": r.cidr, "description": r.description or None})
        elif r.cidr:
            item["ipRanges"].append({"cidrIp": r.cidr, "description": r.description or None})
        else:
            item["groups"].append({"userId": owner, "groupId": r.source_group, "description": r.description or None})
    return list(merged.values())


@action("DescribeSecurityGroups")
async def describe_security_groups(ctx: Ctx) -> dict[str, Any]:
    ids, names = group_ids(ctx.params.many("GroupId")), ctx.params.many("GroupName")
    groups = await secgroups.listed(
        ctx.session, project_id=ctx.project_id, ec2_ids=ids, names=names, filters=ctx.params.filters()
    )
    rules = await secgroups.rules_of(ctx.session, [g.id for g in groups])
    owner = str(ctx.project_id)
    return {
        "securityGroupInfo": [
            {
                "ownerId": owner,
                "groupId": g.ec2_id,
                "groupName": g.name,
                "groupDescription": g.description,
                "ipPermissions": _rule_items(rules[g.id], owner),
                "ipPermissionsEgress": [],
            }
            for g in groups
        ]
    }


def _int(p: Params, name: str) -> int | None:
    return p.number(name, low=-1, high=65535)


def _permissions(ctx: Ctx) -> list[secgroups.Permission]:
    """``IpPermissions.N.*`` (every modern client), or the old flat ``IpProtocol``/``CidrIp`` form."""
    out: list[secgroups.Permission] = []
    try:
        for p in ctx.params.structs("IpPermissions"):
            proto, low, high = p.get("IpProtocol"), _int(p, "FromPort"), _int(p, "ToPort")
            sources = [(r.require("CidrIp"), "", r.get("Description") or "") for r in p.structs("IpRanges")]
            sources += [(r.require("CidrIpv6"), "", r.get("Description") or "") for r in p.structs("Ipv6Ranges")]
            sources += [("", r.get("GroupId") or "", r.get("Description") or "") for r in p.structs("Groups")]
            if not sources:
                raise missing("IpPermissions.N.IpRanges")
            out += [
                secgroups.permission(proto, low, high, cidr=c, source_group=g, description=d) for c, g, d in sources
            ]
        flat = ctx.params.get("IpProtocol")
        if flat is not None:
            out.append(
                secgroups.permission(
                    flat, _int(ctx.params, "FromPort"), _int(ctx.params, "ToPort"), cidr=ctx.params.get("CidrIp") or ""
                )
            )
    except e.BadRequest as exc:
        raise invalid(str(exc.details.get("field")), "", exc.message) from None
    if not out:
        raise missing("IpPermissions")
    for perm in out:
        if perm.source_group and not ec2.well_formed(perm.source_group, "sg"):
            raise Ec2Error("InvalidGroupId.Malformed", f'Invalid id: "{perm.source_group}"')
    return out


@action("AuthorizeSecurityGroupIngress")
async def authorize_ingress(ctx: Ctx) -> dict[str, Any]:
    group = await _one_group(ctx)
    perms = _permissions(ctx)
    try:
        rules = await secgroups.authorize(ctx.session, group, perms)
    except e.AlreadyExists as exc:
        raise Ec2Error("InvalidPermission.Duplicate", exc.message) from None
    except e.NotFound as exc:
        raise Ec2Error("InvalidGroup.NotFound", exc.message) from None
    await firewall.group_changed(ctx.session, ctx.outbox, group_id=group.id)
    return {
        "return": True,
        "securityGroupRuleSet": [
            {
                "securityGroupRuleId": r.ec2_id,
                "groupId": group.ec2_id,
                "groupOwnerId": str(ctx.project_id),
                "isEgress": False,
                "ipProtocol": r.protocol,
                "fromPort": r.from_port,
                "toPort": r.to_port,
                "cidrIpv4": r.cidr if r.cidr and ":" not in r.cidr else None,
                "cidrIpv6": r.cidr if ":" in r.cidr else None,
                "referencedGroupInfo": {"groupId": r.source_group} if r.source_group else None,
                "description": r.description or None,
            }
            for r in rules
        ],
    }


@action("RevokeSecurityGroupIngress")
async def revoke_ingress(ctx: Ctx) -> dict[str, Any]:
    group = await _one_group(ctx)
    try:
        await secgroups.revoke(ctx.session, group, _permissions(ctx))
    except e.NotFound as exc:
        raise Ec2Error("InvalidPermission.NotFound", exc.message) from None
    await firewall.group_changed(ctx.session, ctx.outbox, group_id=group.id)
    return {"return": True}


@action("DeleteSecurityGroup")
async def delete_security_group(ctx: Ctx) -> dict[str, Any]:
    group = await _one_group(ctx)
    try:
        await secgroups.delete(ctx.session, group)
    except e.InUse as exc:
        raise Ec2Error("DependencyViolation", exc.message) from None
    return {"return": True, "groupId": group.ec2_id}
