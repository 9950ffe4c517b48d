"""The EC2 facade, driven by real boto3 against running clusters (embedded and production).

No hand-made XML on the client side: botocore signs, serialises, parses and waits exactly as
it does against AWS.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlencode

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.e2e.conftest import ADMIN, Cluster

REGION = "us-east-1"


async def ec2_client(c: Cluster, **quotas: int) -> tuple[Any, dict[str, str]]:
    """A boto3 EC2 client for a new user in a new project, and that user's REST headers."""
    r = await c.client.post(
        "/api/v1/admin/projects", headers=ADMIN, json={"name": f"ec2-{uuid.uuid4().hex[:8]}", "quotas": quotas}
    )
    assert r.status_code == 201, r.text
    r = await c.client.post("/api/v1/admin/users", headers=ADMIN, json={"name": "u", "project_id": r.json()["id"]})
    headers = {"Authorization": f"Bearer {r.json()['token']}"}
    r = await c.client.post("/api/v1/credentials/ec2", headers=headers)
    assert r.status_code == 201, r.text
    return client(c, r.json()["access_key"], r.json()["secret_key"]), headers


def client(c: Cluster, access_key: str, secret_key: str) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=f"{c.base}/ec2",
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def code_of(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def fast(waiter_name: str, ec2: Any) -> Any:
    waiter = ec2.get_waiter(waiter_name)
    waiter.config.delay, waiter.config.max_attempts = 0.5, 120
    return waiter


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_lifecycle_through_boto3_with_waiters_tags_and_client_token(cluster: Cluster) -> None:
    ec2, _ = await ec2_client(cluster)
    ami = (await in_thread(ec2.describe_images, Filters=[{"Name": "name", "Values": ["debian-12"]}]))["Images"][0]
    run = dict(
        ImageId=ami["ImageId"],
        InstanceType="tiny",
        MinCount=2,
        MaxCount=2,
        ClientToken="tok-1",
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "web"}, {"Key": "team", "Value": "a"}]}
        ],
    )
    first = await in_thread(ec2.run_instances, **run)
    ids = [i["InstanceId"] for i in first["Instances"]]
    assert len(ids) == 2 and all(i.startswith("i-") and len(i) == 19 for i in ids)
    assert first["ReservationId"].startswith("r-")
    assert {i["State"]["Name"] for i in first["Instances"]} == {"pending"}
    # The same token again: the same reservation, nothing new launched.
    again = await in_thread(ec2.run_instances, **run)
    assert again["ReservationId"] == first["ReservationId"]
    assert [i["InstanceId"] for i in again["Instances"]] == ids
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.run_instances, **{**run, "InstanceType": "small"})
    assert code_of(exc) == "IdempotentParameterMismatch"

    await in_thread(fast("instance_running", ec2).wait, InstanceIds=ids)
    described = await in_thread(ec2.describe_instances, Filters=[{"Name": "tag:Name", "Values": ["web"]}])
    instances = [i for r in described["Reservations"] for i in r["Instances"]]
    assert sorted(i["InstanceId"] for i in instances) == sorted(ids)
    assert all({"Key": "team", "Value": "a"} in i["Tags"] for i in instances)
    assert all(i["ClientToken"] == "tok-1" and i["InstanceType"] == "tiny" for i in instances)

    stopped = await in_thread(ec2.stop_instances, InstanceIds=ids)
    assert {s["PreviousState"]["Name"] for s in stopped["StoppingInstances"]} == {"running"}
    assert {s["CurrentState"]["Name"] for s in stopped["StoppingInstances"]} <= {"stopping", "stopped"}
    await in_thread(fast("instance_stopped", ec2).wait, InstanceIds=ids)
    # Stopping a stopped instance is a no-op success.
    noop = await in_thread(ec2.stop_instances, InstanceIds=ids[:1])
    assert noop["StoppingInstances"][0]["CurrentState"]["Name"] == "stopped"

    await in_thread(ec2.start_instances, InstanceIds=ids)
    await in_thread(fast("instance_running", ec2).wait, InstanceIds=ids)
    assert (await in_thread(ec2.reboot_instances, InstanceIds=ids))["ResponseMetadata"]["HTTPStatusCode"] == 200

    gone = await in_thread(ec2.terminate_instances, InstanceIds=ids)
    assert {s["CurrentState"]["Name"] for s in gone["TerminatingInstances"]} <= {"shutting-down", "terminated"}
    await in_thread(fast("instance_terminated", ec2).wait, InstanceIds=ids)
    # Terminated instances stay visible, and terminating them again is a no-op.
    again_gone = await in_thread(ec2.terminate_instances, InstanceIds=ids)
    assert {s["CurrentState"]["Name"] for s in again_gone["TerminatingInstances"]} == {"terminated"}


async def test_filters_and_pages_return_every_instance_exactly_once(cluster: Cluster) -> None:
    ec2, headers = await ec2_client(cluster)
    ami = (await in_thread(ec2.describe_images))["Images"][0]["ImageId"]
    mine = []
    for team, n in (("red", 7), ("blue", 6)):
        r = await in_thread(
            ec2.run_instances,
            ImageId=ami,
            InstanceType="tiny",
            MinCount=n,
            MaxCount=n,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "team", "Value": team}]}],
        )
        mine += [i["InstanceId"] for i in r["Instances"]]
    # A VM made through REST is an EC2 instance too.
    r = await cluster.client.post(
        "/api/v1/servers", headers=headers, json={"name": "rest", "flavor": "tiny", "image": "debian-12"}
    )
    assert r.status_code == 202, r.text

    pages = await in_thread(
        lambda: list(ec2.get_paginator("describe_instances").paginate(PaginationConfig={"PageSize": 5}))
    )
    seen = [i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]]
    assert len(pages) == 3 and len(seen) == 14 == len(set(seen)) and set(mine) < set(seen)

    red = await in_thread(ec2.describe_instances, Filters=[{"Name": "tag:team", "Values": ["r*"]}])
    assert len([i for r in red["Reservations"] for i in r["Instances"]]) == 7
    both = await in_thread(
        ec2.describe_instances,
        Filters=[{"Name": "tag:team", "Values": ["red", "blue"]}, {"Name": "instance-type", "Values": ["tin?"]}],
    )
    assert len([i for r in both["Reservations"] for i in r["Instances"]]) == 13
    none = await in_thread(ec2.describe_instances, Filters=[{"Name": "instance-state-name", "Values": ["stopped"]}])
    assert none["Reservations"] == []
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.describe_instances, Filters=[{"Name": "no-such-filter", "Values": ["x"]}])
    assert code_of(exc) == "InvalidParameterValue"


async def test_catalogue_dry_run_ids_and_isolation(cluster: Cluster) -> None:
    ec2, headers = await ec2_client(cluster, vm=2)
    other, _ = await ec2_client(cluster)
    types = {t["InstanceType"]: t for t in (await in_thread(ec2.describe_instance_types))["InstanceTypes"]}
    assert types["small"]["VCpuInfo"]["DefaultVCpus"] == 1 and types["small"]["MemoryInfo"]["SizeInMiB"] == 2048
    zones = (await in_thread(ec2.describe_availability_zones))["AvailabilityZones"]
    assert zones and zones[0]["State"] == "available" and zones[0]["RegionName"] == REGION
    assert [r["RegionName"] for r in (await in_thread(ec2.describe_regions))["Regions"]] == [REGION]
    ami = (await in_thread(ec2.describe_images))["Images"][0]["ImageId"]

    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.run_instances, ImageId=ami, InstanceType="tiny", MinCount=1, MaxCount=1, DryRun=True)
    assert code_of(exc) == "DryRunOperation"
    assert (await in_thread(ec2.describe_instances))["Reservations"] == []  # no side effect
    with pytest.raises(ClientError) as exc:  # a read too: the caller may make it
        await in_thread(ec2.describe_instances, DryRun=True)
    assert code_of(exc) == "DryRunOperation"
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.create_key_pair, KeyName="dry", DryRun=True)
    assert code_of(exc) == "DryRunOperation"
    assert (await in_thread(ec2.describe_key_pairs))["KeyPairs"] == []

    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.describe_instances, InstanceIds=["i-nothex"])
    assert code_of(exc) == "InvalidInstanceID.Malformed"
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.describe_instances, InstanceIds=["i-0123456789abcdef0"])
    assert code_of(exc) == "InvalidInstanceID.NotFound"
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.run_instances, ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1)
    assert code_of(exc) == "InvalidAMIID.NotFound"

    # Over quota (2 VMs): all or nothing.
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.run_instances, ImageId=ami, InstanceType="tiny", MinCount=3, MaxCount=3)
    assert code_of(exc) == "InstanceLimitExceeded"
    # MaxCount beyond the quota, MinCount within it: as many as fit (the quota's two).
    r = await in_thread(ec2.run_instances, ImageId=ami, InstanceType="tiny", MinCount=1, MaxCount=3)
    assert len(r["Instances"]) == 2
    mine = r["Instances"][0]["InstanceId"]
    # Another project's instance does not exist for this one.
    with pytest.raises(ClientError) as exc:
        await in_thread(other.terminate_instances, InstanceIds=[mine])
    assert code_of(exc) == "InvalidInstanceID.NotFound"
    # A VM on hold (made through REST) is pending, and a pending instance cannot be stopped.
    launched = [i["InstanceId"] for i in r["Instances"]]
    await in_thread(ec2.terminate_instances, InstanceIds=launched)
    await in_thread(fast("instance_terminated", ec2).wait, InstanceIds=launched)  # their quota back
    r = await cluster.client.post(
        "/api/v1/servers", headers=headers, json={"name": "held", "flavor": "tiny", "image": "debian-12", "hold": True}
    )
    assert r.status_code == 202, r.text
    held = (await in_thread(ec2.describe_instances, Filters=[{"Name": "instance-state-name", "Values": ["pending"]}]))[
        "Reservations"
    ]
    (held_id,) = [i["InstanceId"] for res in held for i in res["Instances"]]
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.stop_instances, InstanceIds=[held_id])
    assert code_of(exc) == "IncorrectInstanceState"


async def test_signatures_are_checked(cluster: Cluster) -> None:
    ec2, _ = await ec2_client(cluster)
    key = ec2._request_signer._credentials.access_key
    with pytest.raises(ClientError) as exc:
        await in_thread(client(cluster, key, "wrong-secret").describe_regions)
    assert code_of(exc) == "AuthFailure" and exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401
    with pytest.raises(ClientError) as exc:
        await in_thread(client(cluster, "AKIANOSUCHKEY0000000", "x").describe_regions)
    assert code_of(exc) == "AuthFailure"

    # A request signed 20 minutes ago.
    secret = ec2._request_signer._credentials.secret_key
    then = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=20)
    with mock.patch("botocore.auth.get_current_datetime", return_value=then), pytest.raises(ClientError) as exc:
        await in_thread(client(cluster, key, secret).describe_regions)
    assert code_of(exc) == "AuthFailure"
    # Unsigned, and an unknown action (signed by botocore's own signer).
    r = await cluster.client.post("/ec2/", data={"Action": "DescribeRegions", "Version": "2016-11-15"})
    assert r.status_code == 401 and b"<Code>AuthFailure</Code>" in r.content
    r = await signed_post(cluster, key, secret, {"Action": "NoSuchAction", "Version": "2016-11-15"})
    assert r.status_code == 400 and b"<Code>InvalidAction</Code>" in r.content, r.text
    assert b"<RequestID>" in r.content


async def signed_post(c: Cluster, key: str, secret: str, form: dict[str, str]) -> Any:
    """A form POST to /ec2/ signed as botocore signs (for what boto3 itself will not send)."""
    body = urlencode(form)
    request = AWSRequest(
        method="POST",
        url=f"{c.base}/ec2/",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
    )
    SigV4Auth(Credentials(key, secret), "ec2", REGION).add_auth(request)
    return await c.client.post("/ec2/", content=body, headers=dict(request.headers.items()))


async def test_key_pairs_and_security_groups(cluster: Cluster) -> None:
    ec2, headers = await ec2_client(cluster)
    made = await in_thread(ec2.create_key_pair, KeyName="made")
    assert made["KeyMaterial"].startswith("-----BEGIN") and made["KeyPairId"].startswith("key-")
    assert len(made["KeyPairId"]) == 21
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.create_key_pair, KeyName="made")
    assert code_of(exc) == "InvalidKeyPair.Duplicate"
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGl0ZXN0a2V5Zm9ybmVwaG9zdGVzdHMxMjM0NTY3ODkw me@host"
    imported = await in_thread(ec2.import_key_pair, KeyName="mine", PublicKeyMaterial=public.encode())
    assert imported["KeyFingerprint"].startswith("SHA256:")
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.import_key_pair, KeyName="bad", PublicKeyMaterial=b"not a key")
    assert code_of(exc) == "InvalidKeyPair.Format"
    keys = (await in_thread(ec2.describe_key_pairs))["KeyPairs"]
    assert {k["KeyName"] for k in keys} == {"made", "mine"}
    # The same key pairs through REST.
    r = await cluster.client.get("/api/v1/keypairs", headers=headers)
    assert {k["name"] for k in r.json()["items"]} == {"made", "mine"}
    only = await in_thread(ec2.describe_key_pairs, Filters=[{"Name": "key-name", "Values": ["mi*"]}])
    assert [k["KeyPairId"] for k in only["KeyPairs"]] == [imported["KeyPairId"]]
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.describe_key_pairs, KeyNames=["nope"])
    assert code_of(exc) == "InvalidKeyPair.NotFound"

    web = (await in_thread(ec2.create_security_group, GroupName="web", Description="web servers"))["GroupId"]
    db = (await in_thread(ec2.create_security_group, GroupName="db", Description="databases"))["GroupId"]
    assert web.startswith("sg-") and len(web) == 20
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.create_security_group, GroupName="web", Description="again")
    assert code_of(exc) == "InvalidGroup.Duplicate"
    https = {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    rules = await in_thread(ec2.authorize_security_group_ingress, GroupId=web, IpPermissions=[https])
    assert rules["SecurityGroupRules"][0]["SecurityGroupRuleId"].startswith("sgr-")
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.authorize_security_group_ingress, GroupId=web, IpPermissions=[https])
    assert code_of(exc) == "InvalidPermission.Duplicate"
    from_web = {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": web}]}
    await in_thread(ec2.authorize_security_group_ingress, GroupName="db", IpPermissions=[from_web])
    with pytest.raises(ClientError) as exc:
        await in_thread(
            ec2.authorize_security_group_ingress,
            GroupId=web,
            IpPermissions=[{"IpProtocol": "tcp", "FromPort": 90, "ToPort": 80, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}],
        )
    assert code_of(exc) == "InvalidParameterValue"
    groups = {g["GroupName"]: g for g in (await in_thread(ec2.describe_security_groups))["SecurityGroups"]}
    assert groups["web"]["IpPermissions"][0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]
    assert groups["db"]["IpPermissions"][0]["UserIdGroupPairs"][0]["GroupId"] == web
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.describe_security_groups, GroupIds=["sg-0123456789abcdef0"])
    assert code_of(exc) == "InvalidGroup.NotFound"

    # An instance launched in a group and with a key: the group is in use while it lives.
    ami = (await in_thread(ec2.describe_images))["Images"][0]["ImageId"]
    run = await in_thread(
        ec2.run_instances,
        ImageId=ami,
        InstanceType="tiny",
        MinCount=1,
        MaxCount=1,
        KeyName="mine",
        SecurityGroupIds=[web],
    )
    instance = run["Instances"][0]
    assert instance["KeyName"] == "mine" and instance["SecurityGroups"] == [{"GroupId": web, "GroupName": "web"}]
    by_group = await in_thread(ec2.describe_instances, Filters=[{"Name": "instance.group-name", "Values": ["web"]}])
    assert [i["InstanceId"] for r in by_group["Reservations"] for i in r["Instances"]] == [instance["InstanceId"]]
    with pytest.raises(ClientError) as exc:  # an instance lives in it
        await in_thread(ec2.delete_security_group, GroupId=web)
    assert code_of(exc) == "DependencyViolation" and instance["InstanceId"] in exc.value.response["Error"]["Message"]
    await in_thread(ec2.revoke_security_group_ingress, GroupId=web, IpPermissions=[https])
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.revoke_security_group_ingress, GroupId=web, IpPermissions=[https])
    assert code_of(exc) == "InvalidPermission.NotFound"
    await in_thread(ec2.terminate_instances, InstanceIds=[instance["InstanceId"]])
    await in_thread(fast("instance_terminated", ec2).wait, InstanceIds=[instance["InstanceId"]])
    with pytest.raises(ClientError) as exc:  # db's rule still names web
        await in_thread(ec2.delete_security_group, GroupId=web)
    assert code_of(exc) == "DependencyViolation"
    await in_thread(ec2.delete_security_group, GroupId=db)
    await in_thread(ec2.delete_security_group, GroupId=web)
    assert (await in_thread(ec2.describe_security_groups))["SecurityGroups"] == []

    await in_thread(ec2.delete_key_pair, KeyName="made")
    await in_thread(ec2.delete_key_pair, KeyName="made")  # again: still a success, as on AWS
    await in_thread(ec2.delete_key_pair, KeyPairId=imported["KeyPairId"])
    assert (await in_thread(ec2.describe_key_pairs))["KeyPairs"] == []


async def test_attributes_protection_console_and_status(cluster: Cluster) -> None:
    ec2, headers = await ec2_client(cluster)
    ami = (await in_thread(ec2.describe_images))["Images"][0]["ImageId"]
    run = await in_thread(
        ec2.run_instances, ImageId=ami, InstanceType="tiny", MinCount=1, MaxCount=1, DisableApiTermination=True
    )
    i = run["Instances"][0]["InstanceId"]
    await in_thread(fast("instance_status_ok", ec2).wait, InstanceIds=[i])
    status = (await in_thread(ec2.describe_instance_status, InstanceIds=[i]))["InstanceStatuses"][0]
    assert status["InstanceState"]["Name"] == "running" and status["SystemStatus"]["Status"] == "ok"
    by_code = await in_thread(
        ec2.describe_instance_status,
        Filters=[
            {"Name": "instance-state-code", "Values": ["16"]},
            {"Name": "instance-status.status", "Values": ["o?"]},
        ],
    )
    assert [s["InstanceId"] for s in by_code["InstanceStatuses"]] == [i]

    # Termination protection: refused through EC2 and through REST alike.
    attr = await in_thread(ec2.describe_instance_attribute, InstanceId=i, Attribute="disableApiTermination")
    assert attr["DisableApiTermination"]["Value"] is True
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.terminate_instances, InstanceIds=[i])
    assert code_of(exc) == "OperationNotPermitted"
    server_id = (await cluster.client.get("/api/v1/servers", headers=headers)).json()["items"][0]["id"]
    r = await cluster.client.delete(f"/api/v1/servers/{server_id}", headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "Protected", r.text
    await in_thread(ec2.modify_instance_attribute, InstanceId=i, DisableApiStop={"Value": True})
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.stop_instances, InstanceIds=[i])
    assert code_of(exc) == "OperationNotPermitted"
    await in_thread(ec2.modify_instance_attribute, InstanceId=i, Attribute="disableApiStop", Value="false")

    # The instance type changes only when stopped, and then through a resize.
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.modify_instance_attribute, InstanceId=i, InstanceType={"Value": "small"})
    assert code_of(exc) == "IncorrectInstanceState"
    with pytest.raises(ClientError) as exc:
        await in_thread(
            ec2.modify_instance_attribute, InstanceId=i, InstanceType={"Value": "small"}, DisableApiStop={"Value": True}
        )
    assert code_of(exc) == "InvalidParameterCombination"
    await in_thread(ec2.stop_instances, InstanceIds=[i])
    await in_thread(fast("instance_stopped", ec2).wait, InstanceIds=[i])
    await in_thread(ec2.modify_instance_attribute, InstanceId=i, InstanceType={"Value": "small"})

    async def resized() -> bool:
        a = await in_thread(ec2.describe_instance_attribute, InstanceId=i, Attribute="instanceType")
        return bool(a["InstanceType"]["Value"] == "small")

    await cluster.wait_for("resize", resized)
    await cluster.wait_for("idle", lambda: _idle(cluster, server_id))
    await in_thread(ec2.modify_instance_attribute, InstanceId=i, UserData={"Value": b"#!/bin/sh\necho hi\n"})
    data = await in_thread(ec2.describe_instance_attribute, InstanceId=i, Attribute="userData")
    assert data["UserData"]["Value"]  # base64 of what was set
    # Stopped instances are listed by DescribeInstanceStatus only when asked for all.
    assert (await in_thread(ec2.describe_instance_status, InstanceIds=[]))["InstanceStatuses"] == []
    every = await in_thread(ec2.describe_instance_status, IncludeAllInstances=True)
    assert every["InstanceStatuses"][0]["InstanceStatus"]["Status"] == "not-applicable"

    console = await in_thread(ec2.get_console_output, InstanceId=i)
    assert i in console["Output"] and "RESIZE" in console["Output"].upper()

    await in_thread(ec2.modify_instance_attribute, InstanceId=i, DisableApiTermination={"Value": False})
    await in_thread(ec2.terminate_instances, InstanceIds=[i])
    await in_thread(fast("instance_terminated", ec2).wait, InstanceIds=[i])


async def _idle(c: Cluster, server_id: str) -> bool:
    return bool((await c.get(f"/api/v1/servers/{server_id}"))["task"] is None)


async def test_the_aws_command_line(prod_cluster: Cluster, tmp_path: Path) -> None:
    """awscli, unchanged, as an operator's script would run it (production cluster)."""
    ec2, _ = await ec2_client(prod_cluster)
    creds = ec2._request_signer._credentials
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }

    async def aws(*args: str) -> Any:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "aws"),
            "--endpoint-url",
            f"{prod_cluster.base}/ec2",
            "--output",
            "json",
            "ec2",
            *args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 300)
        assert proc.returncode == 0, (args, out.decode(), err.decode())
        return json.loads(out) if out.strip() else None

    ami = (await aws("describe-images", "--filters", "Name=name,Values=debian-12"))["Images"][0]["ImageId"]
    run = await aws(
        "run-instances",
        "--image-id",
        ami,
        "--instance-type",
        "tiny",
        "--count",
        "2",
        "--tag-specifications",
        "ResourceType=instance,Tags=[{Key=role,Value=cli}]",
    )
    ids = [i["InstanceId"] for i in run["Instances"]]
    assert len(ids) == 2
    await aws("wait", "instance-running", "--instance-ids", *ids)
    found = await aws(
        "describe-instances", "--filters", "Name=tag:role,Values=cli", "Name=instance-state-name,Values=running"
    )
    assert sorted(i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]) == sorted(ids)
    stopped = await aws("stop-instances", "--instance-ids", *ids)
    assert {s["PreviousState"]["Name"] for s in stopped["StoppingInstances"]} == {"running"}
    await aws("wait", "instance-stopped", "--instance-ids", *ids)
    gone = await aws("terminate-instances", "--instance-ids", *ids)
    assert {s["PreviousState"]["Name"] for s in gone["TerminatingInstances"]} == {"stopped"}
    await aws("wait", "instance-terminated", "--instance-ids", *ids)


async def test_a_refused_launch_leaves_its_client_token_free(cluster: Cluster) -> None:
    """The token is claimed first thing in the launch's transaction: a launch refused after
    that (an unknown instance type, a quota) rolls the claim back with everything else, so the
    same token then launches, once."""
    ec2, _ = await ec2_client(cluster, vm=1)
    ami = (await in_thread(ec2.describe_images))["Images"][0]["ImageId"]
    token = f"retry-{uuid.uuid4()}"
    unknown = "ami-0123456789abcdef0"  # an unknown image is the answer before an unknown type
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.run_instances, ImageId=unknown, InstanceType="nope", MinCount=1, MaxCount=1)
    assert code_of(exc) == "InvalidAMIID.NotFound"
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.run_instances, ImageId=ami, InstanceType="nope", MinCount=1, MaxCount=1, ClientToken=token)
    assert code_of(exc) == "InvalidParameterValue"
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.run_instances, ImageId=ami, InstanceType="tiny", MinCount=2, MaxCount=2, ClientToken=token)
    assert code_of(exc) == "InstanceLimitExceeded"
    run = dict(ImageId=ami, InstanceType="tiny", MinCount=1, MaxCount=1, ClientToken=token)
    first = await in_thread(ec2.run_instances, **run)
    again = await in_thread(ec2.run_instances, **run)
    assert again["ReservationId"] == first["ReservationId"]
    assert [i["InstanceId"] for i in again["Instances"]] == [i["InstanceId"] for i in first["Instances"]]


async def test_tags_and_a_client_token_raced_by_its_twins(cluster: Cluster) -> None:
    ec2, _ = await ec2_client(cluster)
    ami = (await in_thread(ec2.describe_images))["Images"][0]["ImageId"]
    # Eight identical launches at once, one token: one reservation, two instances, for all eight.
    run = dict(ImageId=ami, InstanceType="tiny", MinCount=2, MaxCount=2, ClientToken=f"race-{uuid.uuid4()}")
    replies = await asyncio.gather(*(in_thread(ec2.run_instances, **run) for _ in range(8)))
    assert len({r["ReservationId"] for r in replies}) == 1
    ids = sorted(i["InstanceId"] for i in replies[0]["Instances"])
    assert all(sorted(i["InstanceId"] for i in r["Instances"]) == ids for r in replies)
    every = await in_thread(ec2.describe_instances)
    assert sorted(i["InstanceId"] for r in every["Reservations"] for i in r["Instances"]) == ids

    await in_thread(ec2.create_tags, Resources=ids, Tags=[{"Key": "env", "Value": "prod"}, {"Key": "x", "Value": ""}])
    tags = (await in_thread(ec2.describe_tags, Filters=[{"Name": "key", "Values": ["env"]}]))["Tags"]
    assert sorted(t["ResourceId"] for t in tags) == ids and {t["Value"] for t in tags} == {"prod"}
    # 2 x (env, x) + 2 x k0..k4 = 14 tags, in pages of 5.
    await in_thread(ec2.create_tags, Resources=ids, Tags=[{"Key": f"k{n}", "Value": "v"} for n in range(5)])
    pages = await in_thread(lambda: list(ec2.get_paginator("describe_tags").paginate(PaginationConfig={"PageSize": 5})))
    seen = [(t["ResourceId"], t["Key"]) for p in pages for t in p["Tags"]]
    assert len(pages) == 3 and len(seen) == 14 == len(set(seen))
    await in_thread(ec2.delete_tags, Resources=ids, Tags=[{"Key": f"k{n}"} for n in range(5)])
    await in_thread(ec2.create_tags, Resources=ids[:1], Tags=[{"Key": "env", "Value": "dev"}])  # overwrites
    dev = await in_thread(ec2.describe_instances, Filters=[{"Name": "tag:env", "Values": ["dev"]}])
    assert [i["InstanceId"] for r in dev["Reservations"] for i in r["Instances"]] == ids[:1]
    await in_thread(ec2.delete_tags, Resources=ids, Tags=[{"Key": "env", "Value": "prod"}])  # only where prod
    left = (await in_thread(ec2.describe_tags, Filters=[{"Name": "key", "Values": ["env"]}]))["Tags"]
    assert [(t["ResourceId"], t["Value"]) for t in left] == [(ids[0], "dev")]
    await in_thread(ec2.delete_tags, Resources=ids)  # every tag
    assert (await in_thread(ec2.describe_tags))["Tags"] == []
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.create_tags, Resources=["i-0123456789abcdef0"], Tags=[{"Key": "a", "Value": "b"}])
    assert code_of(exc) == "InvalidInstanceID.NotFound"


async def test_every_filter_takes_the_wire_values_a_boto3_user_sends(cluster: Cluster) -> None:
    """Each filter compared with what the reply shows (``available``, ``running``, ``tiny``), never
    with a stored name the wire does not use (an image's ``active``)."""
    ec2, _ = await ec2_client(cluster)
    images = (await in_thread(ec2.describe_images))["Images"]
    debian = next(i for i in images if i["Name"] == "debian-12")
    assert {i["State"] for i in images} == {"available"}

    async def image_names(*filters: dict[str, Any]) -> list[str]:
        return sorted(i["Name"] for i in (await in_thread(ec2.describe_images, Filters=list(filters)))["Images"])

    assert await image_names({"Name": "state", "Values": ["available"]}) == sorted(i["Name"] for i in images)
    assert await image_names({"Name": "state", "Values": ["pending", "failed"]}) == []
    assert await image_names({"Name": "image-id", "Values": [debian["ImageId"]]}) == ["debian-12"]
    assert await image_names({"Name": "name", "Values": ["debian-*"]}) == ["debian-12"]
    assert await image_names({"Name": "is-public", "Values": ["true"]}) == sorted(i["Name"] for i in images)

    run = await in_thread(
        ec2.run_instances,
        ImageId=debian["ImageId"],
        InstanceType="tiny",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "role", "Value": "db"}]}],
    )
    iid = run["Instances"][0]["InstanceId"]
    await in_thread(fast("instance_running", ec2).wait, InstanceIds=[iid])

    async def found(*filters: dict[str, Any]) -> list[str]:
        reply = await in_thread(ec2.describe_instances, Filters=list(filters))
        return [i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"]]

    assert await found({"Name": "instance-state-name", "Values": ["running"]}) == [iid]
    assert await found({"Name": "instance-state-name", "Values": ["stopped", "pending"]}) == []
    assert await found({"Name": "instance-type", "Values": ["tiny"]}) == [iid]
    assert await found({"Name": "instance-type", "Values": ["small"]}) == []
    assert await found({"Name": "image-id", "Values": [debian["ImageId"]]}) == [iid]
    assert await found({"Name": "tag:role", "Values": ["db"]}) == [iid]
    assert await found({"Name": "tag:role", "Values": ["web"]}) == []
    assert await found({"Name": "instance-state-code", "Values": ["16"]}) == [iid]


async def test_a_suspended_vm_is_started_and_stopped_through_ec2(cluster: Cluster) -> None:
    """The facade asks the operstate table: StartInstances on a SUSPENDED VM resumes it, and
    StopInstances stops it (both allowed there), where the old rule table refused or did nothing."""
    ec2, headers = await ec2_client(cluster)
    ami = (await in_thread(ec2.describe_images, Filters=[{"Name": "name", "Values": ["debian-12"]}]))["Images"][0]
    ids = [
        i["InstanceId"]
        for i in (
            await in_thread(ec2.run_instances, ImageId=ami["ImageId"], InstanceType="tiny", MinCount=2, MaxCount=2)
        )["Instances"]
    ]
    await in_thread(fast("instance_running", ec2).wait, InstanceIds=ids)
    listed = (await cluster.client.get("/api/v1/servers", headers=headers)).json()["items"]
    by_ec2 = {s["ec2_id"]: s["id"] for s in listed}
    for iid in ids:
        r = await cluster.client.post(
            f"/api/v1/servers/{by_ec2[iid]}/actions", headers=headers, json={"action": "suspend"}
        )
        assert r.status_code == 202, r.text
        await cluster.idle(by_ec2[iid])
        assert (await cluster.get(f"/api/v1/servers/{by_ec2[iid]}"))["operstate"] == "SUSPENDED"
    await in_thread(fast("instance_stopped", ec2).wait, InstanceIds=ids)  # shown as stopped, like hibernation

    started = await in_thread(ec2.start_instances, InstanceIds=[ids[0]])
    assert started["StartingInstances"][0]["PreviousState"]["Name"] == "stopped"
    await in_thread(fast("instance_running", ec2).wait, InstanceIds=[ids[0]])
    assert (await cluster.get(f"/api/v1/servers/{by_ec2[ids[0]]}"))["operstate"] == "STARTED"

    stopped = await in_thread(ec2.stop_instances, InstanceIds=[ids[1]])
    assert stopped["StoppingInstances"][0]["CurrentState"]["Name"] in ("stopping", "stopped")
    await cluster.idle(by_ec2[ids[1]])
    assert (await cluster.get(f"/api/v1/servers/{by_ec2[ids[1]]}"))["operstate"] == "STOPPED"


async def test_run_instances_launches_as_many_as_fit_between_min_and_max(cluster: Cluster) -> None:
    ec2, _ = await ec2_client(cluster, vm=3)
    ami = (
        await in_thread(ec2.describe_images, Owners=["nephos"], Filters=[{"Name": "name", "Values": ["debian-12"]}])
    )["Images"][0]["ImageId"]
    run = await in_thread(ec2.run_instances, ImageId=ami, InstanceType="tiny", MinCount=2, MaxCount=5)
    assert len(run["Instances"]) == 3  # the quota holds three: three, not MinCount's two
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.run_instances, ImageId=ami, InstanceType="tiny", MinCount=1, MaxCount=4)
    assert code_of(exc) == "InstanceLimitExceeded"


async def test_owners_and_the_signing_region(cluster: Cluster) -> None:
    ec2, _ = await ec2_client(cluster)
    public = {i["Name"] for i in (await in_thread(ec2.describe_images, Owners=["nephos"]))["Images"]}
    assert "debian-12" in public
    assert (await in_thread(ec2.describe_images, Owners=["self"]))["Images"] == []
    # A client signing for another region is refused, as AWS does, instead of silently served.
    creds = ec2._request_signer._credentials
    elsewhere = boto3.client(
        "ec2",
        endpoint_url=f"{cluster.base}/ec2",
        region_name="eu-west-3",
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    with pytest.raises(ClientError) as exc:
        await in_thread(elsewhere.describe_images)
    assert code_of(exc) == "AuthFailure" and "region" in str(exc.value)


async def test_the_lease_is_a_read_only_tag_that_filters(cluster: Cluster) -> None:
    """Every leased instance carries ``nephos:lease-expires`` (its lease's end); DescribeInstances
    filters on it like any tag; clients can neither set nor delete it."""
    ec2, headers = await ec2_client(cluster)
    ami = (await in_thread(ec2.describe_images, Filters=[{"Name": "name", "Values": ["debian-12"]}]))["Images"][0]
    run = await in_thread(ec2.run_instances, ImageId=ami["ImageId"], InstanceType="tiny", MinCount=2, MaxCount=2)
    ids = sorted(i["InstanceId"] for i in run["Instances"])
    servers = {s["ec2_id"]: s for s in (await cluster.client.get("/api/v1/servers", headers=headers)).json()["items"]}
    # An admin moves one lease to a known end.
    end = "2031-05-06T07:08:09Z"
    r = await cluster.client.post(
        f"/api/v1/servers/{servers[ids[0]]['id']}/lease", headers=ADMIN, json={"expires_at": end}
    )
    assert r.status_code == 200, r.text

    async def described(*filters: dict[str, Any]) -> list[dict[str, Any]]:
        out = await in_thread(ec2.describe_instances, Filters=list(filters))
        return [i for res in out["Reservations"] for i in res["Instances"]]

    every = {i["InstanceId"]: i for i in await described()}
    assert {"Key": "nephos:lease-expires", "Value": end} in every[ids[0]]["Tags"]
    other = next(t["Value"] for t in every[ids[1]]["Tags"] if t["Key"] == "nephos:lease-expires")
    assert other == datetime.fromisoformat(servers[ids[1]]["lease_expires_at"]).strftime("%Y-%m-%dT%H:%M:%SZ")
    exact = await described({"Name": "tag:nephos:lease-expires", "Values": [end]})
    assert [i["InstanceId"] for i in exact] == [ids[0]]
    year = await described({"Name": "tag:nephos:lease-expires", "Values": ["2031-05-*"]})
    assert [i["InstanceId"] for i in year] == [ids[0]]
    keyed = await described({"Name": "tag-key", "Values": ["nephos:lease-expires"]})
    assert sorted(i["InstanceId"] for i in keyed) == ids
    for call in (ec2.create_tags, ec2.delete_tags):
        with pytest.raises(ClientError) as refused:
            await in_thread(call, Resources=ids[:1], Tags=[{"Key": "nephos:lease-expires", "Value": "2099-01-01"}])
        assert code_of(refused) == "InvalidParameterValue"
    after = {i["InstanceId"]: i for i in await described()}
    assert {"Key": "nephos:lease-expires", "Value": end} in after[ids[0]]["Tags"]


async def test_a_launch_answers_what_describe_instances_then_shows(cluster: Cluster) -> None:
    """RunInstances builds its reply from what it wrote (nothing read back): tags (a key given
    twice keeps its last value), groups in name order, the lease tag, addresses and interfaces
    are what DescribeInstances reads from the database, field for field but the state."""
    ec2, _ = await ec2_client(cluster)
    ami = (await in_thread(ec2.describe_images, Filters=[{"Name": "name", "Values": ["debian-12"]}]))["Images"][0]
    groups = [
        (await in_thread(ec2.create_security_group, GroupName=name, Description=name))["GroupId"]
        for name in ("zeta", "alpha")
    ]
    run = await in_thread(
        ec2.run_instances,
        ImageId=ami["ImageId"],
        InstanceType="tiny",
        MinCount=3,
        MaxCount=3,
        SecurityGroupIds=groups,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "team", "Value": "a"},
                    {"Key": "Name", "Value": "web"},
                    {"Key": "team", "Value": "b"},
                ],
            }
        ],
    )
    launched = run["Instances"]
    assert {i["State"]["Name"] for i in launched} == {"pending"}
    assert [i["AmiLaunchIndex"] for i in launched] == [0, 1, 2]
    described = await in_thread(ec2.describe_instances, InstanceIds=[i["InstanceId"] for i in launched])
    [reservation] = described["Reservations"]
    assert reservation["ReservationId"] == run["ReservationId"]
    shown = {i["InstanceId"]: i for i in reservation["Instances"]}
    for instance in launched:
        again = shown[instance["InstanceId"]]
        for key in set(instance) | set(again):
            if key not in ("State", "StateReason"):
                assert instance.get(key) == again.get(key), key
        assert [t["Key"] for t in instance["Tags"]] == ["Name", "team", "nephos:lease-expires"]
        assert {"Key": "team", "Value": "b"} in instance["Tags"]
        assert [g["GroupName"] for g in instance["SecurityGroups"]] == ["alpha", "zeta"]


async def test_instances_show_their_private_address_and_network_interface(cluster: Cluster) -> None:
    ec2, headers = await ec2_client(cluster)
    ami = (await in_thread(ec2.describe_images, Filters=[{"Name": "name", "Values": ["debian-12"]}]))["Images"][0]
    run = await in_thread(ec2.run_instances, ImageId=ami["ImageId"], InstanceType="tiny", MinCount=2, MaxCount=2)
    launched = {i["InstanceId"]: i for i in run["Instances"]}
    rest = {s["ec2_id"]: s for s in (await cluster.client.get("/api/v1/servers", headers=headers)).json()["items"]}
    for iid, instance in launched.items():
        [address] = rest[iid]["addresses"]
        assert instance["PrivateIpAddress"] == address["ip"]
        [eni] = instance["NetworkInterfaces"]
        assert eni["MacAddress"] == address["mac"] and eni["PrivateIpAddress"] == address["ip"]
        assert eni["NetworkInterfaceId"].startswith("eni-") and eni["Attachment"]["DeviceIndex"] == 0
        assert instance["SubnetId"] == eni["SubnetId"] and eni["SubnetId"].startswith("subnet-")
    first = sorted(launched)[0]
    out = await in_thread(
        ec2.describe_instances,
        Filters=[{"Name": "private-ip-address", "Values": [launched[first]["PrivateIpAddress"]]}],
    )
    assert [i["InstanceId"] for r in out["Reservations"] for i in r["Instances"]] == [first]


async def test_subnets_and_launching_into_one_at_a_chosen_address(cluster: Cluster) -> None:
    ec2, headers = await ec2_client(cluster)
    r = await cluster.client.post("/api/v1/networks", headers=headers, json={"name": "back", "cidr": "10.77.0.0/28"})
    assert r.status_code == 201, r.text
    back = r.json()
    ami = (await in_thread(ec2.describe_images, Filters=[{"Name": "name", "Values": ["debian-12"]}]))["Images"][0]
    # The default network is made at the first launch; then both are subnets of one VPC.
    await in_thread(ec2.run_instances, ImageId=ami["ImageId"], InstanceType="tiny", MinCount=1, MaxCount=1)
    subnets = {s["CidrBlock"]: s for s in (await in_thread(ec2.describe_subnets))["Subnets"]}
    assert set(subnets) == {"10.77.0.0/28", next(c for c in subnets if c != "10.77.0.0/28")}
    lab = subnets["10.77.0.0/28"]
    assert lab["SubnetId"].startswith("subnet-") and lab["State"] == "available" and not lab["DefaultForAz"]
    assert lab["AvailableIpAddressCount"] == 13  # 16, less network, gateway, broadcast
    assert {s["VpcId"] for s in subnets.values()} == {lab["VpcId"]} and lab["VpcId"].startswith("vpc-")
    [default] = [s for s in subnets.values() if s["DefaultForAz"]]
    only = await in_thread(ec2.describe_subnets, Filters=[{"Name": "cidr-block", "Values": ["10.77.*"]}])
    assert [s["SubnetId"] for s in only["Subnets"]] == [lab["SubnetId"]]
    flagged = await in_thread(ec2.describe_subnets, Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    assert [s["SubnetId"] for s in flagged["Subnets"]] == [default["SubnetId"]]

    run = await in_thread(
        ec2.run_instances,
        ImageId=ami["ImageId"],
        InstanceType="tiny",
        MinCount=1,
        MaxCount=1,
        SubnetId=lab["SubnetId"],
        PrivateIpAddress="10.77.0.9",
    )
    [instance] = run["Instances"]
    assert (instance["SubnetId"], instance["PrivateIpAddress"]) == (lab["SubnetId"], "10.77.0.9")
    rest = (await cluster.client.get("/api/v1/servers", headers=headers)).json()["items"]
    launched = next(s for s in rest if s["ec2_id"] == instance["InstanceId"])
    assert launched["addresses"][0]["network"] == back["name"]
    again = (await in_thread(ec2.describe_subnets, SubnetIds=[lab["SubnetId"]]))["Subnets"][0]
    assert again["AvailableIpAddressCount"] == 12

    refusals = [
        ({"SubnetId": lab["SubnetId"], "PrivateIpAddress": "10.77.0.9"}, "InvalidIPAddress.InUse"),
        ({"SubnetId": lab["SubnetId"], "PrivateIpAddress": "10.77.1.9"}, "InvalidParameterValue"),
        ({"SubnetId": "subnet-0123456789abcdef0"}, "InvalidSubnetID.NotFound"),
        ({"SubnetId": "subnet-nope"}, "InvalidSubnetID.Malformed"),
    ]
    for extra, code in refusals:
        with pytest.raises(ClientError) as exc:
            await in_thread(
                ec2.run_instances, ImageId=ami["ImageId"], InstanceType="tiny", MinCount=1, MaxCount=1, **extra
            )
        assert code_of(exc) == code, extra
    with pytest.raises(ClientError) as exc:
        await in_thread(ec2.describe_subnets, SubnetIds=["subnet-0123456789abcdef0"])
    assert code_of(exc) == "InvalidSubnetID.NotFound"
    # Another project sees neither its subnets nor can launch into them.
    stranger, _ = await ec2_client(cluster)
    assert lab["SubnetId"] not in {s["SubnetId"] for s in (await in_thread(stranger.describe_subnets))["Subnets"]}
    with pytest.raises(ClientError) as exc:
        await in_thread(
            stranger.run_instances,
            ImageId=ami["ImageId"],
            InstanceType="tiny",
            MinCount=1,
            MaxCount=1,
            SubnetId=lab["SubnetId"],
        )
    assert code_of(exc) == "InvalidSubnetID.NotFound"


async def test_elastic_ips_through_boto3(cluster: Cluster) -> None:
    r = await cluster.client.post(
        "/api/v1/admin/public-ip-pools",
        headers=ADMIN,
        json={"name": f"p{uuid.uuid4().hex[:6]}", "cidr": "192.0.2.0/29"},
    )
    assert r.status_code == 201, r.text
    ec2, headers = await ec2_client(cluster, public_ip=2)
    ami = (await in_thread(ec2.describe_images, Filters=[{"Name": "name", "Values": ["debian-12"]}]))["Images"][0]
    run = await in_thread(ec2.run_instances, ImageId=ami["ImageId"], InstanceType="tiny", MinCount=1, MaxCount=1)
    iid = run["Instances"][0]["InstanceId"]
    await in_thread(fast("instance_running", ec2).wait, InstanceIds=[iid])
    first = await in_thread(ec2.allocate_address, Domain="vpc")
    second = await in_thread(ec2.allocate_address, Domain="vpc")
    assert first["AllocationId"].startswith("eipalloc-") and first["PublicIp"].startswith("192.0.2.")
    with pytest.raises(ClientError) as over:
        await in_thread(ec2.allocate_address, Domain="vpc")
    assert code_of(over) == "AddressLimitExceeded"
    assoc = await in_thread(ec2.associate_address, AllocationId=first["AllocationId"], InstanceId=iid)
    assert assoc["AssociationId"].startswith("eipassoc-")
    described = (await in_thread(ec2.describe_addresses, AllocationIds=[first["AllocationId"]]))["Addresses"]
    assert described == [
        {
            "PublicIp": first["PublicIp"],
            "AllocationId": first["AllocationId"],
            "Domain": "vpc",
            "InstanceId": iid,
            "AssociationId": assoc["AssociationId"],
        }
    ]

    async def allocation_ids(**kw: Any) -> list[str]:
        return [a["AllocationId"] for a in (await in_thread(ec2.describe_addresses, **kw))["Addresses"]]

    both = sorted([first["AllocationId"], second["AllocationId"]])
    assert sorted(await allocation_ids(Filters=[{"Name": "domain", "Values": ["vpc"]}])) == both
    assert sorted(await allocation_ids(Filters=[{"Name": "public-ip", "Values": ["192.0.2.*"]}])) == both
    assert await allocation_ids(Filters=[{"Name": "instance-id", "Values": [iid]}]) == [first["AllocationId"]]
    assert await allocation_ids(Filters=[{"Name": "association-id", "Values": [assoc["AssociationId"]]}]) == [
        first["AllocationId"]
    ]
    assert await allocation_ids(PublicIps=[second["PublicIp"]]) == [second["AllocationId"]]
    assert await allocation_ids(Filters=[{"Name": "domain", "Values": ["standard"]}]) == []
    with pytest.raises(ClientError) as unknown:
        await in_thread(ec2.describe_addresses, Filters=[{"Name": "network-border-group", "Values": ["x"]}])
    assert code_of(unknown) == "InvalidParameterValue"

    async def shown() -> bool:
        out = await in_thread(ec2.describe_instances, InstanceIds=[iid])
        return bool(out["Reservations"][0]["Instances"][0].get("PublicIpAddress") == first["PublicIp"])

    await cluster.wait_for("the public address on the instance", shown)
    with pytest.raises(ClientError) as busy:
        await in_thread(ec2.release_address, AllocationId=first["AllocationId"])
    assert code_of(busy) == "InvalidIPAddress.InUse"

    async def idle() -> bool:
        return await _idle(
            cluster,
            next(s["id"] for s in (await cluster.client.get("/api/v1/servers", headers=headers)).json()["items"]),
        )

    await cluster.wait_for("the association's job", idle)
    await in_thread(ec2.disassociate_address, AssociationId=assoc["AssociationId"])
    await cluster.wait_for("the disassociation's job", idle)
    await in_thread(ec2.release_address, AllocationId=first["AllocationId"])
    left = (await in_thread(ec2.describe_addresses))["Addresses"]
    assert [a["AllocationId"] for a in left] == [second["AllocationId"]]
    with pytest.raises(ClientError) as gone:
        await in_thread(ec2.release_address, AllocationId=first["AllocationId"])
    assert code_of(gone) == "InvalidAllocationID.NotFound"
