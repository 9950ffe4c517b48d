"""Tokens and EC2 secrets rest hashed or encrypted, and never reach a log line."""

from __future__ import annotations

import hashlib
import logging
import uuid

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
        r = await cloud.client.post(
            "/api/v1/admin/users", headers=cloud.admin, json={"name": "s", "project_id": (await cloud.project())["id"]}
        )
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


async def test_what_is_shown_once_is_never_stored_readable_even_with_an_idempotency_key(cloud: Cloud) -> None:
    """Every reply that shows a secret, asked with an Idempotency-Key: the record keeps it sealed,
    a replay shows it again (same ids), and no table holds it readable -- job rows included."""
    from tests.api.helpers import server_in

    project_id = (await cloud.project())["id"]
    admin = {**cloud.admin, "Idempotency-Key": "user-1"}
    body = {"name": "once", "project_id": project_id}
    made = await cloud.client.post("/api/v1/admin/users", headers=admin, json=body)
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    replayed = await cloud.client.post("/api/v1/admin/users", headers=admin, json=body)
    assert replayed.json() == made.json()  # the same user, not a second one
    user = {"Authorization": f"Bearer {token}"}

    cred = await cloud.client.post("/api/v1/credentials/ec2", headers={**user, "Idempotency-Key": "cred-1"})
    secret = cred.json()["secret_key"]
    key = await cloud.client.post("/api/v1/keypairs", headers={**user, "Idempotency-Key": "key-1"}, json={"name": "k1"})
    assert key.status_code == 201, key.text
    private_key = key.json()["private_key"]
    vm = await server_in(cloud, user, "STARTED")
    console = await cloud.client.post(
        f"/api/v1/servers/{vm['id']}/actions",
        headers={**user, "Idempotency-Key": "console-1"},
        json={"action": "console"},
    )
    assert console.status_code == 200, console.text
    password = console.json()["password"]
    assert len(password) == 8

    dump = await _dump(cloud)
    for shown_once in (token, secret, private_key, password):
        assert shown_once not in dump
    # The private key's body without its PEM/OpenSSH framing, in case a store re-wrapped it.
    assert private_key.splitlines()[1] not in dump
    # The job that carries the password to the agent keeps it sealed too, and the publisher opens it.
    from app.bus.outbox import job_message
    from app.models import Job

    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(console.json()["job_id"]))
    assert job is not None and job_message(job, cloud.state.cipher).params["password"] == password


async def test_the_sweeper_purges_idempotency_records_past_their_ttl(cloud: Cloud) -> None:
    from datetime import timedelta

    from app.logic import idempotency
    from app.models import IdempotencyRecord

    user = await cloud.user()
    for key in ("old", "new"):
        r = await cloud.client.post("/api/v1/keypairs", headers={**user, "Idempotency-Key": key}, json={"name": key})
        assert r.status_code == 201
    async with cloud.sessions() as s:
        table = IdempotencyRecord.__table__  # type: ignore[attr-defined]
        await s.execute(table.update().where(table.c.key == "old").values(created_at=_days_ago(2)))
        await s.commit()
    async with cloud.sessions() as s:
        assert await idempotency.purge(s, older_than=timedelta(hours=24)) == 1
        await s.commit()
        keys = [r.key for r in await s.scalars(sa.select(IdempotencyRecord))]
    assert keys == ["new"]


def _days_ago(days: int) -> object:
    from datetime import timedelta

    from app.ids import utcnow

    return utcnow() - timedelta(days=days)
