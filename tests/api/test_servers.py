"""Servers through the API, on SQLite and PostgreSQL: create, read, list, edit, every action."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from app.models import Commission, Job, ServerEvent
from tests.api.helpers import expected_usage, pending, server_in, statements_sent, usage
from tests.conftest import Cloud

ACTION_FROM = {
    "release": ("HOLD", {}),
    "start": ("STOPPED", {}),
    "stop": ("STARTED", {}),
    "reboot": ("STARTED", {"hard": True}),
    "suspend": ("STARTED", {}),
    "resume": ("SUSPENDED", {}),
    "resize": ("STOPPED", {"flavor": "medium"}),
    "migrate": ("STOPPED", {}),
    "live_migrate": ("STARTED", {"host": None}),
    "save_image": ("STARTED", {"image_name": "snap"}),
    "destroy": ("STOPPED", {}),
}
TASK = {"release": "BUILD", "live_migrate": "LIVE_MIGRATE", "save_image": "SAVE_IMAGE"}


async def test_create_reaches_a_committed_pending_job(cloud: Cloud) -> None:
    user = await cloud.user()
    reply = await cloud.create(user, name="web", metadata={"role": "web"}, description="d")
    server, job_id = reply["servers"][0], reply["job_ids"][0]
    assert server["operstate"] == "BUILD" and server["task"] == "BUILD"
    assert server["task_job_id"] == job_id
    assert server["host"] in ("host-1", "host-2") and server["zone"] == "default"
    assert server["metadata"] == {"role": "web"}
    job = (await cloud.client.get(f"/api/v1/jobs/{job_id}", headers=user)).json()
    assert job["status"] == "PENDING" and job["action"] == "create" and job["finished_at"] is None
    assert usage(await cloud.quotas(user)) == expected_usage("BUILD")
    async with cloud.sessions() as s:
        row = await s.get(Job, uuid.UUID(job_id))
        assert row is not None and row.params["vcpus"] == 1 and row.params["image"]["name"] == "debian-12"
        commission = await s.get(Commission, row.commission_id)
        assert commission is not None and commission.state == "accepted" and commission.vm == 1
    events = (await cloud.client.get(f"/api/v1/servers/{server['id']}/events", headers=user)).json()
    assert [e["kind"] for e in events["items"]] == ["action"]


async def test_create_count_hold_and_flavor_by_id(cloud: Cloud) -> None:
    user = await cloud.user()
    flavors = (await cloud.client.get("/api/v1/flavors", headers=user)).json()["items"]
    tiny = next(f for f in flavors if f["name"] == "tiny")
    reply = await cloud.create(user, name="batch", flavor_id=tiny["id"], count=3)
    assert [s["name"] for s in reply["servers"]] == ["batch-1", "batch-2", "batch-3"]
    assert len(set(reply["job_ids"])) == 3
    held = await cloud.create(user, name="later", hold=True)
    assert held["job_ids"] == [] and held["servers"][0]["operstate"] == "HOLD"
    assert held["servers"][0]["host"] is None and held["servers"][0]["task"] is None
    q = usage(await cloud.quotas(user))
    assert q["vm"] == 4 and q["active_cpu"] == 3 and q["cpu"] == 3 + 1


async def test_every_action_commits_a_pending_job(cloud: Cloud) -> None:
    admin_in_project = cloud.admin  # migrate is admin-only; the admin acts on its own project
    for action, (state, extra) in ACTION_FROM.items():
        server = await server_in(cloud, admin_in_project, state)
        reply = await cloud.act(admin_in_project, server["id"], action, **extra)
        after = await cloud.server(admin_in_project, server["id"])
        assert after["task"] == TASK.get(action, action.upper()), action
        assert after["task_job_id"] == reply["job_id"]
        assert after["operstate"] == ("BUILD" if action == "release" else state)
        job = (await cloud.client.get(f"/api/v1/jobs/{reply['job_id']}", headers=cloud.admin)).json()
        assert job["status"] == "PENDING" and job["action"] == action
        async with cloud.sessions() as s:
            kinds = list(
                await s.scalars(
                    sa.select(ServerEvent.kind).where(ServerEvent.__table__.c.job_id == uuid.UUID(reply["job_id"]))
                )
            )
            assert kinds == ["action"]
        # Clean up so quotas stay within the default project's limits.
        destroy = await cloud.act(cloud.admin, server["id"], "destroy")
        await cloud.finish(destroy["job_id"])


async def test_console_answers_vnc_details(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STARTED")
    console = await cloud.act(user, server["id"], "console", expect=200)
    assert console["type"] == "vnc" and console["host"] == server["host"]
    assert console["port"] >= 5900 and 1 <= len(console["password"]) <= 8
    assert console["url"] == f"vnc://{server['host']}:{console['port']}"
    assert (await cloud.server(user, server["id"]))["task"] == "CONSOLE"


async def test_stop_commission_is_pending_until_the_result(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STARTED")
    await cloud.act(user, server["id"], "stop")
    q = await cloud.quotas(user)
    assert usage(q) == expected_usage("STARTED")
    assert pending(q) == dict.fromkeys(pending(q), 0)  # a release reserves nothing
    await server_in(cloud, user, "STOPPED")
    stopped = (await cloud.client.get("/api/v1/servers?operstate=STOPPED", headers=user)).json()["items"][0]
    await cloud.act(user, stopped["id"], "start")
    q = await cloud.quotas(user)
    assert q["active_cpu"]["pending"] == 1 and q["active_ram"]["pending"] == 2048


async def test_list_filters_and_cursor_pagination(cloud: Cloud) -> None:
    user = await cloud.user(vm=30, cpu=30, active_cpu=30, ram=10**6, active_ram=10**6)
    other = await cloud.user()
    await cloud.create(other, name="not-mine")
    made = await cloud.create(user, name="pg", count=7, flavor="tiny")
    ids = [s["id"] for s in made["servers"]]
    seen, cursor = [], None
    while True:
        url = "/api/v1/servers?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = (await cloud.client.get(url, headers=user)).json()
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids  # oldest first, each exactly once, nothing of another project
    one = (await cloud.client.get("/api/v1/servers?name=pg-3", headers=user)).json()["items"]
    assert [s["id"] for s in one] == [ids[2]]
    assert (await cloud.client.get("/api/v1/servers?zone=nowhere", headers=user)).json()["items"] == []
    await cloud.finish(made["job_ids"][0])
    destroy = await cloud.act(user, ids[0], "destroy")
    await cloud.finish(destroy["job_id"])
    listed = (await cloud.client.get("/api/v1/servers", headers=user)).json()["items"]
    assert ids[0] not in [s["id"] for s in listed]
    gone = (await cloud.client.get("/api/v1/servers?operstate=DESTROYED", headers=user)).json()["items"]
    assert [s["id"] for s in gone] == [ids[0]]
    assert (await cloud.server(user, ids[0]))["operstate"] == "DESTROYED"
    since = gone[0]["updated_at"]
    changed = (await cloud.client.get("/api/v1/servers", params={"changes_since": since}, headers=user)).json()
    assert ids[0] in [s["id"] for s in changed["items"]]
    everyone = (await cloud.client.get("/api/v1/servers?all_projects=true&limit=1000", headers=cloud.admin)).json()[
        "items"
    ]
    assert len(everyone) == 7  # 6 live of user + 1 of other
    on_host = (
        await cloud.client.get(
            f"/api/v1/servers?host={made['servers'][1]['host']}&all_projects=true", headers=cloud.admin
        )
    ).json()["items"]
    assert on_host and all(s["host"] == made["servers"][1]["host"] for s in on_host)


async def test_patch_and_events(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STARTED")
    r = await cloud.client.patch(
        f"/api/v1/servers/{server['id']}", headers=user, json={"name": "renamed", "metadata": {"a": "b"}}
    )
    assert r.status_code == 200 and r.json()["name"] == "renamed" and r.json()["metadata"] == {"a": "b"}
    events = (await cloud.client.get(f"/api/v1/servers/{server['id']}/events?limit=1", headers=user)).json()
    assert len(events["items"]) == 1 and events["next_cursor"]
    rest = (
        await cloud.client.get(
            f"/api/v1/servers/{server['id']}/events", params={"cursor": events["next_cursor"]}, headers=user
        )
    ).json()
    kinds = [e["kind"] for e in events["items"] + rest["items"]]
    assert kinds == ["action", "job_succeeded", "edited"]


@pytest.mark.parametrize("path", ["/api/v1/flavors", "/api/v1/images", "/api/v1/zones", "/api/v1/keypairs"])
async def test_catalogue_lists_are_paginated(cloud: Cloud, path: str) -> None:
    r = await cloud.client.get(path + "?limit=1", headers=cloud.admin)
    assert r.status_code == 200 and set(r.json()) == {"items", "next_cursor"}


async def test_flavor_capacity_counts_what_still_fits(cloud: Cloud) -> None:
    user = await cloud.user(vm=100, cpu=1000, active_cpu=1000, ram=10**7, active_ram=10**7, disk=10**6)

    def cap(items: list[dict[str, object]], name: str) -> object:
        return next(f["capacity"] for f in items if f["name"] == name)

    before = (await cloud.client.get("/api/v1/flavors", headers=user)).json()["items"]
    # Two hosts of 16 CPUs (x4 overcommit) and 32 GiB: RAM bounds the large flavor at 4 each.
    assert cap(before, "large") == 8 and cap(before, "small") == 32
    await cloud.create(user, flavor="large", count=3)
    after = (await cloud.client.get("/api/v1/flavors", headers=user)).json()["items"]
    assert cap(after, "large") == 5
    assert cap(after, "small") == 32 - 12
    assert all(f["zones"] == {"default": f["capacity"]} for f in after)  # per zone: one zone here


async def test_quotas_and_zones(cloud: Cloud) -> None:
    user = await cloud.user(vm=3)
    q = await cloud.quotas(user)
    assert set(q) == {"vm", "cpu", "ram", "disk", "active_cpu", "active_ram", "public_ip"}
    assert q["vm"] == {"limit": 3, "usage": 0, "pending": 0}
    zones = (await cloud.client.get("/api/v1/zones", headers=user)).json()["items"]
    assert zones == [{"id": zones[0]["id"], "name": "default", "hosts": 2, "hosts_up": 2}]


async def test_the_actions_a_server_offers_are_exactly_those_the_table_accepts(cloud: Cloud) -> None:
    """What a console shows as buttons (``actions``) never offers a refused action and never
    hides an accepted one: each action is tried on a fresh VM in each state, idle and busy."""
    from app.logic.operstate import OFFERED

    big = 10**6
    user = await cloud.user(vm=100, cpu=400, ram=big, disk=big, active_cpu=400, active_ram=big)
    for state in ("STARTED", "STOPPED", "SUSPENDED", "HOLD", "ERROR", "busy"):
        for action in OFFERED:
            if state == "busy":  # a stop pending
                vm = await server_in(cloud, user, "STARTED", flavor="tiny")
                await cloud.act(user, vm["id"], "stop")
                vm = await cloud.server(user, vm["id"])
            else:
                vm = await server_in(cloud, user, state, flavor="tiny")
            extra = {"flavor": "medium"} if action.value == "resize" else {}
            extra |= {"image_name": f"img-{vm['id'][:8]}"} if action.value == "save_image" else {}
            r = await cloud.client.post(
                f"/api/v1/servers/{vm['id']}/actions", headers=user, json={"action": action.value, **extra}
            )
            accepted = r.status_code in (200, 202)
            assert accepted == (action.value in vm["actions"]), (state, action.value, vm["actions"], r.text)


async def test_a_creates_reply_shows_what_reading_the_server_shows(cloud: Cloud) -> None:
    """The reply is built from what the create knows (no reads): it must say what a read says."""
    await cloud.client.post(
        "/api/v1/admin/public-ip-pools", headers=cloud.admin, json={"name": "reply", "cidr": "198.51.100.0/28"}
    )
    user = await cloud.user()
    made = await cloud.create(user, count=2, public_ip=True)
    for server in made["servers"]:
        assert server["addresses"][0]["public_ip"] and server["flavor"] == "small" and server["image"] == "debian-12"
        assert server == await cloud.server(user, server["id"])


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_an_action_locks_its_vm_once_and_a_start_its_project_with_it(cloud: Cloud) -> None:
    """PostgreSQL: a destroy reads its VM once, locked (whether it is destroyed already is read
    under that lock); a start locks its project in the statement that locks its VM (after it, in
    the lock order), not in one of its own; a create reads its flavor, image and lease policy in
    one statement. Each is accepted as before, and a second destroy answers with the first's job."""
    user = await cloud.user()

    def accepting(statements: list[str]) -> list[str]:  # the request's own (not its token's)
        return [s for s in statements if "FROM users" not in s and "api_tokens" not in s]

    with statements_sent(cloud) as sent:
        reply = await cloud.create(user)
        created, sent[:] = accepting(sent), []
        vm = reply["servers"][0]
        assert await cloud.finish(reply["job_ids"][0]) == "applied"
        assert await cloud.finish((await cloud.act(user, vm["id"], "stop"))["job_id"]) == "applied"
        sent[:] = []
        start = await cloud.act(user, vm["id"], "start")
        started, sent[:] = accepting(sent), []
        assert await cloud.finish(start["job_id"]) == "applied"
        sent[:] = []
        destroy = await cloud.act(user, vm["id"], "destroy")
        destroyed, sent[:] = accepting(sent), []
        assert await cloud.finish(destroy["job_id"]) == "applied"
        again = await cloud.act(user, vm["id"], "destroy")
    assert again["job_id"] == destroy["job_id"]
    assert (await cloud.server(user, vm["id"]))["operstate"] == "DESTROYED"

    first = [
        s
        for s in created
        if any(f"{t} " in s for t in ("FROM flavors", "JOIN flavors", "FROM images", "FROM lease_policies"))
    ]
    assert len(first) == 1 and "JOIN images" in first[0] and "JOIN lease_policies" in first[0], created
    locks = [s for s in started if " FOR NO KEY UPDATE" in s]
    assert len(locks) == 1 and locks[0].endswith("FOR NO KEY UPDATE OF servers, projects"), started
    reads = [s for s in destroyed if "FROM servers" in s and s.startswith("SELECT")]
    assert len(reads) == 1 and reads[0].endswith("FOR NO KEY UPDATE OF servers"), destroyed
