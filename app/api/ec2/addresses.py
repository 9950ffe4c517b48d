"""Elastic IPs: AllocateAddress, AssociateAddress, DisassociateAddress, ReleaseAddress,
DescribeAddresses -- REST's public IPs (``logic.public_ips``) in EC2's words (VPC-style: every
address has an allocation id; an association has an association id)."""

from __future__ import annotations

from typing import Any

from app.api.ec2.instances import find
from app.api.ec2.protocol import Ec2Error, missing
from app.api.ec2.router import Ctx, action
from app.logic import ec2, public_ips
from app.logic import errors as e
from app.models import PublicIp


async def _address(ctx: Ctx, *, allocation: str | None = None, public: str | None = None) -> PublicIp:
    try:
        if allocation:
            return await public_ips.get(ctx.session, actor=ctx.actor, ec2_id=allocation)
        if public:
            return await public_ips.get(ctx.session, actor=ctx.actor, address=public)
    except e.NotFound:
        if allocation:
            raise Ec2Error("InvalidAllocationID.NotFound", f"The allocation ID '{allocation}' does not exist") from None
        raise Ec2Error("InvalidAddress.NotFound", f"Address '{public}' not found.") from None
    raise missing("AllocationId")


@action("AllocateAddress")
async def allocate_address(ctx: Ctx) -> dict[str, Any]:
    try:
        ip = await public_ips.allocate(ctx.session, actor=ctx.actor, pool=ctx.params.get("PublicIpv4Pool"))
    except e.OverLimit:
        raise Ec2Error(
            "AddressLimitExceeded", "The maximum number of addresses has been reached (the public_ip quota)."
        ) from None
    return {"publicIp": ip.address, "allocationId": ip.ec2_id, "domain": "vpc", "publicIpv4Pool": ""}


@action("AssociateAddress")
async def associate_address(ctx: Ctx) -> dict[str, Any]:
    ip = await _address(ctx, allocation=ctx.params.get("AllocationId"), public=ctx.params.get("PublicIp"))
    instance = ctx.params.get("InstanceId")
    if not instance:
        raise missing("InstanceId")
    [server] = await find(ctx, [instance])
    if ip.server_id is not None and ip.server_id != server.id and ctx.params.flag("AllowReassociation"):
        await public_ips.disassociate(ctx.session, ctx.outbox, actor=ctx.actor, ip=ip)
    try:
        await public_ips.associate(ctx.session, ctx.outbox, actor=ctx.actor, ip=ip, server_id=server.id)
    except e.InUse:
        raise Ec2Error("Resource.AlreadyAssociated", f"resource {ip.ec2_id} is already associated") from None
    return {"associationId": ip.association_id}


@action("DisassociateAddress")
async def disassociate_address(ctx: Ctx) -> dict[str, Any]:
    association, public = ctx.params.get("AssociationId"), ctx.params.get("PublicIp")
    try:
        if association:
            ip = await public_ips.get(ctx.session, actor=ctx.actor, association_id=association)
        elif public:
            ip = await public_ips.get(ctx.session, actor=ctx.actor, address=public)
        else:
            raise missing("AssociationId")
    except e.NotFound:
        raise Ec2Error(
            "InvalidAssociationID.NotFound", f"The association ID '{association or public}' does not exist"
        ) from None
    if ip.server_id is None:
        raise Ec2Error("InvalidAssociationID.NotFound", f"The address {ip.address} is not associated")
    await public_ips.disassociate(ctx.session, ctx.outbox, actor=ctx.actor, ip=ip)
    return {"return": True}


@action("ReleaseAddress")
async def release_address(ctx: Ctx) -> dict[str, Any]:
    ip = await _address(ctx, allocation=ctx.params.get("AllocationId"), public=ctx.params.get("PublicIp"))
    try:
        await public_ips.release(ctx.session, actor=ctx.actor, ip=ip)
    except e.InUse:
        raise Ec2Error("InvalidIPAddress.InUse", f"Address {ip.address} is in use.") from None
    return {"return": True}


@action("DescribeAddresses")
async def describe_addresses(ctx: Ctx) -> dict[str, Any]:
    allocations, publics = ctx.params.many("AllocationId"), ctx.params.many("PublicIp")
    for a in allocations:  # each one named must exist (its own error code)
        await _address(ctx, allocation=a)
    for p in publics:
        await _address(ctx, public=p)
    found = await ec2.addresses(
        ctx.session, ctx.project_id, allocation_ids=allocations, public_ips=publics, given=ctx.params.filters()
    )
    return {
        "addressesSet": [
            {
                "publicIp": ip.address,
                "allocationId": ip.ec2_id,
                "domain": "vpc",
                "instanceId": instance,
                "associationId": ip.association_id,
            }
            for ip, instance in found
        ]
    }
