"""The live event stream over real HTTP (server-sent events), against a whole cloud in this
process on both transports: a create's events in order, resuming after any event id without
loss or repetition, nothing of another project, nothing of a rolled-back request, and the
admin's view."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from app.logic.stream import Cursor
from tests.e2e.conftest import ADMIN as CLUSTER_ADMIN
from tests.e2e.conftest import Cluster, production_cluster
from tests.e2e.inprocess import ADMIN, Cloud, inprocess_cloud
from tests.e2e.sse import Sent, events


@pytest.fixture(params=["embedded", "production"])
async def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cloud]:
    async with inprocess_cloud(request, tmp_path, serve_http=True) as c:
        yield c


async def _create(cloud: Cloud, user: dict[str, str]) -> str:
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "vm", "flavor": "small", "image": "debian-12"}
    )
    assert r.status_code == 202, r.text
    return str(r.json()["servers"][0]["id"])


def _started(sid: str) -> Any:
    return lambda e: e.kind == "job.finished" and e.data["server_id"] == sid and e.data["to"] == "STARTED"


def _of(seen: list[Sent], sid: str) -> list[tuple[str, str | None]]:
    return [
        (e.kind, e.data["to"] if e.kind == "server.state" else e.data["action"])
        for e in seen
        if e.data.get("server_id") == sid
    ]


async def test_a_create_streams_in_order_and_resumes_without_loss_or_repetition(cloud: Cloud) -> None:
    base = cloud.plane.settings.public_api_url
    alice, bob = await cloud.user("alice"), await cloud.user("bob")
    async with events(base, alice) as mine, events(base, bob) as theirs:
        sid = await _create(cloud, alice)
        seen = await mine.until(_started(sid))
        # In order: the create accepted (BUILD, its task), the usage moved, then the result.
        assert _of(seen, sid)[0] == ("server.state", "BUILD")
        assert ("server.task", "create") in _of(seen, sid)
        assert _of(seen, sid)[-2:] == [("server.state", "STARTED"), ("job.finished", "create")]
        assert any(e.kind == "quota.changed" for e in seen)
        cursors = [Cursor.parse(e.id) for e in seen]
        assert all(c is not None for c in cursors) and cursors == sorted(cursors)  # type: ignore[type-var]
        assert len(set(cursors)) == len(cursors)
        # Another project hears nothing of it.
        assert await theirs.next(timeout=1.0) is None

        stop = await cloud.client.post(f"/api/v1/servers/{sid}/actions", headers=alice, json={"action": "stop"})
        assert stop.status_code == 202
        seen += await mine.until(lambda e: e.kind == "job.finished" and e.data["action"] == "stop")
        while (late := await mine.next(timeout=1.0)) is not None:  # the same transaction's quota change
            seen.append(late)

    # Resuming after any event gives exactly the events after it, on a new connection.
    middle = len(seen) // 2
    async with events(base, alice, last_event_id=seen[middle].id) as again:
        rest = [await again.next(timeout=5) for _ in range(len(seen) - middle - 1)]
        assert [e.id for e in rest if e] == [e.id for e in seen[middle + 1 :]]
        assert await again.next(timeout=0.5) is None
    # From the start of the stream, only this project's events, all of them.
    async with events(base, alice, last_event_id="0-0") as everything:
        whole = [await everything.next(timeout=5) for _ in range(len(seen))]
        assert [e.id for e in whole if e] == [e.id for e in seen]


async def test_a_rolled_back_request_streams_nothing_and_filters_narrow(cloud: Cloud) -> None:
    base = cloud.plane.settings.public_api_url
    alice = await cloud.user("alice")
    ec2 = await cloud.ec2(alice)
    ami = (await asyncio.to_thread(ec2.describe_images))["Images"][0]["ImageId"]
    first = await _create(cloud, alice)

    async def started() -> bool:
        return (await cloud.server(first))["operstate"] == "STARTED" and (await cloud.server(first))["task"] is None

    await cloud.until("the first VM started", started)
    async with events(base, alice) as mine, events(base, alice, kind="server.state", server_id=first) as narrow:
        # A DryRun runs the launch and rolls it back: its events never existed.
        with pytest.raises(ClientError) as exc:
            await asyncio.to_thread(
                ec2.run_instances, ImageId=ami, InstanceType="tiny", MinCount=1, MaxCount=1, DryRun=True
            )
        assert exc.value.response["Error"]["Code"] == "DryRunOperation"
        # A refused request writes nothing either (over the quota: 413).
        over = await cloud.client.post(
            "/api/v1/servers", headers=alice, json={"name": "x", "flavor": "small", "image": "debian-12", "count": 99}
        )
        assert over.status_code == 413
        r = await cloud.client.post(f"/api/v1/servers/{first}/actions", headers=alice, json={"action": "stop"})
        assert r.status_code == 202, r.text
        nxt = await mine.next(timeout=10)
        assert nxt is not None and nxt.data.get("server_id") == first, nxt  # the first thing heard
        only = await narrow.until(lambda e: e.data["to"] == "STOPPED", timeout=10)
        assert [(e.kind, e.data["server_id"]) for e in only] == [("server.state", first)] * len(only)

    # The admin streams every project, or one; a user may not.
    async with events(base, ADMIN, all_projects="true", last_event_id="0-0") as admin:
        assert (await admin.next(timeout=5)) is not None
    async with cloud.client.stream(
        "GET", "/api/v1/events/stream", headers=alice, params={"all_projects": "true"}
    ) as refused:
        assert refused.status_code == 403
    bad = await cloud.client.get("/api/v1/events/stream", headers=alice, params={"kind": "nope"})
    assert bad.status_code == 400
    bad = await cloud.client.get("/api/v1/events/stream", headers={**alice, "Last-Event-ID": "garbage"})
    assert bad.status_code == 400


@pytest.fixture
async def two_apis(pg_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with production_cluster(pg_url, tmp_path, apis=2) as c:
        yield c


async def test_across_api_processes_and_an_api_restart(two_apis: Cluster) -> None:
    """Separate processes on PostgreSQL + RabbitMQ: a stream from one API process hears what
    another accepted (woken by NOTIFY), and a stream cut by its API being killed resumes on the
    restarted process from its Last-Event-ID with nothing lost or repeated."""
    c = two_apis
    project = (await c.client.post("/api/v1/admin/projects", headers=CLUSTER_ADMIN, json={"name": "s"})).json()
    made = await c.client.post(
        "/api/v1/admin/users", headers=CLUSTER_ADMIN, json={"name": "u", "project_id": project["id"]}
    )
    user = {"Authorization": f"Bearer {made.json()['token']}"}
    other = c.bases["api-2"]

    async def act(sid: str, action: str) -> None:
        r = await c.client.post(f"/api/v1/servers/{sid}/actions", headers=user, json={"action": action})
        assert r.status_code == 202, r.text

    heard: list[Sent] = []
    async with events(c.base, user) as first:
        r = await c.client.post(
            "/api/v1/servers", headers=user, json={"name": "vm", "flavor": "small", "image": "debian-12"}
        )
        sid = r.json()["servers"][0]["id"]
        heard += await first.until(lambda e: e.kind == "job.finished" and e.data["action"] == "create")
        c.kill("api")  # mid-stream: the connection drops
        with pytest.raises(Exception):  # noqa: B017 -- whatever httpx makes of a dead peer
            while await first.next(timeout=5) is not None:
                pass
    async with httpx.AsyncClient(base_url=other) as via_other:  # meanwhile, through the other API
        r = await via_other.post(f"/api/v1/servers/{sid}/actions", headers=user, json={"action": "stop"})
        assert r.status_code == 202, r.text
    c.spawn("api")
    await c.hosts_up()
    async with events(c.base, user, last_event_id=heard[-1].id) as resumed:
        after = await resumed.until(lambda e: e.kind == "job.finished" and e.data["action"] == "stop")
        while (late := await resumed.next(timeout=1.0)) is not None:
            after.append(late)
    async with events(other, user, last_event_id="0-0") as whole:
        everything = []
        while (e := await whole.next(timeout=2.0)) is not None:
            everything.append(e)
    # What was heard before the kill and after the restart is the whole stream, once each.
    ids = [e.id for e in heard + after]
    assert len(ids) == len(set(ids))
    assert [e.id for e in everything] == ids
    assert ("server.state", "STOPPED") in [(e.kind, e.data.get("to")) for e in after]
