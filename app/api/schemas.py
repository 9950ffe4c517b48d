"""Request and reply models of the REST API (API.md is the contract)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.logic.catalogue import Labels
from app.logic.hoststate import HostState
from app.logic.jobs import JobStatus
from app.logic.operstate import RESOURCES, Operstate, offered

T = TypeVar("T")
Id = Annotated[uuid.UUID, Field(strict=False)]


def _a_number(value: Any) -> Any:
    if isinstance(value, bool | str):
        raise ValueError("a number is needed")
    return value


def iso_8601(value: Any) -> Any:
    """A time is ISO 8601 text, as the document says (``format: date-time``), not a number."""
    if not isinstance(value, str | datetime) or (isinstance(value, str) and not re.match(r"^\d{4}-\d{2}-\d{2}", value)):
        raise ValueError("an ISO 8601 time is needed, e.g. 2026-01-31T12:00:00Z")
    return value


#: A time in a request: ISO 8601 text only.
When = Annotated[datetime, Field(strict=False), BeforeValidator(iso_8601)]

#: An integer as JSON Schema means it: 3 or 3.0, never true or "3" (request bodies are strict).
Int = Annotated[int, Field(strict=False), BeforeValidator(_a_number)]
Name = Annotated[str, Field(min_length=1, max_length=255)]
Metadata = Annotated[dict[str, Annotated[str, Field(max_length=1024)]], Field(max_length=128)]


def _no_nul(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL; refuse it here as a schema error, not a 500 there."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("NUL characters are not allowed")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_nul(k)
            _no_nul(v)
    elif isinstance(value, list):
        for v in value:
            _no_nul(v)
    return value


class Strict(BaseModel):
    """A request body: unknown fields and NUL characters are validation errors, and values are
    of the type the schema says (no ``true`` for a number, no ``"3"`` for an integer): what the
    OpenAPI document declares is exactly what is accepted. Ids stay lax (``Id``): JSON carries
    them as strings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_nul(cls, data: Any) -> Any:
        return _no_nul(data)


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")


# -- servers ------------------------------------------------------------------------


def _one_of_each(*pairs: tuple[str, str]) -> dict[str, Any]:
    """JSON Schema for "give this field or that one", for each pair (a name, or its id)."""
    return {
        "allOf": [
            {
                "anyOf": [
                    {"required": [a], "properties": {a: {"type": "string", "minLength": 1}}},
                    {"required": [b], "properties": {b: {"type": "string", "minLength": 1}}},
                ]
            }
            for a, b in pairs
        ]
    }


class ServerCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "web-1", "flavor": "small", "image": "debian-12"},
            ],
            **_one_of_each(("flavor", "flavor_id"), ("image", "image_id")),
        }
    )

    name: Name
    flavor_id: Id | None = None
    flavor: str | None = Field(default=None, description="A flavor name, instead of flavor_id")
    image_id: Id | None = None
    image: str | None = Field(default=None, description="An image name, instead of image_id")
    count: Int = Field(default=1, ge=1, le=100, description="How many VMs: all of them, or none")
    key_name: str | None = Field(default=None, max_length=255)
    user_data: str | None = Field(default=None, max_length=65536)
    metadata: Metadata = {}
    zone: str | None = Field(default=None, max_length=64)
    hold: bool = Field(default=False, description="Create in HOLD, unplaced, until released")
    networks: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        max_length=8,
        description="Networks (names or ids) to give the VM a NIC on, in order; default: the project's default network",
    )
    fixed_ip: str | None = Field(
        default=None,
        max_length=15,
        description="The first NIC's address, asked for (one VM only): 400 outside the network, 409 InUse if taken",
    )
    public_ip: bool | Id | None = Field(
        default=None,
        description="true: a new public address for each VM, from any pool (a unit of the public_ip quota "
        "each; it stays the project's when the VM is destroyed); or the id of an address the project holds, "
        "unassociated (one VM only)",
    )
    description: str = Field(default="", max_length=4096)

    @model_validator(mode="after")
    def _flavor_and_image(self) -> ServerCreate:
        # A missing field is a schema error (422 ValidationError), whichever of its two spellings.
        if self.flavor_id is None and not self.flavor:
            raise ValueError("give flavor_id or flavor (a flavor name, e.g. small)")
        if self.image_id is None and not self.image:
            raise ValueError("give image_id or image (an image name, e.g. debian-12)")
        return self


class MeOut(BaseModel):
    user_id: uuid.UUID | None
    project_id: uuid.UUID | None
    is_admin: bool


class AddressOut(BaseModel):
    network: str
    ip: str
    mac: str
    public_ip: str | None = None


class ServerOut(BaseModel):
    id: uuid.UUID
    name: str
    description: str
    project_id: uuid.UUID
    user_id: uuid.UUID
    flavor_id: uuid.UUID
    image_id: uuid.UUID
    host: str | None
    zone: str | None
    operstate: Operstate
    task: str | None
    task_job_id: uuid.UUID | None
    metadata: dict[str, Any]
    key_name: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    ec2_id: str = Field(description="The same VM's EC2 instance id (i-...)")
    flavor: str = Field(description="The flavor's name")
    image: str = Field(description="The image's name")
    addresses: list[AddressOut] = Field(default_factory=list, description="One per NIC, in order")
    actions: list[str] = Field(
        default_factory=list,
        description="The actions the operstate table accepts now (what a console offers; admins may also migrate)",
    )

    @classmethod
    def of(cls, s: Any, labels: Labels) -> ServerOut:
        # A listed page builds 100 of these: the row's loaded columns are read from its state
        # dict (an instrumented attribute read costs about ten times more) and the whole reply,
        # addresses included, is validated in one call.
        loaded = vars(s)
        data = {name: loaded[name] if name in loaded else getattr(s, name) for name in _SERVER_COLUMNS}
        data["metadata"] = loaded["meta"] if "meta" in loaded else s.meta
        data["actions"] = [a.value for a in offered(Operstate(data["operstate"]), data["task"])]
        data["flavor"] = labels.flavors.get(data["flavor_id"], "")
        data["image"] = labels.images.get(data["image_id"], "")
        data["addresses"] = [
            {"network": a.network, "ip": a.ip, "mac": a.mac, "public_ip": a.public_ip}
            for a in labels.addresses.get(data["id"], [])
        ]
        return cls.model_validate(data)


#: The fields of ``ServerOut`` read as they are from the server's row.
_SERVER_COLUMNS = tuple(
    name for name in ServerOut.model_fields if name not in ("metadata", "flavor", "image", "addresses", "actions")
)


class ServersCreated(BaseModel):
    servers: list[ServerOut]
    job_ids: list[uuid.UUID] = Field(description="One per VM that starts building (none for hold)")


class ServerPatch(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "web-2", "description": "the second web server", "metadata": {"team": "web"}},
            ]
        }
    )

    name: Name | None = None
    description: str | None = Field(default=None, max_length=4096)
    metadata: Metadata | None = None


class JobAccepted(BaseModel):
    job_id: uuid.UUID | None = Field(
        description="The action's job; for a DELETE of a server already destroyed, "
        "the job that destroyed it (null when none did: reconciliation)"
    )


class StartAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"action": "start"}]})
    action: Literal["start"]


class StopAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"action": "stop"}]})
    action: Literal["stop"]


class SuspendAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"action": "suspend"}]})
    action: Literal["suspend"]


class ResumeAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"action": "resume"}]})
    action: Literal["resume"]


class ReleaseAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"action": "release"}]})
    action: Literal["release"]


class DestroyAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"action": "destroy"}]})
    action: Literal["destroy"]


class ConsoleAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"action": "console"}]})
    action: Literal["console"]


class RebootAction(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"action": "reboot", "hard": False},
            ]
        }
    )

    action: Literal["reboot"]
    hard: bool = False


class ResizeAction(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"action": "resize", "flavor": "medium"},
            ],
            **_one_of_each(("flavor", "flavor_id")),
        }
    )

    action: Literal["resize"]
    flavor_id: Id | None = None
    flavor: str | None = Field(default=None, description="A flavor name, instead of flavor_id")

    @model_validator(mode="after")
    def _flavor(self) -> ResizeAction:
        if self.flavor_id is None and not self.flavor:
            raise ValueError("give flavor_id or flavor (a flavor name, e.g. medium)")
        return self


class MigrateAction(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"action": "migrate"},
            ]
        }
    )

    action: Literal["migrate"]
    host: str | None = Field(default=None, description="Target host; chosen by placement if null")


class LiveMigrateAction(MigrateAction):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"action": "live_migrate"},
            ]
        }
    )

    action: Literal["live_migrate"]  # type: ignore[assignment]


class SaveImageAction(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"action": "save_image", "image_name": "web-1-snapshot"},
            ]
        }
    )

    action: Literal["save_image"]
    image_name: Name


# One schema per action name, so the discriminator's mapping is one to one.
ActionBody = Annotated[
    StartAction
    | StopAction
    | SuspendAction
    | ResumeAction
    | ReleaseAction
    | DestroyAction
    | ConsoleAction
    | RebootAction
    | ResizeAction
    | MigrateAction
    | LiveMigrateAction
    | SaveImageAction,
    Field(discriminator="action"),
]


class ConsoleOut(BaseModel):
    type: Literal["vnc"] = "vnc"
    host: str
    port: int
    password: str
    url: str
    job_id: uuid.UUID


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    server_id: uuid.UUID
    job_id: uuid.UUID | None
    kind: str
    action: str | None
    operstate_from: str | None
    operstate_to: str | None
    message: str
    created_at: datetime


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    server_id: uuid.UUID
    action: str
    status: JobStatus
    error: str | None
    host: str | None
    domain_state: str | None = Field(description="The domain's state as the agent saw it after the job")
    details: dict[str, Any] | None = Field(
        description="What the agent reported of the job (a console's port, a saved image's size, a forced stop)"
    )
    created_at: datetime
    finished_at: datetime | None


# -- catalogue and quotas --------------------------------------------------------------


class FlavorOut(BaseModel):
    id: uuid.UUID
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    capacity: int = Field(description="How many more VMs of this flavor the hosts can take now")
    zones: dict[str, int] = Field(default_factory=dict, description="The same, per zone")


class FlavorCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "xlarge", "vcpus": 8, "ram_mb": 16384, "disk_gb": 160},
            ]
        }
    )

    name: Annotated[str, Field(min_length=1, max_length=64)]
    vcpus: Int = Field(gt=0, le=1024)
    ram_mb: Int = Field(gt=0, le=16 * 1024 * 1024)
    disk_gb: Int = Field(ge=0, le=1024 * 1024)


class ImageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    status: str
    size_bytes: int | None = Field(default=None, description="Bytes on disk, once saved (real hypervisors)")
    is_public: bool
    project_id: uuid.UUID | None
    disk_format: str
    source_server_id: uuid.UUID | None
    created_at: datetime


class ImageCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "alpine-3.20", "is_public": True, "disk_format": "qcow2"},
            ]
        }
    )

    name: Annotated[str, Field(min_length=1, max_length=128)]
    is_public: bool = True
    disk_format: Literal["qcow2", "raw"] = "qcow2"
    source_url: str = Field(default="", max_length=1024)


class ZoneOut(BaseModel):
    id: uuid.UUID
    name: str
    hosts: int
    hosts_up: int


class QuotaItem(BaseModel):
    limit: int
    usage: int
    pending: int = Field(description="Sum of the positive deltas of pending commissions")


class QuotasOut(BaseModel):
    vm: QuotaItem
    cpu: QuotaItem
    ram: QuotaItem = Field(description="MiB")
    disk: QuotaItem = Field(description="GiB")
    active_cpu: QuotaItem
    active_ram: QuotaItem = Field(description="MiB")
    public_ip: QuotaItem = Field(description="Public addresses allocated to the project")


# -- key pairs and credentials ------------------------------------------------------------


class KeyPairCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "laptop"},
            ]
        }
    )

    name: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.@ -]+$")]
    public_key: str | None = Field(default=None, max_length=16384)
    key_type: Literal["ed25519", "rsa"] = "ed25519"


class KeyPairOut(BaseModel):
    name: str
    key_type: str
    fingerprint: str
    public_key: str
    created_at: datetime
    private_key: str | None = Field(default=None, description="Only in the reply that generated it")


class Ec2CredentialOut(BaseModel):
    access_key: str
    created_at: datetime
    secret_key: str | None = Field(default=None, description="Only in the reply that created it")


# -- admin ----------------------------------------------------------------------------

QuotaLimit = Annotated[int, Field(strict=False, ge=0, le=2**53), BeforeValidator(_a_number)] | None


class PlanStep(Strict):
    action: Literal["create", "resize", "start", "stop", "reboot", "suspend", "resume", "destroy", "release"]
    server_id: Id | None = Field(default=None, description="The VM (every action but create)")
    flavor: str | None = Field(default=None, max_length=64, description="create, resize: the flavor's name")
    count: Int = Field(default=1, ge=1, le=100, description="create: how many VMs")
    zone: str | None = Field(default=None, max_length=64, description="create: the zone")
    image: str | None = Field(default=None, max_length=255, description="create: an image name (default: any)")


class QuotaCheckIn(Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"plan": [{"action": "create", "flavor": "small", "count": 3}]}]}
    )

    plan: list[PlanStep] = Field(min_length=1, max_length=50, description="The actions, in order")


class StepVerdict(BaseModel):
    ok: bool
    code: str | None = Field(description="The error code the real call would give (null: it would pass)")
    message: str
    details: dict[str, Any] = {}


class HeadroomItem(BaseModel):
    limit: int
    usage: int
    pending: int
    after: int = Field(description="usage + pending once the whole plan has been accepted")
    headroom_before: int = Field(description="limit - usage - pending now")
    headroom_after: int = Field(description="limit - usage - pending after the plan")


class RoomItem(BaseModel):
    vcpus_free: int
    ram_mb_free: int
    vcpus_free_after: int
    ram_mb_free_after: int


class PlacementVerdict(BaseModel):
    ok: bool = Field(description="No step was refused for want of room on the hosts")
    zones: dict[str, RoomItem] = Field(description="Free room per zone, now and after the plan")
    hosts: dict[str, RoomItem] = Field(description="The same per host (admins only; empty for users)")


class QuotaCheckOut(BaseModel):
    ok: bool = Field(description="Every step would pass")
    steps: list[StepVerdict]
    quotas: dict[str, HeadroomItem]
    placement: PlacementVerdict


class Quotas(Strict):
    """Limits by resource; a resource not given keeps its limit (its default, for a new project)."""

    vm: QuotaLimit = None
    cpu: QuotaLimit = None
    ram: QuotaLimit = Field(default=None, description="MiB")
    disk: QuotaLimit = Field(default=None, description="GiB")
    active_cpu: QuotaLimit = None
    active_ram: QuotaLimit = Field(default=None, description="MiB")
    public_ip: QuotaLimit = Field(default=None, description="Public addresses")

    def limits(self) -> dict[str, int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


assert set(Quotas.model_fields) == set(RESOURCES)  # one resource list: the operstate module's


class ProjectCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "lab", "quotas": {"vm": 10, "cpu": 20}},
            ]
        }
    )

    name: Annotated[str, Field(min_length=1, max_length=128)]
    quotas: Quotas = Quotas()


class ProjectPatch(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"quotas": {"vm": 50}},
            ]
        }
    )

    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    quotas: Quotas | None = None


class ProjectOut(BaseModel):
    id: uuid.UUID
    name: str
    created_at: datetime
    quotas: QuotasOut
    purged_servers: int = Field(
        default=0, description="DESTROYED servers purged by the retention pass (NEPHOS_RETENTION_DAYS)"
    )


class UserCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "alice", "email": "alice@example.org", "role": "user"},
            ]
        }
    )

    name: Annotated[str, Field(min_length=1, max_length=128)]
    email: str = Field(default="", max_length=256)
    project_id: Id | None = Field(default=None, description="The user's project; by default the admin's own")
    role: Literal["user", "admin"] = "user"


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    email: str
    project_id: uuid.UUID
    role: str
    created_at: datetime
    token: str | None = Field(default=None, description="Only in the reply that created the user")


class HostOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    name: str
    zone: str
    state: HostState
    cpus: int
    ram_mb: int
    cpu_ratio: float
    ram_ratio: float
    used_cpus: int
    used_ram_mb: int
    last_heartbeat: datetime | None


class HostCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "hv-9", "zone": "default", "cpus": 32, "ram_mb": 131072},
            ]
        }
    )

    name: Annotated[str, Field(min_length=1, max_length=128)]
    zone: Annotated[str, Field(min_length=1, max_length=64)] = "default"
    cpus: Int = Field(gt=0, le=65536)
    ram_mb: Int = Field(gt=0, le=2**31 - 1)
    cpu_ratio: float = Field(default=4.0, gt=0, le=64)
    ram_ratio: float = Field(default=1.0, gt=0, le=64)


class HostPatch(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"state": "disabled"},
            ]
        }
    )

    state: Annotated[HostState, Field(strict=False)]


class Health(BaseModel):
    database: str
    bus: str
    hosts_up: int


class ReconcileRequest(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"fix": False, "wait": 10},
            ]
        }
    )

    fix: bool = Field(default=False, description="Repair what is found (dry run when false)")
    wait: float = Field(default=10.0, ge=0, le=120, description="Seconds to wait for fresh inventories")


class DomainAdopt(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"image": "debian-12"},
            ]
        }
    )

    project_id: Id | None = Field(
        default=None, description="The project the domain's VM will belong to; by default the admin's own"
    )
    image: str = Field(
        min_length=1, max_length=255, description="Name of the image the VM is recorded with", examples=["debian-12"]
    )
    flavor: str | None = Field(
        default=None, max_length=255, description="Flavor name; by default the one of the domain's size"
    )
    name: str | None = Field(
        default=None, min_length=1, max_length=255, description="The VM's name; by default the domain's"
    )


class DomainDestroyed(BaseModel):
    host: str
    domain_uuid: uuid.UUID
    domain_name: str = Field(description="The domain's name as the host reported it")
    owned: bool = Field(description="Whether the domain carried Nephos's mark")


class ReconcileReport(BaseModel):
    stale: list[dict[str, Any]] = Field(description="VMs the database places on a host that does not have them")
    moved: list[dict[str, Any]] = Field(
        default_factory=list,
        description="VMs their recorded host does not have, whose marked domain one other host runs (found_on, "
        "observed): a migration whose result was lost or came after its deadline. The fix records the VM on "
        "that host (moving its host room) and gives it the state that host reports",
    )
    orphans: list[dict[str, Any]] = Field(
        description="Domains on a host that no live VM owns there: host, domain_name, domain_uuid, state, owned "
        "(carries Nephos's mark), server_id and operstate (of the VM it was made for, when owned). "
        "The fix destroys only an owned one whose VM is DESTROYED; any other is left to an admin "
        "(POST /admin/hosts/{host}/domains/{uuid}/destroy or /adopt)"
    )
    unsynced_operstate: list[dict[str, Any]]
    unsynced_flavor: list[dict[str, Any]]
    stuck_tasks: list[dict[str, Any]] = Field(description="Jobs past their deadline")
    quota_drift: list[dict[str, Any]] = Field(description="Recorded usage that differs from the VMs")
    pending_without_job: list[dict[str, Any]] = Field(description="Pending commissions with no live job")
    stale_addresses: list[dict[str, Any]] = Field(
        default_factory=list, description="Addresses still held by DESTROYED servers (server_id, network, ip)"
    )
    unsynced_firewall: list[dict[str, Any]] = Field(
        default_factory=list,
        description="VMs whose host enforces an older firewall generation (expected, observed) than the "
        "VM's: a group changed while the VM was busy, or the host lost its rules. The fix sends the rules",
    )
    unreachable_hosts: list[str] = Field(description="Hosts with no fresh inventory: not judged")
    fixed: bool
    actions: list[str] = Field(description="What the fix did")


class DriftOut(BaseModel):
    started_at: datetime | None = Field(description="When the last periodic pass started (null: none yet)")
    duration_s: float | None
    fixed: bool
    counts: dict[str, int] = Field(description="Findings per kind")
    report: dict[str, Any] = Field(description="The findings and what the pass did about them")


# -- leases and scheduled actions -------------------------------------------------------------


class LeasePolicyIn(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "duration_s": 7776000,
                    "max_lifetime_s": None,
                    "warn_before_s": [604800, 86400],
                    "on_expiry": "destroy",
                }
            ]
        }
    )

    duration_s: Annotated[int, Field(strict=False, gt=0, le=2**40), BeforeValidator(_a_number)] | None = Field(
        description="How long a lease lasts; null: the project's VMs get no lease"
    )
    max_lifetime_s: Annotated[int, Field(strict=False, gt=0, le=2**40), BeforeValidator(_a_number)] | None = Field(
        default=None, description="The most a VM may live, renewals included; null: no cap"
    )
    warn_before_s: list[Annotated[int, Field(strict=False, gt=0, le=2**40), BeforeValidator(_a_number)]] = Field(
        default=[604800, 86400], max_length=10, description="Warnings, in seconds before the end"
    )
    on_expiry: Literal["destroy", "stop", "suspend"] = "destroy"


class LeasePolicyOut(BaseModel):
    project_id: uuid.UUID
    duration_s: int | None
    max_lifetime_s: int | None
    warn_before_s: list[int]
    on_expiry: str


class LeaseRenew(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{}]})

    expires_at: When | None = Field(
        default=None, description="Admin only: the lease's end; by default now + the policy's duration"
    )


class LeaseOut(BaseModel):
    lease_expires_at: datetime | None
    max_expires_at: datetime | None = Field(description="The cap renewals cannot pass (null: none)")


class ScheduleIn(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"action": "stop", "at": "2030-01-01T18:00:00Z"}]})

    action: Literal["stop", "start", "suspend", "resume", "reboot", "destroy"]
    at: When = Field(description="When (ISO 8601)")


class ScheduleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    kind: str = Field(description="user, or lease (the lease's end)")
    action: str
    at: datetime
    state: str = Field(description="pending, done, failed or cancelled")
    reason: str
    attempts: int
    job_id: uuid.UUID | None
    done_at: datetime | None


class WebhookIn(Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"url": "https://hooks.example.org/nephos", "secret": "a-long-shared-secret"}]}
    )

    url: str = Field(max_length=2048, description="Where events are POSTed (http or https)")
    secret: str = Field(
        min_length=16, max_length=256, description="Key of the HMAC-SHA256 signature (stored sealed, never shown)"
    )


class WebhookOut(BaseModel):
    project_id: uuid.UUID
    url: str
    enabled: bool
    failures: int = Field(description="Failed deliveries in a row (a success resets it)")
    disabled_reason: str = Field(description="Why it was disabled (empty while enabled)")
    pending: int = Field(description="Deliveries waiting to be sent")
    updated_at: datetime


class CapacityItem(BaseModel):
    flavor: str
    zone: str
    fit_now: int = Field(description="How many more VMs of this flavor the zone's up hosts take now")
    fit_empty: int = Field(description="How many the zone's up hosts would take were they empty")
    hosts_up: int


class CapacityOut(BaseModel):
    items: list[CapacityItem]


class NotifyTestIn(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"to": "ops@example.org"}]})

    to: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^[^@\s]+@[^@\s]+$",
        description="Recipient (default: the caller's email)",
    )


class NotifyTestOut(BaseModel):
    sent: bool
    to: str
    server: str = Field(description="The mail server that took it (host:port)")


class NetworkIn(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "backend", "cidr": "10.20.0.0/24"}]})

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    cidr: str | None = Field(
        default=None,
        max_length=43,
        description="A private IPv4 network, /16 to /29, overlapping no other; default: the next free /24 of the pool",
    )


class NetworkOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    cidr: str
    gateway: str
    project_id: uuid.UUID
    is_default: bool
    created_at: datetime


#: A port number (JSON's 22.0 is the integer 22, as JSON Schema says).
PortNumber = Annotated[int, Field(strict=False, ge=1, le=65535), BeforeValidator(_a_number)]


class FirewallSpec(Strict):
    protocol: Literal["tcp", "udp", "icmp", "all"]
    port: PortNumber | Annotated[list[PortNumber], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="A port, or [first, last]; none for icmp and all"
    )
    cidr: str = Field(default="0.0.0.0/0", max_length=43, description="Where from (IPv4)")


class FirewallOpen(Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"open": {"protocol": "tcp", "port": 22, "cidr": "0.0.0.0/0"}}]}
    )

    open: FirewallSpec


class FirewallClose(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"close": {"protocol": "tcp", "port": 22}}]})

    close: FirewallSpec


#: Exactly one of the two, as the schema says (each object admits no other key).
FirewallChange = FirewallOpen | FirewallClose


class FirewallRuleOut(BaseModel):
    id: str
    protocol: str
    port_min: int = Field(description="-1: every port")
    port_max: int
    cidr: str
    source: Literal["port", "group"] = Field(description="An opened port, or a rule of one of the VM's groups")


class FirewallOut(BaseModel):
    rules: list[FirewallRuleOut]


class PublicIpIn(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"pool": None}]})

    pool: str | None = Field(default=None, max_length=64, description="A pool's name (default: any with room)")


class PublicIpOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    address: str
    project_id: uuid.UUID
    server_id: uuid.UUID | None = Field(description="The VM it is associated with (its first private address)")
    ec2_id: str = Field(description="EC2's allocation id (eipalloc-...)")
    association_id: str | None = Field(description="EC2's association id (eipassoc-...), while associated")
    created_at: datetime


class PublicIpAssociate(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"server_id": "01a2474c-1863-7000-999d-af7eee05ca5a"}]})

    server_id: Id


class PoolIn(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "internet", "cidr": "203.0.113.0/24"}]})

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    cidr: str = Field(max_length=43, description="IPv4, /16 to /32, overlapping no other pool")


class NetworkPoolBody(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"cidr": "10.128.0.0/9", "prefix": 24}]})

    cidr: str = Field(max_length=43, description="A private IPv4 range")
    prefix: Int = Field(ge=16, le=29, description="The size of each network cut from it (/16 to /29)")


class NetworkPoolOut(BaseModel):
    cidr: str
    prefix: int


class PoolOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    cidr: str
    created_at: datetime
