"""The operstate table: which action may run from which state, and what follows.

Rules, in prose (DESIGN.md "The state machine"):

* A VM has at most one pending task. While one is pending every action is
  refused with ``TaskPending`` -- except ``destroy``, which is always accepted
  and supersedes the task. A second ``destroy`` while one is pending is not a
  new job: it answers with the pending destroy's job (a retried DELETE).
* An action not allowed from the VM's operstate is refused with
  ``InvalidState``; ``destroy`` is allowed from every state but DESTROYED.
* ``on_accept`` is the operstate the VM takes when the action is accepted
  (create goes to BUILD, or HOLD when asked; release goes to BUILD); every
  other action leaves the operstate alone until its job's result arrives.
* ``on_success`` / ``on_failure`` are the operstate after the job's result;
  ``None`` means unchanged.
* Commissions are the difference of two footprints, computed from the VM's
  state *before* the change: what the VM counts against its project's quota
  in the state it will reach, minus what it counts now. Create's and
  release's commissions are accepted at once (``commit_at_once``): the VM
  counts, active resources included, whether the build ends in STARTED or
  ERROR. Every other commission is pending until the job's result.
* A VM counts ``vm``, ``cpu``, ``ram`` and ``disk`` in every state but
  DESTROYED, and ``active_cpu`` / ``active_ram`` while it holds a host's CPU
  and memory: BUILD, STARTED, SUSPENDED, ERROR.

This module is the only place these rules are written down; the API's
refusals, the dispatcher's transitions and the docs all read ``TABLE``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from enum import StrEnum

from app.logic.errors import InvalidState, TaskPending
from app.messages import Action as Action  # the actions are named as the job messages name them


class Operstate(StrEnum):
    HOLD = "HOLD"
    BUILD = "BUILD"
    STARTED = "STARTED"
    STOPPED = "STOPPED"
    SUSPENDED = "SUSPENDED"
    ERROR = "ERROR"
    DESTROYED = "DESTROYED"


class Task(StrEnum):
    """A VM's pending task, named by its action (create and release both build)."""

    BUILD = "BUILD"
    START = "START"
    STOP = "STOP"
    REBOOT = "REBOOT"
    SUSPEND = "SUSPEND"
    RESUME = "RESUME"
    RESIZE = "RESIZE"
    MIGRATE = "MIGRATE"
    LIVE_MIGRATE = "LIVE_MIGRATE"
    SAVE_IMAGE = "SAVE_IMAGE"
    CONSOLE = "CONSOLE"
    FIREWALL = "FIREWALL"
    PUBLIC_IP = "PUBLIC_IP"
    DESTROY = "DESTROY"


S = Operstate
T = Task
ALL_LIVE = frozenset(s for s in Operstate if s is not S.DESTROYED)
ACTIVE = frozenset({S.BUILD, S.STARTED, S.SUSPENDED, S.ERROR})


@dataclass(frozen=True)
class Rule:
    task: Task
    allowed_from: frozenset[Operstate]
    on_accept: Operstate | None
    on_success: Operstate | None
    on_failure: Operstate | None
    commit_at_once: bool = False
    changes_flavor: bool = False
    admin_only: bool = False


TABLE: dict[Action, Rule] = {
    #                     task            allowed from                 on accept  on success   on failure
    Action.CREATE: Rule(T.BUILD, frozenset(), S.BUILD, S.STARTED, S.ERROR, commit_at_once=True),
    Action.RELEASE: Rule(T.BUILD, frozenset({S.HOLD}), S.BUILD, S.STARTED, S.ERROR, commit_at_once=True),
    Action.START: Rule(T.START, frozenset({S.STOPPED}), None, S.STARTED, None),
    Action.STOP: Rule(T.STOP, frozenset({S.STARTED, S.SUSPENDED}), None, S.STOPPED, None),
    Action.REBOOT: Rule(T.REBOOT, frozenset({S.STARTED}), None, S.STARTED, None),
    Action.SUSPEND: Rule(T.SUSPEND, frozenset({S.STARTED}), None, S.SUSPENDED, None),
    Action.RESUME: Rule(T.RESUME, frozenset({S.SUSPENDED}), None, S.STARTED, None),
    Action.RESIZE: Rule(T.RESIZE, frozenset({S.STOPPED}), None, S.STOPPED, None, changes_flavor=True),
    Action.MIGRATE: Rule(T.MIGRATE, frozenset({S.STOPPED}), None, None, None, admin_only=True),
    Action.LIVE_MIGRATE: Rule(T.LIVE_MIGRATE, frozenset({S.STARTED}), None, None, None, admin_only=True),
    Action.SAVE_IMAGE: Rule(T.SAVE_IMAGE, frozenset({S.STARTED, S.STOPPED}), None, S.STOPPED, None),
    Action.CONSOLE: Rule(T.CONSOLE, frozenset({S.STARTED}), None, None, None),
    Action.FIREWALL: Rule(T.FIREWALL, frozenset({S.STARTED, S.STOPPED, S.SUSPENDED}), None, None, None),
    Action.PUBLIC_IP: Rule(T.PUBLIC_IP, frozenset({S.STARTED, S.STOPPED, S.SUSPENDED}), None, None, None),
    Action.DESTROY: Rule(T.DESTROY, ALL_LIVE, None, S.DESTROYED, None),
}


@dataclass(frozen=True)
class Deltas:
    """Quota resource amounts (a footprint, or the change between two)."""

    vm: int = 0
    cpu: int = 0
    ram: int = 0
    disk: int = 0
    active_cpu: int = 0
    active_ram: int = 0
    public_ip: int = 0  # held by the project whether or not a VM uses it (``logic.public_ips``)

    def __add__(self, other: Deltas) -> Deltas:
        return Deltas(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def __sub__(self, other: Deltas) -> Deltas:
        return Deltas(*(a - b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def __mul__(self, n: int) -> Deltas:
        return Deltas(*(a * n for a in self.as_tuple()))

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def is_zero(self) -> bool:
        return not any(self.as_tuple())


RESOURCES: tuple[str, ...] = tuple(f.name for f in fields(Deltas))


def footprint(state: Operstate | None, vcpus: int, ram_mb: int, disk_gb: int) -> Deltas:
    """What a VM in ``state`` counts against its project (``None``: not yet a VM)."""
    if state is None or state is S.DESTROYED:
        return Deltas()
    active = state in ACTIVE
    return Deltas(
        vm=1,
        cpu=vcpus,
        ram=ram_mb,
        disk=disk_gb,
        active_cpu=vcpus if active else 0,
        active_ram=ram_mb if active else 0,
    )


@dataclass(frozen=True)
class Decision:
    """What accepting ``action`` means for a VM: a new task, or the pending destroy again."""

    rule: Rule
    supersedes: str | None = None  # the task a destroy overtakes
    repeat_of_pending: bool = False  # destroy while destroy is pending


def decide(action: Action, operstate: Operstate, task: str | None, task_job_id: object = None) -> Decision:
    """Check ``action`` against the VM's operstate and pending task, or raise the refusal."""
    rule = TABLE[action]
    if action is Action.DESTROY:
        if task == rule.task:
            return Decision(rule, repeat_of_pending=True)
        if operstate not in rule.allowed_from:
            raise _invalid(action, operstate, rule)
        return Decision(rule, supersedes=task)
    if task is not None:
        raise TaskPending(
            f"task {task} is pending on this server",
            task=task,
            job_id=str(task_job_id) if task_job_id is not None else None,
        )
    if operstate not in rule.allowed_from:
        raise _invalid(action, operstate, rule)
    return Decision(rule)


def _invalid(action: Action, operstate: Operstate, rule: Rule) -> InvalidState:
    allowed = sorted(rule.allowed_from)
    return InvalidState(
        f"{action.value} is not allowed in operstate {operstate.value}",
        operstate=operstate.value,
        allowed_from=[s.value for s in allowed],
    )


def target_state(action: Action, before: Operstate, success: bool) -> Operstate:
    rule = TABLE[action]
    after = rule.on_success if success else rule.on_failure
    return before if after is None else after


#: What a VM's owner may ask of it by name: firewall and public-IP jobs come from their own calls,
#: migrations are an admin's.
OFFERED = (
    Action.RELEASE,
    Action.START,
    Action.STOP,
    Action.REBOOT,
    Action.SUSPEND,
    Action.RESUME,
    Action.RESIZE,
    Action.SAVE_IMAGE,
    Action.CONSOLE,
    Action.DESTROY,
)


def offered(operstate: Operstate, task: str | None) -> list[Action]:
    """The actions the table accepts now from a VM in ``operstate`` with ``task`` pending (what
    a console offers; a destroy already pending is not offered again)."""
    return list(_offered(operstate, task))


@functools.cache
def _offered(operstate: Operstate, task: str | None) -> tuple[Action, ...]:
    # The table is fixed: each (state, task) pair is decided once per process, not once per VM
    # of every listed page.
    out = []
    for action in OFFERED:
        try:
            decision = decide(action, operstate, task)
        except (InvalidState, TaskPending):
            continue
        if not decision.repeat_of_pending:
            out.append(action)
    return tuple(out)
