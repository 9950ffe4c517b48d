"""The metadata service, on both databases: a request the proxy vouches for gets the VM's own
metadata and user data with an IMDSv2 token; one Nephos cannot attribute gets nothing; no token,
an expired token or another VM's is 401."""

from __future__ import annotations

import time
import uuid
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr

from app.logic import metadata
from app.models import Job
from tests.api.helpers import server_in
from tests.conftest import Cloud

KEY = "a-proxy-key-of-some-length-0123"
SSH = (
    Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    .decode()
)


def _proxy(vm: dict[str, Any], network_id: str, **extra: str) -> dict[str, str]:
    return {
        "X-Nephos-Proxy-Key": KEY,
        "X-Nephos-Network": network_id,
        "X-Forwarded-For": vm["addresses"][0]["ip"],
        **extra,
    }


async def _token(cloud: Cloud, headers: dict[str, str], ttl: str = "60") -> str:
    r = await cloud.client.put(
        "/metadata/latest/api/token", headers={**headers, "X-aws-ec2-metadata-token-ttl-seconds": ttl}
    )
    assert r.status_code == 200, r.text
    return r.text


async def test_a_vouched_vm_reads_its_own_metadata_with_a_session(cloud: Cloud) -> None:
    cloud.state.settings.metadata_proxy_key = SecretStr(KEY)
    user = await cloud.user()
    r = await cloud.client.post("/api/v1/keypairs", headers=user, json={"name": "k", "public_key": SSH})
    assert r.status_code == 201
    vm = await server_in(cloud, user, "STARTED", key_name="k", user_data="#!/bin/sh\necho hi\n")
    other = await server_in(cloud, user, "STARTED")
    network = (await cloud.client.get("/api/v1/networks", headers=user)).json()["items"][0]["id"]
    asking = _proxy(vm, network)
    token = await _token(cloud, asking)
    session = {**asking, "X-aws-ec2-metadata-token": token}

    async def read(path: str, headers: dict[str, str] = session) -> tuple[int, str]:
        r = await cloud.client.get(f"/metadata/latest/{path}", headers=headers)
        return r.status_code, r.text

    assert await read("meta-data/instance-id") == (200, vm["ec2_id"])
    assert await read("meta-data/local-ipv4") == (200, vm["addresses"][0]["ip"])
    assert await read("meta-data/mac") == (200, vm["addresses"][0]["mac"])
    assert await read("meta-data/instance-type") == (200, "small")
    assert await read("meta-data/public-keys/") == (200, "0=k")
    assert await read("meta-data/public-keys/0/openssh-key") == (200, SSH)
    assert await read("user-data") == (200, "#!/bin/sh\necho hi\n")
    status, root = await read("meta-data/")
    assert status == 200 and {"instance-id", "local-ipv4", "placement/", "public-keys/"} <= set(root.split("\n"))
    assert (await read("meta-data/nothing-here"))[0] == 404
    # A public address associated shows as public-ipv4, and the job that maps it on the host
    # carries what the VM's config drive is made of (the drive is made anew with the address).
    assert (await read("meta-data/public-ipv4"))[0] == 404
    r = await cloud.client.post(
        "/api/v1/admin/public-ip-pools", headers=cloud.admin, json={"name": "p", "cidr": "198.51.100.0/30"}
    )
    assert r.status_code == 201, r.text
    eip = (await cloud.client.post("/api/v1/public-ips", headers=user, json={})).json()
    r = await cloud.client.post(f"/api/v1/public-ips/{eip['id']}/associate", headers=user, json={"server_id": vm["id"]})
    assert r.status_code == 202, r.text
    assert await read("meta-data/public-ipv4") == (200, eip["address"])
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(r.json()["job_id"]))
        assert job is not None and job.params["mappings"] == [
            {"public": eip["address"], "private": vm["addresses"][0]["ip"]}
        ]
        guest = job.params["guest"]
        assert (guest["ec2_id"], guest["ssh_key"], guest["user_data"]) == (vm["ec2_id"], SSH, "#!/bin/sh\necho hi\n")
        assert [n["ip"] for n in guest["nics"]] == [vm["addresses"][0]["ip"]]
    await cloud.finish(r.json()["job_id"])
    # IMDSv2 is required: no token, another VM's token, an expired one.
    assert (await read("meta-data/instance-id", asking))[0] == 401
    theirs = await _token(cloud, _proxy(other, network))
    assert (await read("meta-data/instance-id", {**asking, "X-aws-ec2-metadata-token": theirs}))[0] == 401
    stale = metadata.token_for(KEY, uuid.UUID(vm["id"]), 1, now=time.time() - 10)
    assert (await read("meta-data/instance-id", {**asking, "X-aws-ec2-metadata-token": stale}))[0] == 401
    assert (await read("meta-data/instance-id", {**asking, "X-aws-ec2-metadata-token": "garbage"}))[0] == 401
    # A TTL out of range is refused.
    r = await cloud.client.put(
        "/metadata/latest/api/token", headers={**asking, "X-aws-ec2-metadata-token-ttl-seconds": "0"}
    )
    assert r.status_code == 400


async def test_a_request_nephos_cannot_attribute_gets_nothing(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    network = (await cloud.client.get("/api/v1/networks", headers=user)).json()["items"][0]["id"]
    asking = _proxy(vm, network)
    # No proxy key configured: nothing is answered.
    r = await cloud.client.put(
        "/metadata/latest/api/token", headers={**asking, "X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    assert r.status_code == 403 and r.text == ""
    cloud.state.settings.metadata_proxy_key = SecretStr(KEY)
    token = await _token(cloud, asking)
    refused = {
        "no key": {k: v for k, v in asking.items() if k != "X-Nephos-Proxy-Key"},
        "wrong key": {**asking, "X-Nephos-Proxy-Key": "not-the-key"},
        "unknown address": {**asking, "X-Forwarded-For": "10.255.255.254"},
        "another network": {**asking, "X-Nephos-Network": "00000000-0000-0000-0000-000000000000"},
        "no network": {k: v for k, v in asking.items() if k != "X-Nephos-Network"},
        "a bad network": {**asking, "X-Nephos-Network": "nope"},
    }
    for what, headers in refused.items():
        r = await cloud.client.get(
            "/metadata/latest/meta-data/instance-id", headers={**headers, "X-aws-ec2-metadata-token": token}
        )
        assert (r.status_code, r.text) == (403, ""), what
    # A destroyed VM's address answers nothing either.
    job = (await cloud.act(user, vm["id"], "destroy"))["job_id"]
    await cloud.finish(job)
    r = await cloud.client.get(
        "/metadata/latest/meta-data/instance-id", headers={**asking, "X-aws-ec2-metadata-token": token}
    )
    assert r.status_code == 403
