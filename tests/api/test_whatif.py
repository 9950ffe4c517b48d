"""What-if agrees with reality, on both databases: hypothesis draws plans (creates of every
flavor and count, and every action on VMs in every state), each is checked with
``POST /api/v1/quotas/check`` and then executed, step by step, through the real REST calls.
Every step predicted to pass passes, every step predicted to fail fails with the predicted
code -- quotas near their limits and two small hosts make both common. And the check leaves
nothing behind."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.models import Job, Server, StreamEvent, table_of
from app.settings import HostSpec
from tests.conftest import Cloud, start_cloud, stop_cloud

FLAVORS = ["tiny", "small", "medium", "large"]
SIMPLE = ["start", "stop", "reboot", "suspend", "resume", "destroy", "release"]
# Near-full quotas and two small hosts (8 vCPUs, 6 GiB each with the default ratios... see the
# fixture): refusals for quota, for room and for state all come up.
LIMITS = {"vm": 5, "cpu": 6, "ram": 8192, "disk": 200, "active_cpu": 4, "active_ram": 6144}
_jobs, _servers, _stream = table_of(Job), table_of(Server), table_of(StreamEvent)

STEP = st.one_of(
    st.fixed_dictionaries(
        {"action": st.just("create"), "flavor": st.sampled_from(FLAVORS), "count": st.integers(1, 3)}
    ),
    st.fixed_dictionaries({"action": st.sampled_from(SIMPLE), "vm": st.integers(0, 2)}),
    st.fixed_dictionaries({"action": st.just("resize"), "vm": st.integers(0, 2), "flavor": st.sampled_from(FLAVORS)}),
)


@pytest.fixture
async def small_cloud(db_url: str) -> AsyncIterator[Cloud]:
    cloud, manager = await start_cloud(db_url, hosts=[HostSpec("wi-1", 2, 3072), HostSpec("wi-2", 2, 3072)])
    try:
        yield cloud
    finally:
        await stop_cloud(cloud, manager)


async def _vms(cloud: Cloud, user: dict[str, str]) -> list[str]:
    """Three VMs in three states: STARTED, STOPPED, on HOLD (each idle)."""
    ids = []
    for hold in (False, False, True):
        r = await cloud.client.post(
            "/api/v1/servers",
            headers=user,
            json={"name": "w", "flavor": "tiny", "image": "debian-12", "hold": hold},
        )
        assert r.status_code == 202, r.text
        body = r.json()
        ids.append(body["servers"][0]["id"])
        for job in body["job_ids"]:
            await cloud.finish(job)
    stop = await cloud.act(user, ids[1], "stop")
    await cloud.finish(stop["job_id"])
    return ids


def _request(step: dict[str, Any], vms: list[str]) -> dict[str, Any]:
    if step["action"] == "create":
        return {"action": "create", "flavor": step["flavor"], "count": step["count"], "image": "debian-12"}
    out = {"action": step["action"], "server_id": vms[step["vm"]]}
    if step["action"] == "resize":
        out["flavor"] = step["flavor"]
    return out


async def _execute(cloud: Cloud, user: dict[str, str], step: dict[str, Any]) -> str | None:
    """Run one step for real; its error code, or None when accepted."""
    if step["action"] == "create":
        body = {"name": "real", "flavor": step["flavor"], "count": step["count"], "image": step["image"]}
        r = await cloud.client.post("/api/v1/servers", headers=user, json=body)
    else:
        extra = {"flavor": step["flavor"]} if step["action"] == "resize" else {}
        r = await cloud.client.post(
            f"/api/v1/servers/{step['server_id']}/actions", headers=user, json={"action": step["action"], **extra}
        )
    if r.status_code in (200, 202):
        return None
    return str(r.json()["error"]["code"])


async def _clear(cloud: Cloud, project_id: str) -> None:
    """Every VM of the project destroyed, every job finished: the hosts' room comes back."""
    async with cloud.sessions() as s:
        live = list(
            await s.scalars(
                sa.select(_jobs.c.id)
                .join(_servers, _servers.c.id == _jobs.c.server_id)
                .where(_servers.c.project_id == uuid.UUID(project_id), _jobs.c.status.in_(["PENDING", "SENT"]))
            )
        )
    for job in live:
        await cloud.finish(str(job))
    async with cloud.sessions() as s:
        ids = list(
            await s.scalars(
                sa.select(_servers.c.id).where(
                    _servers.c.project_id == uuid.UUID(project_id), _servers.c.operstate != "DESTROYED"
                )
            )
        )
    for sid in ids:
        r = await cloud.client.post(f"/api/v1/servers/{sid}/actions", headers=cloud.admin, json={"action": "destroy"})
        if r.status_code == 202 and r.json().get("job_id"):
            await cloud.finish(r.json()["job_id"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(STEP, min_size=1, max_size=5))
async def test_every_would_pass_passes_and_every_would_fail_fails_with_its_code(
    small_cloud: Cloud, plan: list[dict[str, Any]]
) -> None:
    cloud = small_cloud
    user = await cloud.user(**LIMITS)
    project_id = user["X-Project"]
    vms = await _vms(cloud, user)
    steps = [_request(step, vms) for step in plan]
    async with cloud.sessions() as s:
        before = {
            t: (await s.execute(sa.select(sa.func.count()).select_from(t))).scalar_one()
            for t in (_jobs, _servers, _stream)
        }
    r = await cloud.client.post("/api/v1/quotas/check", headers=user, json={"plan": steps})
    assert r.status_code == 200, r.text
    answer = r.json()
    async with cloud.sessions() as s:  # the check left nothing behind
        for t, n in before.items():
            assert (await s.execute(sa.select(sa.func.count()).select_from(t))).scalar_one() == n, t.name
    actual = [await _execute(cloud, user, step) for step in steps]
    predicted = [v["code"] for v in answer["steps"]]
    assert predicted == actual, (steps, answer["steps"])
    assert answer["ok"] == all(code is None for code in actual)
    assert answer["placement"]["ok"] == ("NoCapacity" not in actual)
    quotas = (await cloud.client.get("/api/v1/quotas", headers=user)).json()
    for resource, q in answer["quotas"].items():  # the plan, once accepted, is where usage stands
        assert q["after"] == quotas[resource]["usage"] + quotas[resource]["pending"], resource
    await _clear(cloud, project_id)


async def test_the_check_answers_headroom_and_room_and_refuses_bad_plans(cloud: Cloud) -> None:
    user = await cloud.user(vm=2, cpu=2)
    r = await cloud.client.post(
        "/api/v1/quotas/check",
        headers=user,
        json={"plan": [{"action": "create", "flavor": "small"}, {"action": "create", "flavor": "small", "count": 2}]},
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [s["ok"] for s in answer["steps"]] == [True, False] and answer["steps"][1]["code"] == "OverLimit"
    assert answer["steps"][1]["details"]["resource"] in ("vm", "cpu")
    vm = answer["quotas"]["vm"]
    assert (vm["limit"], vm["usage"], vm["headroom_before"], vm["after"], vm["headroom_after"]) == (2, 0, 2, 1, 1)
    assert answer["placement"]["ok"] and answer["placement"]["zones"] and answer["placement"]["hosts"] == {}
    zone = next(iter(answer["placement"]["zones"].values()))
    assert zone["vcpus_free_after"] == zone["vcpus_free"] - 1
    admin = await cloud.client.post(
        "/api/v1/quotas/check", headers=cloud.admin, json={"plan": [{"action": "create", "flavor": "tiny"}]}
    )
    assert admin.status_code == 200 and admin.json()["placement"]["hosts"]  # admins see the hosts
    for bad, status in (
        ({"plan": []}, 422),
        ({"plan": [{"action": "explode"}]}, 422),
        ({"plan": [{"action": "start"}]}, 200),  # no server: that step is refused, with its code
    ):
        r = await cloud.client.post("/api/v1/quotas/check", headers=user, json=bad)
        assert r.status_code == status, (bad, r.text)
    assert r.json()["steps"][0]["code"] == "BadRequest"
    stranger = await cloud.user()
    r = await cloud.client.post(
        "/api/v1/quotas/check",
        headers=stranger,
        json={"plan": [{"action": "stop", "server_id": str(uuid.uuid4())}]},
    )
    assert r.json()["steps"][0]["code"] == "NotFound"
