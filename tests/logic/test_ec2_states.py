"""The AWS state names, without a server: ``ec2.STATE`` (SQL) and ``ec2.state_of`` (Python) give
the same name for every operstate and task, and the names are EC2.md's mapping, written out
here rather than derived from ``STATE_RULES``."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy as sa

from app.logic import ec2
from app.logic.operstate import Operstate, Task
from app.models import Server, table_of

S, T = Operstate, Task

#: EC2.md: HOLD/BUILD -> pending; STARTED (a reboot included) -> running; a pending destroy ->
#: shutting-down; DESTROYED -> terminated; a pending stop -> stopping; STOPPED, SUSPENDED, ERROR
#: -> stopped. A start or resume under way shows pending; saving an image of a running VM
#: stops it first, so it shows stopping.
BY_OPERSTATE = {
    S.HOLD: "pending",
    S.BUILD: "pending",
    S.STARTED: "running",
    S.STOPPED: "stopped",
    S.SUSPENDED: "stopped",
    S.ERROR: "stopped",
    S.DESTROYED: "terminated",
}


def expected(operstate: Operstate, task: Task | None) -> str:
    if operstate is S.DESTROYED:
        return "terminated"
    if task is T.DESTROY:
        return "shutting-down"
    if operstate in (S.HOLD, S.BUILD) or task in (T.START, T.RESUME):
        return "pending"
    if task is T.STOP or (task is T.SAVE_IMAGE and operstate is S.STARTED):
        return "stopping"
    return BY_OPERSTATE[operstate]


CASES = list(itertools.product(Operstate, [None, *Task]))


@pytest.mark.parametrize(("operstate", "task"), CASES, ids=[f"{o.value}-{t.value if t else 'none'}" for o, t in CASES])
def test_state_of_is_the_mapping(operstate: Operstate, task: Task | None) -> None:
    assert ec2.state_of(operstate.value, task.value if task else None) == expected(operstate, task)


def test_the_sql_expression_and_the_python_function_agree() -> None:
    servers = table_of(Server)
    engine = sa.create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE servers (operstate TEXT, task TEXT)"))
        conn.execute(
            sa.text("INSERT INTO servers VALUES (:o, :t)"),
            [{"o": o.value, "t": t.value if t else None} for o, t in CASES],
        )
        found = conn.execute(sa.select(servers.c.operstate, servers.c.task, ec2.STATE)).all()
    assert len(found) == len(CASES)
    for operstate, task, state in found:
        assert state == ec2.state_of(operstate, task), (operstate, task)
