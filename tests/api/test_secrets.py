"""Tokens and EC2 secrets rest hashed or encrypted, and never reach a log line."""

from __future__ import annotations

import hashlib
import logging

import pytest
import sqlalchemy as sa

from app.logic import accounts
from app.models import SQLModel
from tests.conftest import Cloud


async def _dump(cloud: Cloud) -> str:
    """Every row of every table, as text."""
    async with cloud.sessions() as s:
        rows = []
        for table in SQLModel.metadata.sorted_tables:
            rows += [repr(tuple(r)) for r in (await s.execute(sa.select(table))).all()]
    return "\n".join(rows)


async def test_tokens_and_secrets_at_rest_and_in_logs(cloud: Cloud, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # SQL and parameters, as an operator might
    try:
        r = await cloud.client.post("/api/v1/admin/users", headers=cloud.admin,
                                    json={"name": "s", "project_id": (await cloud.project())["id"]})
        token = r.json()["token"]
        user = {"Authorization": f"Bearer {token}"}
        cred = await cloud.client.post("/api/v1/credentials/ec2", headers=user)
        assert cred.status_code == 201
        access, secret = cred.json()["access_key"], cred.json()["secret_key"]
        assert access.startswith("AKIA") and len(access) == 20 and len(secret) == 40
        listed = (await cloud.client.get("/api/v1/credentials/ec2", headers=user)).json()["items"]
        assert listed == [{"access_key": access, "created_at": listed[0]["created_at"], "secret_key": None}]
        await cloud.create(user)
        await cloud.client.get("/api/v1/servers", headers=user)
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)

    dump = await _dump(cloud)
    assert token not in dump and secret not in dump
    assert hashlib.sha256(token.encode()).hexdigest() in dump
    assert token not in caplog.text and secret not in caplog.text
    assert "SELECT" in caplog.text  # the capture did see the database traffic
    async with cloud.sessions() as s:
        actor, plain = await accounts.ec2_secret(s, access_key=access, cipher=cloud.state.cipher)
    assert plain == secret and actor.user_id is not None
    assert (await cloud.client.delete(f"/api/v1/credentials/ec2/{access}", headers=user)).status_code == 204
    assert (await cloud.client.delete(f"/api/v1/credentials/ec2/{access}", headers=user)).status_code == 404
