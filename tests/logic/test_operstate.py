"""The operstate table, entry by entry, without a database.

Expectations are written out here from DESIGN.md's table, not derived from
``TABLE``, so a wrong entry in the code fails a test.
"""

from __future__ import annotations

import itertools

import pytest

from app.logic.errors import InvalidState, TaskPending
from app.logic.operstate import TABLE, Action, Deltas, Operstate, decide, footprint, target_state

A, S = Action, Operstate
LIVE = [s for s in S if s is not S.DESTROYED]

ALLOWED = {
    A.RELEASE: {S.HOLD},
    A.START: {S.STOPPED},
    A.STOP: {S.STARTED, S.SUSPENDED},
    A.REBOOT: {S.STARTED},
    A.SUSPEND: {S.STARTED},
    A.RESUME: {S.SUSPENDED},
    A.RESIZE: {S.STOPPED},
    A.MIGRATE: {S.STOPPED},
    A.LIVE_MIGRATE: {S.STARTED},
    A.SAVE_IMAGE: {S.STARTED, S.STOPPED},
    A.CONSOLE: {S.STARTED},
    A.FIREWALL: {S.STARTED, S.STOPPED, S.SUSPENDED},
    A.PUBLIC_IP: {S.STARTED, S.STOPPED, S.SUSPENDED},
    A.DESTROY: set(LIVE),
}
# (on success, on failure); None = unchanged
OUTCOME = {
    A.CREATE: (S.STARTED, S.ERROR),
    A.RELEASE: (S.STARTED, S.ERROR),
    A.START: (S.STARTED, None),
    A.STOP: (S.STOPPED, None),
    A.REBOOT: (S.STARTED, None),
    A.SUSPEND: (S.SUSPENDED, None),
    A.RESUME: (S.STARTED, None),
    A.RESIZE: (S.STOPPED, None),
    A.MIGRATE: (None, None),
    A.LIVE_MIGRATE: (None, None),
    A.SAVE_IMAGE: (S.STOPPED, None),
    A.CONSOLE: (None, None),
    A.FIREWALL: (None, None),
    A.PUBLIC_IP: (None, None),
    A.DESTROY: (S.DESTROYED, None),
}
TASKS = [None, "START", "DESTROY"]


def test_every_action_has_an_entry() -> None:
    assert set(TABLE) == set(A)
    assert set(OUTCOME) == set(A)


@pytest.mark.parametrize(("action", "state", "task"), list(itertools.product(sorted(ALLOWED), list(S), TASKS)))
def test_decide(action: Action, state: Operstate, task: str | None) -> None:
    allowed = state in ALLOWED[action]
    if action is A.DESTROY:
        if task == "DESTROY":
            decision = decide(action, state, task, "job-1")
            assert decision.repeat_of_pending
        elif not allowed:
            with pytest.raises(InvalidState) as err:
                decide(action, state, task)
            assert err.value.details["operstate"] == state.value
            assert set(err.value.details["allowed_from"]) == {s.value for s in LIVE}
        else:
            decision = decide(action, state, task)
            assert decision.supersedes == task
            assert not decision.repeat_of_pending
        return
    if task is not None:
        with pytest.raises(TaskPending) as pending:
            decide(action, state, task, "job-1")
        assert pending.value.details == {"task": task, "job_id": "job-1"}
    elif not allowed:
        with pytest.raises(InvalidState) as err:
            decide(action, state, task)
        assert err.value.details == {"operstate": state.value, "allowed_from": sorted(s.value for s in ALLOWED[action])}
    else:
        decision = decide(action, state, task)
        assert decision.rule is TABLE[action]
        assert decision.supersedes is None


@pytest.mark.parametrize(("action", "state", "success"), list(itertools.product(list(A), LIVE, [True, False])))
def test_target_state(action: Action, state: Operstate, success: bool) -> None:
    expected = OUTCOME[action][0 if success else 1]
    assert target_state(action, state, success) is (expected or state)


def test_tasks_and_accept_states() -> None:
    assert TABLE[A.CREATE].on_accept is S.BUILD and TABLE[A.CREATE].commit_at_once
    assert TABLE[A.RELEASE].on_accept is S.BUILD and TABLE[A.RELEASE].commit_at_once
    for action in set(A) - {A.CREATE, A.RELEASE}:
        assert TABLE[action].on_accept is None
        assert not TABLE[action].commit_at_once
    assert {a for a in A if TABLE[a].admin_only} == {A.MIGRATE, A.LIVE_MIGRATE}
    assert TABLE[A.LIVE_MIGRATE].task == "LIVE_MIGRATE"


FLAVOR = (2, 4096, 40)
FULL = Deltas(vm=1, cpu=2, ram=4096, disk=40, active_cpu=2, active_ram=4096)
IDLE = Deltas(vm=1, cpu=2, ram=4096, disk=40)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (None, Deltas()),
        (S.DESTROYED, Deltas()),
        (S.HOLD, IDLE),
        (S.STOPPED, IDLE),
        (S.BUILD, FULL),
        (S.STARTED, FULL),
        (S.SUSPENDED, FULL),
        (S.ERROR, FULL),
    ],
)
def test_footprint(state: Operstate | None, expected: Deltas) -> None:
    assert footprint(state, *FLAVOR) == expected


@pytest.mark.parametrize(
    ("action", "before", "delta"),
    [
        (A.CREATE, None, FULL),
        (A.RELEASE, S.HOLD, Deltas(active_cpu=2, active_ram=4096)),
        (A.START, S.STOPPED, Deltas(active_cpu=2, active_ram=4096)),
        (A.STOP, S.STARTED, Deltas(active_cpu=-2, active_ram=-4096)),
        (A.STOP, S.SUSPENDED, Deltas(active_cpu=-2, active_ram=-4096)),
        (A.SUSPEND, S.STARTED, Deltas()),
        (A.RESUME, S.SUSPENDED, Deltas()),
        (A.REBOOT, S.STARTED, Deltas()),
        (A.SAVE_IMAGE, S.STARTED, Deltas(active_cpu=-2, active_ram=-4096)),
        (A.SAVE_IMAGE, S.STOPPED, Deltas()),
        (A.DESTROY, S.STARTED, FULL * -1),
        (A.DESTROY, S.STOPPED, IDLE * -1),
        (A.DESTROY, S.HOLD, IDLE * -1),
    ],
)
def test_commission_is_the_footprint_change(action: Action, before: Operstate | None, delta: Deltas) -> None:
    rule = TABLE[action]
    after = rule.on_accept or rule.on_success or before
    assert footprint(after, *FLAVOR) - footprint(before, *FLAVOR) == delta
