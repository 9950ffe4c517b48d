"""The catalogue as EC2 describes it: images, instance types (flavors), zones and the region."""

from __future__ import annotations

from typing import Any

from app.api.ec2.protocol import invalid
from app.api.ec2.router import Ctx, action, well_formed_ids
from app.logic import ec2
from app.logic.catalogue import ImageStatus

# -- catalogue -----------------------------------------------------------------------------------


@action("DescribeImages")
async def describe_images(ctx: Ctx) -> dict[str, Any]:
    ids = well_formed_ids(ctx.params.many("ImageId"), "ami", "InvalidAMIID.Malformed")
    images = await ec2.images(
        ctx.session,
        ctx.actor,
        project_id=ctx.project_id,
        ids=ids,
        owners=ctx.params.many("Owner"),
        filters=ctx.params.filters(),
    )
    return {
        "imagesSet": [
            {
                "imageId": i.ec2_id,
                "imageLocation": i.name,
                "imageState": ec2.IMAGE_STATES[ImageStatus(i.status)],
                "imageOwnerId": str(i.project_id) if i.project_id else ec2.PUBLIC_OWNER,
                "isPublic": i.is_public,
                "architecture": "x86_64",
                "imageType": "machine",
                "name": i.name,
                "rootDeviceType": "ebs",
                "rootDeviceName": "/dev/vda",
                "virtualizationType": "hvm",
                "hypervisor": "kvm",
                "creationDate": i.created_at,
                "blockDeviceMapping": [],
            }
            for i in images
        ]
    }


@action("DescribeInstanceTypes")
async def describe_instance_types(ctx: Ctx) -> dict[str, Any]:
    wanted = ctx.params.many("InstanceType")
    for name, values in ctx.params.filters():
        if name != "instance-type":
            raise invalid("Filter.Name", name, "Unsupported filter name.")
        wanted += values
    flavors = await ec2.flavors(ctx.session, wanted)
    return {
        "instanceTypeSet": [
            {
                "instanceType": f.name,
                "currentGeneration": True,
                "bareMetal": False,
                "hypervisor": "kvm",
                "vCpuInfo": {"defaultVCpus": f.vcpus, "defaultCores": f.vcpus, "defaultThreadsPerCore": 1},
                "memoryInfo": {"sizeInMiB": f.ram_mb},
                "instanceStorageSupported": True,
                "instanceStorageInfo": {"totalSizeInGB": f.disk_gb},
                "supportedRootDeviceTypes": ["ebs"],
                "supportedVirtualizationTypes": ["hvm"],
                "processorInfo": {"supportedArchitectures": ["x86_64"]},
            }
            for f in flavors
        ]
    }


@action("DescribeAvailabilityZones")
async def describe_availability_zones(ctx: Ctx) -> dict[str, Any]:
    names = ctx.params.many("ZoneName")
    zones = await ec2.zones(ctx.session)
    if names:
        unknown = set(names) - set(zones)
        if unknown:
            raise invalid("ZoneName", ", ".join(sorted(unknown)), "No such availability zone.")
        zones = [z for z in zones if z in names]
    region = ctx.state.settings.ec2_region
    return {
        "availabilityZoneInfo": [
            {
                "zoneName": z,
                "zoneState": "available",
                "regionName": region,
                "zoneId": z,
                "zoneType": "availability-zone",
                "messageSet": [],
            }
            for z in zones
        ]
    }


@action("DescribeRegions")
async def describe_regions(ctx: Ctx) -> dict[str, Any]:
    region = ctx.state.settings.ec2_region
    names = ctx.params.many("RegionName")
    if names and set(names) - {region}:
        raise invalid("RegionName", ", ".join(sorted(set(names) - {region})), "No such region.")
    return {"regionInfo": [{"regionName": region, "regionEndpoint": "", "optInStatus": "opt-in-not-required"}]}
