"""The tables. Every schema change is an alembic revision (``migrations/``).

Ids are time-ordered UUIDs (``app.ids.uuid7``) so lists page on ``id`` alone.
Timestamps are timezone-aware UTC on PostgreSQL and SQLite alike.
Relationships are deliberately absent: async code never lazy-loads, it selects.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from app.ids import ec2_id, utcnow, uuid7

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes everywhere; SQLite stores them naive, so normalise."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _id() -> Any:
    return Field(default_factory=uuid7, primary_key=True)


def _ts(nullable: bool = False, default: bool = True) -> Any:
    if default:
        return Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=nullable)
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable)


def _json() -> Any:
    return Field(default_factory=dict, sa_type=sa.JSON, nullable=False)


class Project(SQLModel, table=True):
    __tablename__ = "projects"
    id: uuid.UUID = _id()
    name: str = Field(max_length=128, unique=True)
    created_at: datetime = _ts()
    # DESTROYED servers purged by the retention pass (their rows, jobs and events are gone).
    purged_servers: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class Quota(SQLModel, table=True):
    """One row per (project, resource): the limit and the accepted usage."""

    __tablename__ = "quotas"
    project_id: uuid.UUID = Field(foreign_key="projects.id", primary_key=True)
    resource: str = Field(max_length=32, primary_key=True)
    hard_limit: int = Field(sa_type=sa.BigInteger)
    usage: int = Field(default=0, sa_type=sa.BigInteger)


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: uuid.UUID = _id()
    name: str = Field(max_length=128)
    email: str = Field(default="", max_length=256)
    project_id: uuid.UUID = Field(foreign_key="projects.id", index=True)
    role: str = Field(default="user", max_length=16)
    # SHA-256 of the bearer token: tokens are 256 random bits, so a fast hash
    # is enough and lets authentication be one indexed lookup.
    token_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = _ts()


class Ec2Credential(SQLModel, table=True):
    __tablename__ = "ec2_credentials"
    access_key: str = Field(max_length=32, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", index=True)
    # Fernet token of the secret under the server key: SigV4 needs the secret
    # itself, so it is encrypted rather than hashed.
    secret_encrypted: str = Field(sa_type=sa.Text)
    created_at: datetime = _ts()


class Flavor(SQLModel, table=True):
    __tablename__ = "flavors"
    id: uuid.UUID = _id()
    name: str = Field(max_length=64, unique=True)
    vcpus: int
    ram_mb: int
    disk_gb: int
    created_at: datetime = _ts()


class Image(SQLModel, table=True):
    __tablename__ = "images"
    id: uuid.UUID = _id()
    name: str = Field(max_length=128, index=True)
    # NULL project: a public image every project sees.
    project_id: uuid.UUID | None = Field(default=None, foreign_key="projects.id", index=True)
    is_public: bool = True
    status: str = Field(default="active", max_length=16)
    disk_format: str = Field(default="qcow2", max_length=16)
    source_url: str = Field(default="", max_length=1024)
    source_server_id: uuid.UUID | None = None
    size_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    created_at: datetime = _ts()
    ec2_id: str = Field(default_factory=lambda: ec2_id("ami"), max_length=32, unique=True)


class Zone(SQLModel, table=True):
    __tablename__ = "zones"
    id: uuid.UUID = _id()
    name: str = Field(max_length=64, unique=True)
    created_at: datetime = _ts()


class Host(SQLModel, table=True):
    __tablename__ = "hosts"
    id: uuid.UUID = _id()
    name: str = Field(max_length=128, unique=True)
    zone: str = Field(max_length=64, foreign_key="zones.name", index=True)
    cpus: int
    ram_mb: int
    cpu_ratio: float = 4.0
    ram_ratio: float = 1.0
    used_cpus: int = 0
    used_ram_mb: int = Field(default=0, sa_type=sa.BigInteger)
    state: str = Field(default="up", max_length=16)
    last_heartbeat: datetime | None = _ts(nullable=True, default=False)
    # The agent's latest inventory (``messages.Inventory`` as JSON) and when it was taken.
    inventory: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    inventory_at: datetime | None = _ts(nullable=True, default=False)
    # Where a peer agent's libvirt reaches this host for migrations (``qemu+ssh://...``), if any.
    migration_uri: str | None = Field(default=None, max_length=512)
    # The libvirt driver its agent runs ("test", "qemu", ...), from its heartbeats.
    hypervisor: str | None = Field(default=None, max_length=16)
    # Last VNC display handed out on this host; placement bumps it in the same
    # UPDATE that reserves capacity, so two VMs never share a port.
    vnc_seq: int = 0
    created_at: datetime = _ts()


class Server(SQLModel, table=True):
    __tablename__ = "servers"
    __table_args__ = (
        sa.Index("ix_servers_project_id_operstate", "project_id", "operstate"),
        # A project's list pages (REST and EC2 alike, keyset by id): an index range per page.
        sa.Index("ix_servers_project_id_id", "project_id", "id"),
    )
    id: uuid.UUID = _id()
    name: str = Field(max_length=255)
    description: str = Field(default="", sa_type=sa.Text)
    project_id: uuid.UUID = Field(foreign_key="projects.id")
    user_id: uuid.UUID = Field(foreign_key="users.id", index=True)
    flavor_id: uuid.UUID = Field(foreign_key="flavors.id")
    image_id: uuid.UUID = Field(foreign_key="images.id")
    host: str | None = Field(default=None, max_length=128, index=True)
    zone: str | None = Field(default=None, max_length=64)
    operstate: str = Field(max_length=16)
    task: str | None = Field(default=None, max_length=32)
    task_job_id: uuid.UUID | None = None
    # "metadata" is reserved on declarative classes; the column keeps the name.
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column("metadata", sa.JSON, nullable=False))
    key_name: str | None = Field(default=None, max_length=255)
    user_data: str | None = Field(default=None, sa_type=sa.Text)
    vnc_port: int | None = None
    # Highest per-VM event sequence applied (agents stamp every event).
    last_seq: int = Field(default=0, sa_type=sa.BigInteger)
    lease_expires_at: datetime | None = _ts(nullable=True, default=False)
    # Counts changes of the VM's intended firewall (its ports, its groups, their rules). Every
    # firewall job carries it and the host records it with the rules: reconciliation compares.
    firewall_gen: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = _ts()
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    destroyed_at: datetime | None = _ts(nullable=True, default=False)
    # The EC2 facade's names for it (every VM has them, however it was made).
    ec2_id: str = Field(default_factory=lambda: ec2_id("i"), max_length=32, unique=True)
    reservation_id: str = Field(default_factory=lambda: ec2_id("r"), max_length=32, index=True)
    client_token: str | None = Field(default=None, max_length=64)
    # EC2's protections (ModifyInstanceAttribute): destroy / stop are refused while set, by REST too.
    disable_api_termination: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    disable_api_stop: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})


class Job(SQLModel, table=True):
    """The outbox: committed with the action, published after the commit."""

    __tablename__ = "jobs"
    id: uuid.UUID = _id()
    server_id: uuid.UUID = Field(foreign_key="servers.id", index=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id")
    user_id: uuid.UUID | None = Field(default=None, foreign_key="users.id")
    action: str = Field(max_length=32)
    params: dict[str, Any] = _json()
    host: str | None = Field(default=None, max_length=128)
    status: str = Field(default="PENDING", max_length=16, index=True)
    error: str | None = Field(default=None, sa_type=sa.Text)
    # What the agent reported with the result: the domain's state after the job, and the
    # job's own facts (a console's port, a saved image's size, a forced stop, ...).
    domain_state: str | None = Field(default=None, max_length=16)
    details: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    commission_id: uuid.UUID | None = None
    attempts: int = 0
    deadline: datetime = Field(sa_type=UTCDateTime)
    created_at: datetime = _ts()
    sent_at: datetime | None = _ts(nullable=True, default=False)
    started_at: datetime | None = _ts(nullable=True, default=False)
    finished_at: datetime | None = _ts(nullable=True, default=False)


class Commission(SQLModel, table=True):
    """Resource deltas reserved for an action (pending) and then accepted or rejected."""

    __tablename__ = "commissions"
    __table_args__ = (sa.Index("ix_commissions_project_id_state", "project_id", "state"),)
    id: uuid.UUID = _id()
    project_id: uuid.UUID = Field(foreign_key="projects.id")
    server_id: uuid.UUID | None = Field(default=None, foreign_key="servers.id", index=True)
    job_id: uuid.UUID | None = None
    issuer: str = Field(default="api", max_length=16)
    state: str = Field(default="pending", max_length=16)
    reason: str | None = Field(default=None, sa_type=sa.Text)
    vm: int = Field(default=0, sa_type=sa.BigInteger)
    cpu: int = Field(default=0, sa_type=sa.BigInteger)
    ram: int = Field(default=0, sa_type=sa.BigInteger)
    disk: int = Field(default=0, sa_type=sa.BigInteger)
    active_cpu: int = Field(default=0, sa_type=sa.BigInteger)
    active_ram: int = Field(default=0, sa_type=sa.BigInteger)
    public_ip: int = Field(default=0, sa_type=sa.BigInteger, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = _ts()
    resolved_at: datetime | None = _ts(nullable=True, default=False)


class ServerEvent(SQLModel, table=True):
    __tablename__ = "server_events"
    id: uuid.UUID = _id()
    server_id: uuid.UUID = Field(foreign_key="servers.id", index=True)
    job_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None
    kind: str = Field(max_length=32)
    action: str | None = Field(default=None, max_length=32)
    operstate_from: str | None = Field(default=None, max_length=16)
    operstate_to: str | None = Field(default=None, max_length=16)
    message: str = Field(default="", sa_type=sa.Text)
    created_at: datetime = _ts()


@dataclass(slots=True)
class NewServerEvent:
    """A server event as a transaction makes it (``events.record``): the stream writes it to
    ``server_events`` when the transaction commits. A plain record, not a ``ServerEvent``: an
    ORM object of the table costs some 60 µs to build, and is never needed for a new event."""

    server_id: uuid.UUID
    kind: str
    job_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None
    action: str | None = None
    operstate_from: str | None = None
    operstate_to: str | None = None
    message: str = ""
    id: uuid.UUID = dataclass_field(default_factory=uuid7)
    created_at: datetime = dataclass_field(default_factory=utcnow)


class StreamEvent(SQLModel, table=True):
    """One event of the live stream (``logic.stream``), written in the transaction that made it.
    Its position is (``xid``, ``id``): the writing transaction's id on PostgreSQL (0 on SQLite)
    and a serial."""

    __tablename__ = "stream_events"
    __table_args__ = (
        sa.Index("ix_stream_events_position", "xid", "id"),
        sa.Index("ix_stream_events_project_position", "project_id", "xid", "id"),
        {"sqlite_autoincrement": True},
    )
    id: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    xid: int = Field(default=0, sa_type=sa.BigInteger)
    project_id: uuid.UUID
    server_id: uuid.UUID | None = None
    kind: str = Field(max_length=32)
    body: dict[str, Any] = _json()
    created_at: datetime = _ts()


class IdempotencyRecord(SQLModel, table=True):
    __tablename__ = "idempotency_records"
    user_id: uuid.UUID = Field(foreign_key="users.id", primary_key=True)
    key: str = Field(max_length=255, primary_key=True)
    fingerprint: str = Field(max_length=64)
    status_code: int
    response: Any = Field(default=None, sa_type=sa.JSON)
    # What the request created ("keypair:<id>"), when it can be deleted: deleting it forgets this.
    resource: str | None = Field(default=None, max_length=255, index=True)
    created_at: datetime = _ts()


class KeyPair(SQLModel, table=True):
    __tablename__ = "keypairs"
    __table_args__ = (sa.UniqueConstraint("project_id", "name"),)
    id: uuid.UUID = _id()
    project_id: uuid.UUID = Field(foreign_key="projects.id")
    user_id: uuid.UUID = Field(foreign_key="users.id")
    name: str = Field(max_length=255)
    key_type: str = Field(max_length=16)
    public_key: str = Field(sa_type=sa.Text)
    fingerprint: str = Field(max_length=128)
    created_at: datetime = _ts()
    ec2_id: str = Field(default_factory=lambda: ec2_id("key"), max_length=32, unique=True)


class DriftReport(SQLModel, table=True):
    """What a periodic reconciliation pass found and fixed (the latest one is the drift report)."""

    __tablename__ = "drift_reports"
    id: uuid.UUID = _id()
    started_at: datetime = _ts()
    duration_s: float = 0.0
    fixed: bool = False
    counts: dict[str, Any] = _json()
    report: dict[str, Any] = _json()


def table_of(model: type[SQLModel]) -> sa.Table:
    """The Core table of a model, typed (SQLModel hides ``__table__`` from type checkers)."""
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, sa.Table)
    return table


class Ec2Tag(SQLModel, table=True):
    """A tag on an EC2-visible resource (by its EC2 id), per project."""

    __tablename__ = "ec2_tags"
    project_id: uuid.UUID = Field(foreign_key="projects.id", index=True)
    resource_id: str = Field(max_length=32, primary_key=True)
    key: str = Field(max_length=128, primary_key=True)
    value: str = Field(default="", max_length=256)


class Ec2ClientToken(SQLModel, table=True):
    """RunInstances' ClientToken: one reservation per (project, token), inserted with it."""

    __tablename__ = "ec2_client_tokens"
    project_id: uuid.UUID = Field(foreign_key="projects.id", primary_key=True)
    token: str = Field(max_length=64, primary_key=True)
    request_hash: str = Field(max_length=64)
    reservation_id: str = Field(max_length=32)
    created_at: datetime = _ts()


class SecurityGroup(SQLModel, table=True):
    """An EC2 security group, per project: stored and described (hosts do not filter traffic)."""

    __tablename__ = "security_groups"
    __table_args__ = (sa.UniqueConstraint("project_id", "name"),)
    id: uuid.UUID = _id()
    ec2_id: str = Field(default_factory=lambda: ec2_id("sg"), max_length=32, unique=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id")
    name: str = Field(max_length=255)
    description: str = Field(default="", max_length=255)
    created_at: datetime = _ts()


class SecurityGroupRule(SQLModel, table=True):
    """One ingress permission: a protocol and port range from a CIDR or from another group."""

    __tablename__ = "security_group_rules"
    __table_args__ = (
        sa.UniqueConstraint(
            "group_id", "protocol", "from_port", "to_port", "cidr", "source_group", name="uq_security_group_rules_rule"
        ),
    )
    id: uuid.UUID = _id()
    ec2_id: str = Field(default_factory=lambda: ec2_id("sgr"), max_length=32, unique=True)
    group_id: uuid.UUID = Field(foreign_key="security_groups.id", index=True)
    protocol: str = Field(max_length=8)
    from_port: int
    to_port: int
    # Exactly one of the two; the other is "" (not NULL, so the unique constraint sees duplicates).
    cidr: str = Field(default="", max_length=64)
    source_group: str = Field(default="", max_length=32)
    description: str = Field(default="", max_length=255)


class ServerSecurityGroup(SQLModel, table=True):
    """A VM's membership of a security group."""

    __tablename__ = "server_security_groups"
    server_id: uuid.UUID = Field(foreign_key="servers.id", primary_key=True)
    group_id: uuid.UUID = Field(foreign_key="security_groups.id", primary_key=True, index=True)


class LeasePolicy(SQLModel, table=True):
    """A project's lease policy (``logic.leases``); a project without a row has the default."""

    __tablename__ = "lease_policies"
    project_id: uuid.UUID = Field(foreign_key="projects.id", primary_key=True)
    # Null: the project's VMs get no lease.
    duration_s: int | None = Field(default=None, sa_type=sa.BigInteger)
    # Null: renewals are not capped.
    max_lifetime_s: int | None = Field(default=None, sa_type=sa.BigInteger)
    warn_before_s: list[int] = Field(default_factory=list, sa_type=sa.JSON, nullable=False)
    on_expiry: str = Field(default="destroy", max_length=16)
    updated_at: datetime = _ts()


class ScheduledAction(SQLModel, table=True):
    """A one-off action on a VM at a time; the lease's end is one (``kind`` "lease")."""

    __tablename__ = "scheduled_actions"
    __table_args__ = (sa.Index("ix_scheduled_actions_state_at", "state", "at"),)
    id: uuid.UUID = _id()
    server_id: uuid.UUID = Field(foreign_key="servers.id", index=True)
    kind: str = Field(default="user", max_length=16)
    action: str = Field(max_length=32)
    at: datetime = Field(sa_type=UTCDateTime)
    state: str = Field(default="pending", max_length=16)
    reason: str = Field(default="", sa_type=sa.Text)
    attempts: int = 0
    user_id: uuid.UUID | None = None
    job_id: uuid.UUID | None = None
    created_at: datetime = _ts()
    done_at: datetime | None = _ts(nullable=True, default=False)


class Notification(SQLModel, table=True):
    """A mail owed to a user (``logic.notifications``): a lease warning, a lease's end, a
    disabled webhook. Recorded once -- the unique key is the VM, the kind, the lease end it
    refers to and the warning's offset -- and marked sent once the mail server took it."""

    __tablename__ = "notifications"
    __table_args__ = (
        sa.UniqueConstraint("server_id", "kind", "lease_end", "offset_s"),
        sa.Index("ix_notifications_sent_at_next_at", "sent_at", "next_at"),
    )
    id: uuid.UUID = _id()
    user_id: uuid.UUID = Field(foreign_key="users.id", index=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id")
    server_id: uuid.UUID | None = None
    kind: str = Field(max_length=32)
    lease_end: datetime | None = _ts(nullable=True, default=False)
    offset_s: int = Field(default=0, sa_type=sa.BigInteger)
    data: dict[str, Any] = _json()
    created_at: datetime = _ts()
    next_at: datetime = _ts()
    claim: uuid.UUID | None = None
    claimed_until: datetime | None = _ts(nullable=True, default=False)
    attempts: int = 0
    last_error: str = Field(default="", sa_type=sa.Text)
    sent_at: datetime | None = _ts(nullable=True, default=False)


class Webhook(SQLModel, table=True):
    """A project's webhook: where its events are POSTed, signed with its secret (sealed)."""

    __tablename__ = "webhooks"
    project_id: uuid.UUID = Field(foreign_key="projects.id", primary_key=True)
    url: str = Field(max_length=2048)
    secret_sealed: str = Field(sa_type=sa.Text)
    enabled: bool = True
    failures: int = 0
    disabled_reason: str = Field(default="", sa_type=sa.Text)
    # Deliveries wait until then after a failure (exponential backoff).
    next_at: datetime = _ts()
    # One deliverer per project at a time, so its events arrive in order.
    claim: uuid.UUID | None = None
    claimed_until: datetime | None = _ts(nullable=True, default=False)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class WebhookDelivery(SQLModel, table=True):
    """One event owed to a project's webhook, written in the transaction that made the event."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (sa.Index("ix_webhook_deliveries_project_id_state", "project_id", "state"),)
    id: uuid.UUID = _id()
    project_id: uuid.UUID = Field(foreign_key="projects.id")
    server_id: uuid.UUID | None = None
    kind: str = Field(max_length=32)
    body: dict[str, Any] = _json()
    state: str = Field(default="pending", max_length=16)
    attempts: int = 0
    last_error: str = Field(default="", sa_type=sa.Text)
    created_at: datetime = _ts()
    delivered_at: datetime | None = _ts(nullable=True, default=False)


class Network(SQLModel, table=True):
    """A project's private network (``logic.networks``): a CIDR, a gateway, a libvirt network
    with DHCP reservations on every host that runs one of its VMs."""

    __tablename__ = "networks"
    __table_args__ = (sa.UniqueConstraint("project_id", "name"),)
    id: uuid.UUID = _id()
    project_id: uuid.UUID = Field(foreign_key="projects.id", index=True)
    name: str = Field(max_length=64)
    cidr: str = Field(max_length=43, unique=True)
    gateway: str = Field(max_length=45)
    is_default: bool = False
    ec2_id: str = Field(default_factory=lambda: ec2_id("subnet"), max_length=32, unique=True)
    created_at: datetime = _ts()


class NetworkPool(SQLModel, table=True):
    """Where networks made without a CIDR come from (an admin's; one row, ``id`` 1; without it,
    ``logic.networks.POOL``): a private range, cut into networks of ``prefix``."""

    __tablename__ = "network_pool"
    id: int = Field(default=1, primary_key=True)
    cidr: str = Field(max_length=43)
    prefix: int
    updated_at: datetime = _ts()


class Port(SQLModel, table=True):
    """A VM's NIC on a network: its fixed address and MAC, unique by constraint."""

    __tablename__ = "ports"
    __table_args__ = (sa.UniqueConstraint("network_id", "ip"),)
    id: uuid.UUID = _id()
    server_id: uuid.UUID = Field(foreign_key="servers.id", index=True)
    network_id: uuid.UUID = Field(foreign_key="networks.id", index=True)
    ip: str = Field(max_length=45)
    mac: str = Field(max_length=17, unique=True)
    position: int = 0
    ec2_id: str = Field(default_factory=lambda: ec2_id("eni"), max_length=32, unique=True)
    created_at: datetime = _ts()


class FirewallRule(SQLModel, table=True):
    """A port a user opened on one VM (CRS4's open/close); a VM's security groups add theirs
    (``logic.firewall``). Inbound is denied except what these allow; outbound is allowed."""

    __tablename__ = "firewall_rules"
    __table_args__ = (sa.UniqueConstraint("server_id", "protocol", "port_min", "port_max", "cidr"),)
    id: uuid.UUID = _id()
    server_id: uuid.UUID = Field(foreign_key="servers.id", index=True)
    protocol: str = Field(max_length=8)
    # -1 / -1: every port (and ICMP, which has none).
    port_min: int = -1
    port_max: int = -1
    cidr: str = Field(max_length=43)
    created_at: datetime = _ts()


class PublicIpPool(SQLModel, table=True):
    """Public addresses an admin hands to Nephos (``logic.public_ips``)."""

    __tablename__ = "public_ip_pools"
    id: uuid.UUID = _id()
    name: str = Field(max_length=64, unique=True)
    cidr: str = Field(max_length=43, unique=True)
    created_at: datetime = _ts()


class PublicIp(SQLModel, table=True):
    """A public address allocated to a project (a ``public_ip`` quota unit), associated with
    at most one VM at a time (its first NIC's address)."""

    __tablename__ = "public_ips"
    id: uuid.UUID = _id()
    pool_id: uuid.UUID = Field(foreign_key="public_ip_pools.id", index=True)
    address: str = Field(max_length=45, unique=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id", index=True)
    server_id: uuid.UUID | None = Field(default=None, foreign_key="servers.id", index=True)
    ec2_id: str = Field(default_factory=lambda: ec2_id("eipalloc"), max_length=32, unique=True)
    association_id: str | None = Field(default=None, max_length=32, unique=True)
    created_at: datetime = _ts()
