"""Key pairs: generated with cryptography, or imported; used by servers."""

from __future__ import annotations

import uuid

from cryptography.hazmat.primitives import serialization

from app.models import Job
from tests.conftest import Cloud


async def test_generate_import_list_delete(cloud: Cloud) -> None:
    user = await cloud.user()
    made = await cloud.client.post("/api/v1/keypairs", headers=user, json={"name": "gen"})
    assert made.status_code == 201
    body = made.json()
    private = serialization.load_ssh_private_key(body["private_key"].encode(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public.decode() == body["public_key"] and body["fingerprint"].startswith("SHA256:")
    rsa = (await cloud.client.post("/api/v1/keypairs", headers=user, json={"name": "r", "key_type": "rsa"})).json()
    serialization.load_pem_private_key(rsa["private_key"].encode(), password=None)
    imported = await cloud.client.post(
        "/api/v1/keypairs", headers=user, json={"name": "imp", "public_key": body["public_key"] + " me@host"}
    )
    assert imported.status_code == 201 and imported.json()["private_key"] is None
    assert imported.json()["fingerprint"] == body["fingerprint"]
    bad = await cloud.client.post("/api/v1/keypairs", headers=user, json={"name": "bad", "public_key": "ssh-rsa xx"})
    assert bad.status_code == 400 and bad.json()["error"]["details"]["field"] == "public_key"
    listed = (await cloud.client.get("/api/v1/keypairs", headers=user)).json()["items"]
    assert [k["name"] for k in listed] == ["gen", "r", "imp"] and all(k["private_key"] is None for k in listed)
    other = await cloud.user()
    assert (await cloud.client.get("/api/v1/keypairs", headers=other)).json()["items"] == []
    assert (await cloud.client.delete("/api/v1/keypairs/gen", headers=other)).status_code == 404

    reply = await cloud.create(user, key_name="gen", user_data="#cloud-config\n")
    assert reply["servers"][0]["key_name"] == "gen"
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(reply["job_ids"][0]))
        assert job is not None and job.params["ssh_key"] == body["public_key"]
        assert job.params["user_data"] == "#cloud-config\n"
    assert (await cloud.client.delete("/api/v1/keypairs/gen", headers=user)).status_code == 204
    assert [k["name"] for k in (await cloud.client.get("/api/v1/keypairs", headers=user)).json()["items"]] == [
        "r",
        "imp",
    ]
