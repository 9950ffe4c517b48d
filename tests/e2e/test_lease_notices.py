"""Leases end VMs on time and nobody is surprised: warning mails read from a real SMTP server,
the end's action with its event and quota, renewals that re-arm the warnings, a mail server that
is down, webhooks signed, retried and disabled. In the test's process on both transports
(SQLite + in-memory bus, PostgreSQL + RabbitMQ); ``test_lease_processes`` runs the same with
separate processes and dispatchers killed and doubled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.api.helpers import expected_usage
from tests.e2e.inprocess import ADMIN, Cloud, inprocess_cloud
from tests.e2e.receivers import HookReceiver, Inbox
from tests.procs import free_port

SECRET = "a-shared-secret-of-some-length"


@pytest.fixture
def inbox() -> Any:
    box = Inbox(free_port())
    box.start()
    yield box
    box.stop()


def _mail_settings(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "lease_interval": 0.2,
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_timeout": 2.0,
        "notify_retry": 0.1,
        "webhook_timeout": 1.0,
        "webhook_max_failures": 3,
        **extra,
    }


@pytest.fixture(params=["embedded", "production"])
async def mail_cloud(request: pytest.FixtureRequest, tmp_path: Path, inbox: Inbox) -> AsyncIterator[Cloud]:
    async with inprocess_cloud(request, tmp_path, **_mail_settings(inbox.port)) as c:
        yield c


async def _policy(cloud: Cloud, project: str | None = None, **policy: Any) -> str:
    """Set a project's lease policy (the admin's own project unless one is named)."""
    if project is None:
        project = (await cloud.client.get("/api/v1/lease-policy", headers=ADMIN)).json()["project_id"]
    r = await cloud.client.put(f"/api/v1/admin/projects/{project}/lease-policy", headers=ADMIN, json=policy)
    assert r.status_code == 200, r.text
    return project


async def _user(cloud: Cloud, project: str, name: str = "alice") -> dict[str, str]:
    r = await cloud.client.post(
        "/api/v1/admin/users",
        headers=ADMIN,
        json={"name": name, "email": f"{name}@example.org", "project_id": project, "role": "user"},
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


async def _vm(cloud: Cloud, headers: dict[str, str], name: str = "vm") -> dict[str, Any]:
    r = await cloud.client.post(
        "/api/v1/servers", headers=headers, json={"name": name, "flavor": "small", "image": "debian-12"}
    )
    assert r.status_code == 202, r.text
    sid = r.json()["servers"][0]["id"]

    async def started() -> dict[str, Any] | None:
        s = await cloud.server(sid)
        return s if s["operstate"] == "STARTED" and s["task"] is None else None

    return await cloud.until("STARTED", started)  # type: ignore[no-any-return]


async def _mails(cloud: Cloud, inbox: Inbox, n: int, timeout: float = 30) -> list[str]:
    async def arrived() -> list[str] | None:
        bodies = inbox.bodies()
        return bodies if len(bodies) >= n else None

    return await cloud.until(f"{n} mails", arrived, timeout)  # type: ignore[no-any-return]


async def _act(cloud: Cloud, sid: str, action: str) -> None:
    r = await cloud.client.post(f"/api/v1/servers/{sid}/actions", headers=ADMIN, json={"action": action})
    assert r.status_code == 202, r.text
    await cloud.until("idle", lambda: _idle(cloud, sid))


async def _idle(cloud: Cloud, sid: str) -> bool:
    return (await cloud.server(sid))["task"] is None


async def _events(cloud: Cloud, sid: str) -> list[dict[str, Any]]:
    return (await cloud.client.get(f"/api/v1/servers/{sid}/events", headers=ADMIN)).json()["items"]  # type: ignore[no-any-return]


async def _project_with_policy(cloud: Cloud, name: str, **policy: Any) -> str:
    """A new project with this lease policy."""
    r = await cloud.client.post("/api/v1/admin/projects", headers=ADMIN, json={"name": name})
    assert r.status_code == 201, r.text
    return await _policy(cloud, r.json()["id"], **policy)


ENDS = {"stop": ("STOPPED", "stopped"), "suspend": ("SUSPENDED", "suspended"), "destroy": ("DESTROYED", "destroyed")}


async def test_two_warnings_by_mail_then_the_end_with_its_event_quota_and_webhook(
    mail_cloud: Cloud, inbox: Inbox
) -> None:
    """Each action a lease can end with, side by side: one project per action, each with its own
    policy, user (and so mailbox), webhook and VM, so the three leases run in one lease's time."""
    cloud = mail_cloud
    receivers: dict[str, HookReceiver] = {}
    users: dict[str, dict[str, str]] = {}
    for on_expiry in ENDS:
        # Six seconds between the warnings: a lease pass held off for less than that (the other CI
        # worker booting a real guest) still finds only the first one due, and sends both in turn.
        project = await _project_with_policy(
            cloud, f"lease-{on_expiry}", duration_s=14, warn_before_s=[10, 4], on_expiry=on_expiry
        )
        receivers[on_expiry] = receiver = HookReceiver(SECRET)
        r = await cloud.client.put(
            "/api/v1/webhook",
            headers=ADMIN,
            params={"project_id": project},
            json={"url": await receiver.start(), "secret": SECRET},
        )
        assert r.status_code == 200 and r.json()["enabled"] and "secret" not in r.json(), r.text
        users[on_expiry] = await _user(cloud, project, name=on_expiry)
    made = await asyncio.gather(*(_vm(cloud, users[on_expiry]) for on_expiry in ENDS))
    vms = dict(zip(ENDS, made, strict=True))

    async def ended() -> bool:
        servers = [await cloud.server(vms[on_expiry]["id"]) for on_expiry in ENDS]
        return all(s["operstate"] == ENDS[on_expiry][0] for on_expiry, s in zip(ENDS, servers, strict=True))

    await cloud.until("every lease to leave its VM as its policy says", ended, timeout=40)
    await _mails(cloud, inbox, 9)
    for on_expiry, (state, done) in ENDS.items():
        vm, receiver, user = vms[on_expiry], receivers[on_expiry], users[on_expiry]
        bodies = inbox.bodies(to=f"{on_expiry}@example.org")
        assert len(bodies) == 3, (on_expiry, bodies)
        assert "Leases ending in 10 seconds" in bodies[0] and vm["id"] in bodies[0]
        assert f"POST http://127.0.0.1:8000/api/v1/servers/{vm['id']}/lease" in bodies[0]
        assert "Leases ending in 4 seconds" in bodies[1]
        assert f"were {done} at their lease's end" in bodies[2]
        assert all(other["id"] not in "".join(bodies) for other in vms.values() if other is not vm)
        events = await _events(cloud, vm["id"])
        assert [e["kind"] for e in events].count("lease_warning") == 2
        acted = [e for e in events if e["kind"] == "lease_action"]
        assert len(acted) == 1 and "the lease ended" in acted[0]["message"]
        q = (await cloud.client.get("/api/v1/quotas", headers=user)).json()
        assert {k: v["usage"] for k, v in q.items()} == expected_usage(state), on_expiry
        assert all(v["pending"] == 0 for v in q.values())

        async def hooked(receiver: HookReceiver = receiver, state: str = state) -> bool:
            return any(d.body["kind"] == "server.state" and d.body["data"]["to"] == state for d in receiver.deliveries)

        await cloud.until(f"the webhook deliveries of {on_expiry}", hooked)
        assert all(d.valid for d in receiver.deliveries)
        assert receiver.kinds().count("lease.warning") == 2
        assert {d.body["server_id"] for d in receiver.deliveries} == {vm["id"]}
        kinds = receiver.kinds()
        assert kinds.index("lease.warning") < kinds.index("lease.action")  # in the order they happened
        states = [d.body["data"]["to"] for d in receiver.deliveries if d.body["kind"] == "server.state"]
        assert states == ["BUILD", "STARTED", state], states
        await receiver.stop()


async def test_a_renewal_moves_the_end_re_arms_the_warnings_and_prevents_the_action(
    mail_cloud: Cloud, inbox: Inbox
) -> None:
    cloud = mail_cloud
    project = await _policy(cloud, duration_s=6, warn_before_s=[4], on_expiry="destroy")
    user = await _user(cloud, project)
    vm = await _vm(cloud, user)
    first = await _mails(cloud, inbox, 1)
    assert "Leases ending in 4 seconds" in first[0]
    r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/lease", headers=user, json={})
    assert r.status_code == 200, r.text
    new_end = r.json()["lease_expires_at"]
    assert new_end > vm["lease_expires_at"]
    # The old end passes; the VM lives, and the warning of the new end is mailed.
    second = await _mails(cloud, inbox, 2)
    assert "Leases ending in 4 seconds" in second[1] and new_end[:19] in second[1].replace(" ", "T")
    s = await cloud.server(vm["id"])
    assert s["operstate"] == "STARTED" and s["lease_expires_at"] == new_end
    assert not [e for e in await _events(cloud, vm["id"]) if e["kind"] == "lease_action"]
    # An admin lifts it far away: no further mail for this end.
    far = "2099-01-01T00:00:00+00:00"
    r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/lease", headers=ADMIN, json={"expires_at": far})
    assert r.status_code == 200


@pytest.fixture(params=["embedded", "production"])
async def no_mail_server_yet(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Cloud, Inbox]]:
    inbox = Inbox(free_port())  # not started: connections are refused
    async with inprocess_cloud(request, tmp_path, **_mail_settings(inbox.port)) as c:
        yield c, inbox
    inbox.stop()


async def test_a_mail_server_that_is_down_delays_mail_never_the_lease(
    no_mail_server_yet: tuple[Cloud, Inbox],
) -> None:
    cloud, inbox = no_mail_server_yet
    # The warning is due from the start (warned as long before the end as the lease lasts), so
    # any lease pass before the end records it: a machine that holds the pass back for seconds
    # (a real guest booting beside it) cannot skip it, as it could skip a 2-second window.
    project = await _policy(cloud, duration_s=4, warn_before_s=[4], on_expiry="stop")
    user = await _user(cloud, project)
    vm = await _vm(cloud, user)
    end = vm["lease_expires_at"]

    async def stopped() -> bool:
        return (await cloud.server(vm["id"]))["operstate"] == "STOPPED"

    await cloud.until("the lease's end, mail server or not", stopped, timeout=20)
    events = await _events(cloud, vm["id"])
    acted = next(e for e in events if e["kind"] == "lease_action")
    late = datetime.fromisoformat(acted["created_at"]) - datetime.fromisoformat(end)
    # On time, though no mail could go. A lease that waited on the mail server would not have
    # stopped at all: the server only starts below. The bound leaves room for a loaded CI machine
    # holding the lease pass (every 0.2 s) back: 3.96 s was seen with a real guest booting beside it.
    assert timedelta(0) <= late < timedelta(seconds=8), late
    assert not inbox.messages
    inbox.start()  # the mail server comes back: what was owed arrives (backed off), each once
    warned, ended = "Leases ending in 4 seconds", "were stopped at their lease's end"

    async def both() -> bool:
        text = "\n".join(inbox.bodies())
        return warned in text and ended in text

    try:
        await cloud.until("the owed mail", both, timeout=30)
    except AssertionError as exc:  # say what did arrive and what was recorded
        kinds = [e["kind"] for e in await _events(cloud, vm["id"])]
        raise AssertionError(f"{exc}; mailed: {inbox.bodies()}; events: {kinds}") from exc
    await asyncio.sleep(1.0)
    text = "\n".join(inbox.bodies())
    assert text.count(warned) == 1 and text.count(ended) == 1, text


async def test_a_failing_webhook_is_retried_with_backoff_then_disabled_and_others_go_on(
    mail_cloud: Cloud, inbox: Inbox
) -> None:
    cloud = mail_cloud
    project = await _policy(cloud, duration_s=None)
    receiver = HookReceiver(SECRET, status=500, hang=0.5)
    r = await cloud.client.put("/api/v1/webhook", headers=ADMIN, json={"url": await receiver.start(), "secret": SECRET})
    assert r.status_code == 200, r.text
    user = await _user(cloud, project)
    started = time.monotonic()
    vm = await _vm(cloud, user)  # other work goes on while the receiver fails slowly
    assert time.monotonic() - started < 15

    async def disabled() -> dict[str, Any] | None:
        hook = (await cloud.client.get("/api/v1/webhook", headers=ADMIN)).json()
        return hook if not hook["enabled"] else None

    hook = await cloud.until("the webhook to be disabled", disabled, timeout=30)
    assert hook["failures"] == 3 and "500" in hook["disabled_reason"] and hook["pending"] == 0
    assert len(receiver.deliveries) == 3 and all(d.valid for d in receiver.deliveries)
    # The same (oldest) event each time, later and later.
    assert len({d.body["id"] for d in receiver.deliveries}) == 1
    gaps = [b.at - a.at for a, b in zip(receiver.deliveries, receiver.deliveries[1:], strict=False)]
    assert gaps[0] >= 0.1 + 0.5 and gaps[1] >= 0.2 + 0.5, gaps
    # The project's users with an address are told.
    bodies = await _mails(cloud, inbox, 1)
    assert "webhook" in bodies[0] and "disabled after 3 failed deliveries" in bodies[0]
    # Nothing more is sent to a disabled webhook; PUT re-enables it and new events flow.
    receiver.status, receiver.hang = 200, 0.0
    await _act(cloud, vm["id"], "stop")
    await asyncio.sleep(1.0)
    assert len(receiver.deliveries) == 3
    r = await cloud.client.put("/api/v1/webhook", headers=ADMIN, json={"url": receiver_url(receiver), "secret": SECRET})
    assert r.json()["enabled"] and r.json()["failures"] == 0
    await _act(cloud, vm["id"], "start")

    async def flowing() -> bool:
        return any(d.body["data"]["to"] == "STARTED" for d in receiver.deliveries[3:])

    await cloud.until("deliveries after re-enabling", flowing)
    await receiver.stop()


def receiver_url(receiver: HookReceiver) -> str:
    return f"http://127.0.0.1:{receiver.port}/hook"


async def test_webhook_and_notify_test_refusals(mail_cloud: Cloud, inbox: Inbox) -> None:
    cloud = mail_cloud
    assert (await cloud.client.get("/api/v1/webhook", headers=ADMIN)).status_code == 404
    bad = await cloud.client.put("/api/v1/webhook", headers=ADMIN, json={"url": "ftp://x", "secret": SECRET})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "BadRequest"
    short = await cloud.client.put("/api/v1/webhook", headers=ADMIN, json={"url": "http://x/y", "secret": "short"})
    assert short.status_code == 422  # the schema's minimum length
    project = (await cloud.client.get("/api/v1/lease-policy", headers=ADMIN)).json()["project_id"]
    user = await _user(cloud, project, "bob")
    other = await cloud.client.put(
        "/api/v1/webhook",
        headers=user,
        params={"project_id": "00000000-0000-0000-0000-000000000001"},
        json={"url": "http://x/y", "secret": SECRET},
    )
    assert other.status_code == 403
    nowhere = await cloud.client.put(
        "/api/v1/webhook",
        headers=ADMIN,
        params={"project_id": "00000000-0000-0000-0000-000000000001"},
        json={"url": "http://x/y", "secret": SECRET},
    )
    assert nowhere.status_code == 404
    # notify-test: the admin has no address, so one is named; the mail arrives.
    assert (await cloud.client.post("/api/v1/admin/notify-test", headers=ADMIN, json={})).status_code == 400
    r = await cloud.client.post("/api/v1/admin/notify-test", headers=ADMIN, json={"to": "ops@example.org"})
    assert r.status_code == 200 and r.json()["to"] == "ops@example.org", r.text
    await _mails(cloud, inbox, 1)
    assert inbox.messages[0]["To"] == "ops@example.org"
    assert (await cloud.client.post("/api/v1/admin/notify-test", headers=user, json={})).status_code == 403
    inbox.stop()
    down = await cloud.client.post("/api/v1/admin/notify-test", headers=ADMIN, json={"to": "ops@example.org"})
    assert down.status_code == 503 and down.json()["error"]["code"] == "Unavailable"
