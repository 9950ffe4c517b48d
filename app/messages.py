"""Message schemas: the one module the API, the dispatcher and the agents all import.

Every message carries ``v`` (the schema version) and ``kind`` (what it is). Jobs flow
from the control plane to one host's agent; everything else flows from agents to the
dispatchers on the results queue. Agents stamp every event about a VM with ``seq``, a
per-VM number that only grows, so the dispatcher can drop what is older than what it
already applied (a wall clock is not an order).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

VERSION = 1


class Action(StrEnum):
    """What a job asks an agent to do: the operstate table's actions (``logic.operstate.TABLE``
    says when each is allowed and where it leads), by the names the job messages carry."""

    CREATE = "create"
    RELEASE = "release"
    START = "start"
    STOP = "stop"
    REBOOT = "reboot"
    SUSPEND = "suspend"
    RESUME = "resume"
    RESIZE = "resize"
    MIGRATE = "migrate"
    LIVE_MIGRATE = "live_migrate"
    SAVE_IMAGE = "save_image"
    CONSOLE = "console"
    FIREWALL = "firewall"
    PUBLIC_IP = "public_ip"
    DESTROY = "destroy"


#: An untracked job (no row, no operstate rule): put Nephos's mark on a domain an admin adopted.
MARK = "mark"

#: Domain states as the agent observes them.
DomainState = Literal["running", "paused", "shutoff", "crashed", "missing", "other"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    v: int = VERSION


class JobMessage(_Message):
    """A job for the agent of ``host``. ``params`` holds everything the agent needs."""

    kind: Literal["job"] = "job"
    job_id: uuid.UUID
    server_id: uuid.UUID
    action: str
    host: str
    params: dict[str, Any] = {}


class JobStatus(_Message):
    """Progress or outcome of a job, from the agent that ran it."""

    kind: Literal["job_status"] = "job_status"
    job_id: uuid.UUID
    server_id: uuid.UUID
    host: str
    status: Literal["RUNNING", "SUCCESS", "ERROR"]
    error: str | None = None
    domain_state: DomainState | None = None
    seq: int
    details: dict[str, Any] = {}


class StateChange(_Message):
    """A domain changed state and no job asked for it (guest shutdown, crash, operator)."""

    kind: Literal["state_change"] = "state_change"
    server_id: uuid.UUID
    host: str
    domain_state: DomainState
    seq: int
    reason: str = ""


class DomainInfo(BaseModel):
    """One domain on a host. ``server_id`` is the domain's UUID; ``owned`` says the domain
    carries Nephos's mark (metadata in its namespace naming that same id): only those may be
    repaired without an admin asking. An older agent's report says nothing of the mark, and
    its domains are treated as foreign (the safe side)."""

    model_config = ConfigDict(frozen=True)
    server_id: uuid.UUID
    state: DomainState
    vcpus: int
    ram_mb: int
    name: str = ""
    owned: bool = False
    # The firewall generation the host enforces on it (None: it records none).
    firewall_gen: int | None = None


class Inventory(_Message):
    """Everything a host runs, with its capacity; sent on start, periodically and when asked."""

    kind: Literal["inventory"] = "inventory"
    host: str
    zone: str
    cpus: int
    ram_mb: int
    domains: list[DomainInfo]
    taken_at: datetime
    request_id: str | None = None


class Heartbeat(_Message):
    """The agent of ``host`` is alive; the first one registers the host."""

    kind: Literal["heartbeat"] = "heartbeat"
    host: str
    zone: str
    cpus: int
    ram_mb: int
    sent_at: datetime
    # How peers' libvirt reaches this host for migrations, and which libvirt driver it runs.
    migration_uri: str | None = None
    hypervisor: str | None = None


class InventoryRequest(_Message):
    """Asks an agent for a fresh ``Inventory`` (sent on the host's job queue)."""

    kind: Literal["inventory_request"] = "inventory_request"
    request_id: str


class PeerTransfer(_Message):
    """Migration between agents whose driver cannot migrate by itself (libvirt's test driver):
    the source hands the domain's definition to the target's agent."""

    kind: Literal["peer_transfer"] = "peer_transfer"
    job_id: uuid.UUID
    server_id: uuid.UUID
    source: str
    domain_xml: str
    start: bool


class PeerAck(_Message):
    """The target's answer to a ``PeerTransfer``, on the source's job queue."""

    kind: Literal["peer_ack"] = "peer_ack"
    job_id: uuid.UUID
    ok: bool
    error: str | None = None


Result = Annotated[JobStatus | StateChange | Inventory | Heartbeat, Field(discriminator="kind")]
ToAgent = Annotated[JobMessage | InventoryRequest | PeerTransfer | PeerAck, Field(discriminator="kind")]
RESULT: TypeAdapter[JobStatus | StateChange | Inventory | Heartbeat] = TypeAdapter(Result)
TO_AGENT: TypeAdapter[JobMessage | InventoryRequest | PeerTransfer | PeerAck] = TypeAdapter(ToAgent)


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()
