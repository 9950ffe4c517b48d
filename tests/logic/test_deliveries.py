"""Webhook deliveries leave in the order their events happened, those of one transaction too: a
batch of results applies several changes of one VM in one commit, and its deliveries share the
commit's time, so their ids must order them (time-ordered ids, as every id)."""

from __future__ import annotations

import itertools

from cryptography.fernet import Fernet

from app.db import make_engine, make_sessionmaker
from app.ids import uuid7
from app.logic import webhooks
from app.models import Project, Server, ServerEvent, Webhook


async def test_the_deliveries_of_one_transaction_leave_in_the_order_of_their_events(db_url: str) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    cipher = Fernet(Fernet.generate_key())
    project_id = uuid7()
    try:
        async with sessions() as s:
            s.add(Project(id=project_id, name=f"d-{project_id.hex[:8]}"))
            await s.commit()
        async with sessions() as s:
            sealed = cipher.encrypt(b"a secret").decode()
            s.add(Webhook(project_id=project_id, url="http://127.0.0.1:9/", secret_sealed=sealed))
            await s.commit()
        server = Server(
            name="vm", project_id=project_id, user_id=uuid7(), flavor_id=uuid7(), image_id=uuid7(), operstate="BUILD"
        )
        states = ["BUILD", "STARTED", "STOPPED", "STARTED", "SUSPENDED", "STARTED", "STOPPED", "DESTROYED"]
        changes = list(itertools.pairwise(states)) * 8
        async with sessions() as s:  # one transaction, as a batch of results is
            for before, after in changes:
                event = ServerEvent(server_id=server.id, kind="state", operstate_from=before, operstate_to=after)
                webhooks.note(s, server, event)
            await s.commit()
        async with sessions() as s:
            _, _, pending = await webhooks.due(s, project_id, cipher)
        assert [(d.body["data"]["from"], d.body["data"]["to"]) for d in pending] == changes
    finally:
        await engine.dispose()
