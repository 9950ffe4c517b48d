"""DescribeSubnets: a project's networks (``logic.networks``) in EC2's words. Every network is a
subnet of the project's one VPC (``ec2.vpc_of``); its ``default`` network is the default
subnet. RunInstances' ``SubnetId`` and ``PrivateIpAddress`` name a network and an address in
it (``app.api.ec2.instances``)."""

from __future__ import annotations

from typing import Any

from app.api.ec2.router import Ctx, action, well_formed_ids
from app.logic import ec2


@action("DescribeSubnets")
async def describe_subnets(ctx: Ctx) -> dict[str, Any]:
    ids = well_formed_ids(ctx.params.many("SubnetId"), "subnet", "InvalidSubnetID.Malformed")
    found = await ec2.subnets(ctx.session, ctx.project_id, ids, ctx.params.filters())
    vpc = ec2.vpc_of(ctx.project_id)
    arn = f"arn:aws:ec2:{ctx.state.settings.ec2_region}:{ctx.project_id.hex[:12]}:subnet"
    return {
        "subnetSet": [
            {
                "subnetId": net.ec2_id,
                "subnetArn": f"{arn}/{net.ec2_id}",
                "state": "available",
                "vpcId": vpc,
                "ownerId": str(ctx.project_id),
                "cidrBlock": net.cidr,
                "availableIpAddressCount": free,
                "availabilityZone": "",
                "defaultForAz": net.is_default,
                "mapPublicIpOnLaunch": False,
                "assignIpv6AddressOnCreation": False,
                "ipv6CidrBlockAssociationSet": [],
                "tagSet": [{"key": "Name", "value": net.name}],
            }
            for net, free in found
        ]
    }
