"""Leases and scheduled actions through the API, run as the dispatcher's sweeper runs them."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from app.logic import schedules
from app.logic.jobs import Outbox
from app.models import ScheduledAction, table_of
from tests.api.helpers import expected_usage, server_in, usage
from tests.conftest import Cloud

_actions = table_of(ScheduledAction)


async def _policy(cloud: Cloud, project_id: str, **policy: Any) -> dict[str, Any]:
    r = await cloud.client.put(f"/api/v1/admin/projects/{project_id}/lease-policy", headers=cloud.admin, json=policy)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def _schedule(cloud: Cloud, headers: dict[str, str], server_id: str) -> list[dict[str, Any]]:
    r = await cloud.client.get(f"/api/v1/servers/{server_id}/schedule", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def _due_now(cloud: Cloud, schedule_id: str) -> None:
    """Time passes: the action's time has come (set in the database, not waited for)."""
    async with cloud.sessions() as s:
        await s.execute(
            _actions.update()
            .where(_actions.c.id == uuid.UUID(schedule_id))
            .values(at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await s.commit()


async def _sweep(cloud: Cloud) -> dict[str, str]:
    """One sweeper pass over what is due: each action in its own transaction."""
    outcomes = {}
    async with cloud.sessions() as s:
        due = await schedules.due(s)
    for schedule_id in due:
        async with cloud.sessions() as s:
            outcomes[str(schedule_id)] = await schedules.run(s, Outbox(), schedule_id)
            await s.commit()
    return outcomes


async def test_a_lease_ends_the_vm_as_its_policy_says(cloud: Cloud) -> None:
    user = await cloud.user()
    project = user["X-Project"]
    default = (await cloud.client.get("/api/v1/lease-policy", headers=user)).json()
    assert default == {
        "project_id": project,
        "duration_s": 7776000,
        "max_lifetime_s": None,
        "warn_before_s": [604800, 86400],
        "on_expiry": "destroy",
    }
    forbidden = await cloud.client.put(
        f"/api/v1/admin/projects/{project}/lease-policy", headers=user, json={"duration_s": 10}
    )
    assert forbidden.status_code == 403
    await _policy(cloud, project, duration_s=60, warn_before_s=[30, 10], on_expiry="stop")
    vm = await server_in(cloud, user, "STARTED")
    created = datetime.fromisoformat(vm["created_at"])
    assert datetime.fromisoformat(vm["lease_expires_at"]) == created + timedelta(seconds=60)
    (lease,) = await _schedule(cloud, user, vm["id"])
    assert (lease["kind"], lease["action"], lease["state"]) == ("lease", "stop", "pending")

    assert await _sweep(cloud) == {}  # not yet
    await _due_now(cloud, lease["id"])
    assert await _sweep(cloud) == {lease["id"]: "done"}
    (lease,) = await _schedule(cloud, user, vm["id"])
    assert lease["state"] == "done" and lease["reason"] == "the lease ended" and lease["job_id"]
    assert await cloud.finish(lease["job_id"]) == "applied"
    server = await cloud.server(user, vm["id"])
    assert server["operstate"] == "STOPPED"
    assert usage(await cloud.quotas(user)) == expected_usage("STOPPED")
    events = (await cloud.client.get(f"/api/v1/servers/{vm['id']}/events", headers=user)).json()["items"]
    assert any(e["kind"] == "lease_action" and "the lease ended" in e["message"] for e in events)
    assert await _sweep(cloud) == {}  # exactly once


async def test_renewal_moves_the_end_within_the_cap_and_never_waits_for_a_task(cloud: Cloud) -> None:
    user = await cloud.user()
    await _policy(cloud, user["X-Project"], duration_s=3600, max_lifetime_s=5400, on_expiry="destroy")
    vm = await server_in(cloud, user, "STARTED")
    await cloud.act(user, vm["id"], "reboot")  # a task is pending: renewing does not care
    r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/lease", headers=user, json={})
    assert r.status_code == 200, r.text
    cap = datetime.fromisoformat(vm["created_at"]) + timedelta(seconds=5400)
    renewed = r.json()
    assert datetime.fromisoformat(renewed["max_expires_at"]) == cap
    assert datetime.fromisoformat(renewed["lease_expires_at"]) <= cap
    (lease,) = await _schedule(cloud, user, vm["id"])  # moved, not a second one
    assert datetime.fromisoformat(lease["at"]) == datetime.fromisoformat(renewed["lease_expires_at"])
    # Only an admin names the end.
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/lease", headers=user, json={"expires_at": later})
    assert r.status_code == 403
    r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/lease", headers=cloud.admin, json={"expires_at": later})
    assert r.status_code == 200
    assert datetime.fromisoformat(r.json()["lease_expires_at"]) == datetime.fromisoformat(later)
    # The admin's view of leases ending soon.
    soon = (datetime.now(UTC) + timedelta(days=4)).isoformat()
    listed = await cloud.client.get("/api/v1/admin/leases", headers=cloud.admin, params={"before": soon})
    assert vm["id"] in [s["id"] for s in listed.json()["items"]]


async def test_a_scheduled_action_refused_by_the_task_lock_is_retried_and_completes(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    reboot = await cloud.act(user, vm["id"], "reboot")
    at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/schedule", headers=user, json={"action": "stop", "at": at})
    assert r.status_code == 201, r.text
    stop = r.json()
    await _due_now(cloud, stop["id"])
    assert await _sweep(cloud) == {stop["id"]: "retry"}  # the reboot is pending: tried again later
    await cloud.finish(reboot["job_id"])
    assert await _sweep(cloud) == {stop["id"]: "done"}
    done = next(a for a in await _schedule(cloud, user, vm["id"]) if a["id"] == stop["id"])
    assert done["attempts"] == 2 and done["job_id"]
    await cloud.finish(done["job_id"])
    assert (await cloud.server(user, vm["id"]))["operstate"] == "STOPPED"
    # A cancelled one never runs; the lease's end is not cancelled but renewed.
    again = await cloud.client.post(
        f"/api/v1/servers/{vm['id']}/schedule", headers=user, json={"action": "start", "at": at}
    )
    gone = await cloud.client.delete(f"/api/v1/servers/{vm['id']}/schedule/{again.json()['id']}", headers=user)
    assert gone.status_code == 204
    lease = next(a for a in await _schedule(cloud, user, vm["id"]) if a["kind"] == "lease")
    r = await cloud.client.delete(f"/api/v1/servers/{vm['id']}/schedule/{lease['id']}", headers=user)
    assert r.status_code == 400


async def test_two_sweepers_run_a_due_action_once(cloud: Cloud) -> None:
    user = await cloud.user()
    await _policy(cloud, user["X-Project"], duration_s=60, on_expiry="destroy")
    vm = await server_in(cloud, user, "STARTED")
    (lease,) = await _schedule(cloud, user, vm["id"])
    await _due_now(cloud, lease["id"])
    first, second = await asyncio.gather(_sweep(cloud), _sweep(cloud))
    outcomes = sorted(list(first.values()) + list(second.values()))
    assert outcomes in (["done"], ["done", "taken"]), outcomes
    async with cloud.sessions() as s:
        jobs = (await s.execute(sa.text("SELECT count(*) FROM jobs WHERE action = 'destroy'"))).scalar_one()
    assert jobs == 1
    (lease,) = await _schedule(cloud, user, vm["id"])
    await cloud.finish(lease["job_id"])
    assert (await cloud.server(user, vm["id"]))["operstate"] == "DESTROYED"
    assert usage(await cloud.quotas(user)) == expected_usage("DESTROYED")
