"""Instances as EC2 launches, describes and changes them (EC2.md §2-§3).

Every rule is the logic layer's: RunInstances is ``servers.create``, Start/Stop/Reboot/
TerminateInstances are ``actions``; this module maps parameters in and the VM out, and adds
EC2's own rules on top -- the no-op transitions of §3, all-or-nothing lists (one
transaction: any refusal rolls back the others), ClientToken idempotency and tags.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import uuid
from typing import Any

from app.api.ec2.keys import group_ids
from app.api.ec2.protocol import Ec2Error, Params, invalid, missing
from app.api.ec2.router import Ctx, action, well_formed_ids
from app.logic import actions, addresses, ec2, ec2_tags, instances, secgroups, servers
from app.logic import errors as e
from app.logic.addresses import Address
from app.logic.operstate import Operstate
from app.models import Server


def instance_ids(ctx: Ctx, *, required: bool = True) -> list[str]:
    ids = ctx.params.many("InstanceId")
    if required and not ids:
        raise missing("InstanceId.1")
    return well_formed_ids(ids, "i", "InvalidInstanceID.Malformed")


async def find(ctx: Ctx, ids: list[str]) -> list[Server]:
    """The instances named, in the order named; all of them exist in this project, or NotFound."""
    return await instances.find(ctx.session, ctx.project_id, ids)


def state_item(name: str) -> dict[str, Any]:
    return {"code": ec2.CODES[name], "name": name}


async def _items(ctx: Ctx, rows: list[instances.Row]) -> list[dict[str, Any]]:
    """Listed instances as instancesSet items (what a row does not carry is read, for all at once)."""
    tags = await ec2_tags.tags_of(ctx.session, [r.server.ec2_id for r in rows if r.tags is None])
    groups = await secgroups.groups_of(ctx.session, [r.server.id for r in rows if r.groups is None])
    read = await addresses.addresses_of(ctx.session, [r.server.id for r in rows if r.addresses is None])
    out = []
    for index, row in enumerate(rows):
        s, state = row.server, row.state
        its_tags = row.tags if row.tags is not None else tags[s.ec2_id]
        its_groups = row.groups if row.groups is not None else groups[s.id]
        its_addresses = row.addresses if row.addresses is not None else read[s.id]
        reason = (
            {"code": "Client.UserInitiatedShutdown", "message": "Client.UserInitiatedShutdown: User initiated shutdown"}
            if state in ("stopped", "stopping", "terminated", "shutting-down")
            else None
        )
        out.append(
            {
                "instanceId": s.ec2_id,
                "imageId": row.image,
                "instanceState": state_item(state),
                "privateDnsName": "",
                "dnsName": "",
                "reason": "",
                "keyName": s.key_name,
                "amiLaunchIndex": index,
                "productCodes": [],
                "instanceType": row.flavor,
                "launchTime": s.created_at,
                "placement": {"availabilityZone": s.zone or "", "tenancy": "default"},
                "monitoring": {"state": "disabled"},
                "groupSet": [{"groupId": gid, "groupName": name} for gid, name in its_groups],
                "stateReason": reason,
                "architecture": "x86_64",
                "rootDeviceType": "ebs",
                "rootDeviceName": "/dev/vda",
                "blockDeviceMapping": [],
                "virtualizationType": "hvm",
                "hypervisor": "kvm",
                "clientToken": s.client_token or "",
                "ebsOptimized": False,
                "tagSet": [{"key": k, "value": v} for k, v in [*its_tags, *ec2_tags.lease_tag(s)]] or None,
                **_nics(its_addresses, its_groups, s.created_at),
            }
        )
    return out


def _nics(addresses: list[Address], groups: list[tuple[str, str]], since: Any) -> dict[str, Any]:
    """The instance's private address, subnet and network interfaces (one per NIC)."""
    if not addresses:
        return {"privateIpAddress": None}
    first = addresses[0]
    return {
        "privateIpAddress": first.ip,
        "ipAddress": first.public_ip,
        "subnetId": first.subnet,
        "networkInterfaceSet": [
            {
                "networkInterfaceId": a.port,
                "subnetId": a.subnet,
                "description": a.network,
                "status": "in-use",
                "macAddress": a.mac,
                "privateIpAddress": a.ip,
                "sourceDestCheck": True,
                "groupSet": [{"groupId": gid, "groupName": name} for gid, name in groups],
                "attachment": {
                    "attachmentId": "eni-attach-" + a.port.removeprefix("eni-"),
                    "deviceIndex": index,
                    "status": "attached",
                    "attachTime": since,
                    "deleteOnTermination": True,
                },
                "privateIpAddressesSet": [{"privateIpAddress": a.ip, "primary": True}],
                "association": {"publicIp": a.public_ip, "ipOwnerId": "amazon"} if a.public_ip else None,
            }
            for index, a in enumerate(addresses)
        ],
    }


async def _reservations(ctx: Ctx, rows: list[instances.Row]) -> list[dict[str, Any]]:
    items = await _items(ctx, rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row, item in zip(rows, items, strict=True):
        groups.setdefault(row.server.reservation_id, []).append(item)
    owner = str(ctx.project_id)
    return [
        {"reservationId": rid, "ownerId": owner, "groupSet": [], "instancesSet": group} for rid, group in groups.items()
    ]


# -- RunInstances --------------------------------------------------------------------------------


def _launch(p: Params) -> instances.Launch:
    image = p.require("ImageId")
    if not ec2.well_formed(image, "ami"):
        raise Ec2Error("InvalidAMIID.Malformed", f'Invalid id: "{image}"')
    low = p.number("MinCount", low=1, high=servers.MAX_COUNT)
    high = p.number("MaxCount", low=1, high=servers.MAX_COUNT)
    if low is None:
        raise missing("MinCount")
    if high is None:
        raise missing("MaxCount")
    if low > high:
        raise invalid("MinCount", low, "MinCount must not exceed MaxCount.")
    user_data = p.get("UserData")
    if user_data:
        try:
            user_data = base64.b64decode(user_data, validate=True).decode("utf-8", errors="replace")
        except (binascii.Error, ValueError):
            raise invalid("UserData", "...", "UserData must be base64.") from None
    tags: list[tuple[str, str]] = []
    for spec in p.structs("TagSpecification"):
        kind = spec.get("ResourceType")
        if kind not in ("instance", None):
            continue  # volumes and the like: nothing of theirs to tag here
        for tag in spec.structs("Tag"):
            tags.append((tag.require("Key"), tag.get("Value") or ""))
    groups = group_ids(p.many("SecurityGroupId"))
    token = p.get("ClientToken")
    if token is not None and not 0 < len(token) <= 64:
        raise invalid("ClientToken", token, "A client token has 1 to 64 characters.")
    subnet = p.get("SubnetId")
    if subnet is not None:
        well_formed_ids([subnet], "subnet", "InvalidSubnetID.Malformed")
    launch = instances.Launch(
        image=image,
        flavor=p.get("InstanceType") or "small",
        low=low,
        high=high,
        key_name=p.get("KeyName"),
        user_data=user_data,
        zone=p.sub("Placement").get("AvailabilityZone"),
        tags=tags,
        group_ids=groups,
        group_names=p.many("SecurityGroup"),
        protect=p.flag("DisableApiTermination"),
        client_token=token,
        subnet_id=subnet,
        private_ip=p.get("PrivateIpAddress"),
    )
    # A token reused with other parameters is a conflict: the parameters' digest is its proof.
    digest = dataclasses.asdict(launch) | {"client_token": None}
    return dataclasses.replace(
        launch, request_hash=hashlib.sha256(json.dumps(digest, sort_keys=True).encode()).hexdigest()
    )


@action("RunInstances")
async def run_instances(ctx: Ctx) -> dict[str, Any]:
    rows = await instances.launch(
        ctx.session, ctx.outbox, actor=ctx.actor, spec=_launch(ctx.params), claim_token=not ctx.dry_run
    )
    (group,) = await _reservations(ctx, rows)
    return group


# -- DescribeInstances -------------------------------------------------------------------------


def page_size(p: Params) -> int | None:
    return p.number("MaxResults", low=5, high=1000)


def page_token(ctx: Ctx, kind: str) -> str | None:
    """What ``NextToken`` carries (tokens are encrypted and name their list: opaque, tamper-proof)."""
    token = ctx.params.get("NextToken")
    if not token:
        return None
    try:
        found, value = ctx.state.cipher.decrypt(token.encode()).decode().split(":", 1)
        if found != kind:
            raise ValueError(kind)
        return value
    except Exception:  # a forged or foreign token, whatever its shape
        raise invalid("NextToken", token[:32], "The pagination token is not valid.") from None


def page_token_after(ctx: Ctx, kind: str, value: str) -> str:
    return ctx.state.cipher.encrypt(f"{kind}:{value}".encode()).decode()


def listing(ctx: Ctx) -> instances.Listing:
    """``InstanceId.N`` (each must exist) or a page (``MaxResults``, ``NextToken``), never both;
    and the filters."""
    ids = instance_ids(ctx, required=False)
    size = page_size(ctx.params)
    if ids and size is not None:
        raise Ec2Error(
            "InvalidParameterCombination", "The parameter instancesSet cannot be used with the parameter maxResults"
        )
    after = page_token(ctx, "instances")
    return instances.Listing(
        ids=ids, filters=ctx.params.filters(), after=uuid.UUID(after) if after else None, size=size
    )


def next_token(ctx: Ctx, more: uuid.UUID | None) -> str | None:
    return None if more is None else page_token_after(ctx, "instances", str(more))


@action("DescribeInstances")
async def describe_instances(ctx: Ctx) -> dict[str, Any]:
    rows, more = await instances.describe(ctx.session, project_id=ctx.project_id, listing=listing(ctx))
    return {"reservationSet": await _reservations(ctx, rows), "nextToken": next_token(ctx, more)}


# -- state changes -----------------------------------------------------------------------------

_VERB = {"start": "started", "stop": "stopped", "reboot": "rebooted", "terminate": "terminated"}


async def _change(ctx: Ctx, verb: str) -> list[dict[str, Any]]:
    async with instances.locked_for_change(ctx.session, ctx.project_id, instance_ids(ctx)) as found:
        targets = [server for server, _ in found]
        before = {server.id: state for server, state in found}
        # Act in id order (the lock order), answer in the order asked; one refusal rolls back all.
        for server in sorted(targets, key=lambda s: s.id):
            await _act(ctx, verb, server)
    # Each VM as this transaction left it (an action changed the same row object, under its lock).
    return [
        {
            "instanceId": s.ec2_id,
            "previousState": state_item(before[s.id]),
            "currentState": state_item(ec2.state_of(s.operstate, s.task)),
        }
        for s in targets
    ]


async def _act(ctx: Ctx, verb: str, server: Server) -> None:
    """The operstate action ``verb`` means for one VM (none: it is already there), refusals
    translated to EC2's."""
    operstate = Operstate(server.operstate)
    try:
        what = ec2.verb_action(verb, operstate, server.task)
        if what is not None:
            await actions.run(what, ctx.session, ctx.outbox, actor=ctx.actor, server_id=server.id)
    except (e.TaskPending, e.InvalidState, e.HostDown):
        if verb == "stop" and operstate in (Operstate.HOLD, Operstate.BUILD):
            reason = "cannot be stopped as it has never reached the 'running' state"
        else:
            reason = f"is not in a state from which it can be {_VERB[verb]}"
        raise Ec2Error("IncorrectInstanceState", f"The instance '{server.ec2_id}' {reason}") from None
    except e.Protected:
        attribute = "disableApiTermination" if verb == "terminate" else "disableApiStop"
        raise Ec2Error(
            "OperationNotPermitted",
            f"The instance '{server.ec2_id}' may not be {_VERB[verb]}. "
            f"Modify its '{attribute}' instance attribute and try again.",
        ) from None


@action("StartInstances")
async def start_instances(ctx: Ctx) -> dict[str, Any]:
    return {"instancesSet": await _change(ctx, "start")}


@action("StopInstances")
async def stop_instances(ctx: Ctx) -> dict[str, Any]:
    return {"instancesSet": await _change(ctx, "stop")}


@action("TerminateInstances")
async def terminate_instances(ctx: Ctx) -> dict[str, Any]:
    return {"instancesSet": await _change(ctx, "terminate")}


@action("RebootInstances")
async def reboot_instances(ctx: Ctx) -> dict[str, Any]:
    await _change(ctx, "reboot")
    return {"return": True}
