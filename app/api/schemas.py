"""Request and reply models of the REST API (API.md is the contract)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.logic.catalogue import Labels
from app.logic.operstate import RESOURCES

T = TypeVar("T")
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
    """A request body: unknown fields and NUL characters are validation errors."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _reject_nul(cls, data: Any) -> Any:
        return _no_nul(data)


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")


# -- servers ------------------------------------------------------------------------

class ServerCreate(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "web-1", "flavor": "small", "image": "debian-12"},
    ]})

    name: Name
    flavor_id: uuid.UUID | None = None
    flavor: str | None = Field(default=None, description="A flavor name, instead of flavor_id")
    image_id: uuid.UUID | None = None
    image: str | None = Field(default=None, description="An image name, instead of image_id")
    count: int = Field(default=1, ge=1, le=100, description="How many VMs: all of them, or none")
    key_name: str | None = Field(default=None, max_length=255)
    user_data: str | None = Field(default=None, max_length=65536)
    metadata: Metadata = {}
    zone: str | None = Field(default=None, max_length=64)
    hold: bool = Field(default=False, description="Create in HOLD, unplaced, until released")
    description: str = Field(default="", max_length=4096)

    @model_validator(mode="after")
    def _flavor_and_image(self) -> ServerCreate:
        # A missing field is a schema error (422 ValidationError), whichever of its two spellings.
        if self.flavor_id is None and not self.flavor:
            raise ValueError("give flavor_id or flavor (a flavor name, e.g. small)")
        if self.image_id is None and not self.image:
            raise ValueError("give image_id or image (an image name, e.g. debian-12)")
        return self


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
    operstate: Literal["HOLD", "BUILD", "STARTED", "STOPPED", "SUSPENDED", "ERROR", "DESTROYED"]
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

    @classmethod
    def of(cls, s: Any, labels: Labels) -> ServerOut:
        data = {name: getattr(s, name) for name in cls.model_fields if name not in ("metadata", "flavor", "image")}
        return cls(metadata=s.meta, flavor=labels.flavors.get(s.flavor_id, ""), image=labels.images.get(s.image_id, ""),
                   **data)


class ServersCreated(BaseModel):
    servers: list[ServerOut]
    job_ids: list[uuid.UUID] = Field(description="One per VM that starts building (none for hold)")


class ServerPatch(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "web-2", "description": "the second web server", "metadata": {"team": "web"}},
    ]})

    name: Name | None = None
    description: str | None = Field(default=None, max_length=4096)
    metadata: Metadata | None = None


class JobAccepted(BaseModel):
    job_id: uuid.UUID | None = Field(description="The action's job; for a DELETE of a server already destroyed, "
                                                 "the job that destroyed it (null when none did: reconciliation)")


class PlainAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"action": "stop"},
    ]})

    action: Literal["start", "stop", "suspend", "resume", "release", "destroy", "console"]


class RebootAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"action": "reboot", "hard": False},
    ]})

    action: Literal["reboot"]
    hard: bool = False


class ResizeAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"action": "resize", "flavor": "medium"},
    ]})

    action: Literal["resize"]
    flavor_id: uuid.UUID | None = None
    flavor: str | None = Field(default=None, description="A flavor name, instead of flavor_id")

    @model_validator(mode="after")
    def _flavor(self) -> ResizeAction:
        if self.flavor_id is None and not self.flavor:
            raise ValueError("give flavor_id or flavor (a flavor name, e.g. medium)")
        return self


class MigrateAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"action": "migrate"},
    ]})

    action: Literal["migrate", "live_migrate"]
    host: str | None = Field(default=None, description="Target host; chosen by placement if null")


class SaveImageAction(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"action": "save_image", "image_name": "web-1-snapshot"},
    ]})

    action: Literal["save_image"]
    image_name: Name


ActionBody = Annotated[
    PlainAction | RebootAction | ResizeAction | MigrateAction | SaveImageAction,
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
    status: Literal["PENDING", "SENT", "RUNNING", "SUCCESS", "ERROR"]
    error: str | None
    host: str | None
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


class FlavorCreate(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "xlarge", "vcpus": 8, "ram_mb": 16384, "disk_gb": 160},
    ]})

    name: Annotated[str, Field(min_length=1, max_length=64)]
    vcpus: int = Field(gt=0, le=1024)
    ram_mb: int = Field(gt=0, le=16 * 1024 * 1024)
    disk_gb: int = Field(ge=0, le=1024 * 1024)


class ImageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    status: str
    is_public: bool
    project_id: uuid.UUID | None
    disk_format: str
    source_server_id: uuid.UUID | None
    created_at: datetime


class ImageCreate(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "alpine-3.20", "is_public": True, "disk_format": "qcow2"},
    ]})

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


# -- key pairs and credentials ------------------------------------------------------------

class KeyPairCreate(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "laptop"},
    ]})

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

Quotas = dict[str, Annotated[int, Field(ge=0, le=2**53)]]


def _check_resources(value: Quotas | None) -> Quotas | None:
    if value:
        unknown = set(value) - set(RESOURCES)
        if unknown:
            raise ValueError(f"unknown quota resources {sorted(unknown)}; known: {list(RESOURCES)}")
    return value


class ProjectCreate(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "lab", "quotas": {"vm": 10, "cpu": 20}},
    ]})

    name: Annotated[str, Field(min_length=1, max_length=128)]
    quotas: Quotas = {}

    _resources = field_validator("quotas")(_check_resources)


class ProjectPatch(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"quotas": {"vm": 50}},
    ]})

    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    quotas: Quotas | None = None

    _resources = field_validator("quotas")(_check_resources)


class ProjectOut(BaseModel):
    id: uuid.UUID
    name: str
    created_at: datetime
    quotas: QuotasOut


class UserCreate(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "alice", "email": "alice@example.org", "role": "user"},
    ]})

    name: Annotated[str, Field(min_length=1, max_length=128)]
    email: str = Field(default="", max_length=256)
    project_id: uuid.UUID | None = Field(default=None, description="The user's project; by default the admin's own")
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
    state: Literal["up", "down", "disabled"]
    cpus: int
    ram_mb: int
    cpu_ratio: float
    ram_ratio: float
    used_cpus: int
    used_ram_mb: int
    last_heartbeat: datetime | None


class HostCreate(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "hv-9", "zone": "default", "cpus": 32, "ram_mb": 131072},
    ]})

    name: Annotated[str, Field(min_length=1, max_length=128)]
    zone: Annotated[str, Field(min_length=1, max_length=64)] = "default"
    cpus: int = Field(gt=0, le=65536)
    ram_mb: int = Field(gt=0, le=2**31 - 1)
    cpu_ratio: float = Field(default=4.0, gt=0, le=64)
    ram_ratio: float = Field(default=1.0, gt=0, le=64)


class HostPatch(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"state": "disabled"},
    ]})

    state: Literal["up", "down", "disabled"]


class Health(BaseModel):
    database: str
    bus: str
    hosts_up: int


class ReconcileRequest(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"fix": False, "wait": 10},
    ]})

    fix: bool = Field(default=False, description="Repair what is found (dry run when false)")
    wait: float = Field(default=10.0, ge=0, le=120, description="Seconds to wait for fresh inventories")


class DomainAdopt(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"image": "debian-12"},
    ]})

    project_id: uuid.UUID | None = Field(default=None, description="The project the domain's VM will belong to; "
                                                                  "by default the admin's own")
    image: str = Field(min_length=1, max_length=255, description="Name of the image the VM is recorded with",
                       examples=["debian-12"])
    flavor: str | None = Field(default=None, max_length=255,
                               description="Flavor name; by default the one of the domain's size")
    name: str | None = Field(default=None, min_length=1, max_length=255,
                             description="The VM's name; by default the domain's")


class DomainDestroyed(BaseModel):
    host: str
    domain_uuid: uuid.UUID
    domain_name: str = Field(description="The domain's name as the host reported it")
    owned: bool = Field(description="Whether the domain carried Nephos's mark")


class ReconcileReport(BaseModel):
    stale: list[dict[str, Any]] = Field(description="VMs the database places on a host that does not have them")
    orphans: list[dict[str, Any]] = Field(
        description="Domains on a host that no live VM owns there: host, domain_name, domain_uuid, state, owned "
                    "(carries Nephos's mark), server_id and operstate (of the VM it was made for, when owned). "
                    "The fix destroys only an owned one whose VM is DESTROYED; any other is left to an admin "
                    "(POST /admin/hosts/{host}/domains/{uuid}/destroy or /adopt)")
    unsynced_operstate: list[dict[str, Any]]
    unsynced_flavor: list[dict[str, Any]]
    stuck_tasks: list[dict[str, Any]] = Field(description="Jobs past their deadline")
    quota_drift: list[dict[str, Any]] = Field(description="Recorded usage that differs from the VMs")
    pending_without_job: list[dict[str, Any]] = Field(description="Pending commissions with no live job")
    unreachable_hosts: list[str] = Field(description="Hosts with no fresh inventory: not judged")
    fixed: bool
    actions: list[str] = Field(description="What the fix did")


class DriftOut(BaseModel):
    started_at: datetime | None = Field(description="When the last periodic pass started (null: none yet)")
    duration_s: float | None
    fixed: bool
    counts: dict[str, int] = Field(description="Findings per kind")
    report: dict[str, Any] = Field(description="The findings and what the pass did about them")
