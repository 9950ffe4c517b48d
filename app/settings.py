"""Typed settings: every Nephos process reads the same ``NEPHOS_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class HostSpec:
    """A simulated hypervisor host from ``NEPHOS_HOSTS`` (``name:cpus:ram_mb[:zone]``)."""

    name: str
    cpus: int
    ram_mb: int
    zone: str = "default"


def parse_hosts(value: str) -> list[HostSpec]:
    specs = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        fields = item.split(":")
        if len(fields) not in (3, 4) or not fields[0]:
            raise ValueError(f"host {item!r} is not name:cpus:ram_mb[:zone]")
        try:
            cpus, ram = int(fields[1]), int(fields[2])
        except ValueError:
            raise ValueError(f"host {item!r}: cpus and ram_mb must be integers") from None
        if cpus <= 0 or ram <= 0:
            raise ValueError(f"host {item!r}: cpus and ram_mb must be positive")
        specs.append(HostSpec(fields[0], cpus, ram, fields[3] if len(fields) == 4 else "default"))
    return specs


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEPHOS_", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./var/nephos.db"
    amqp_url: str = "memory://"
    # Connections each process may hold (PostgreSQL): pool size plus overflow under bursts. An
    # overflow connection is closed when it is returned to a full pool: under load, the pool
    # opened and closed about ten a second, each a new backend preparing and planning its
    # statements again (docs/production.md), so the default has none.
    db_pool_size: int = Field(default=20, gt=0)
    db_max_overflow: int = Field(default=0, ge=0)
    # PostgreSQL plans each prepared statement once per connection (plan_cache_mode =
    # force_generic_plan) instead of again at many executions: docs/production.md.
    db_generic_plans: bool = True
    # Names of exchanges and queues start with this, so deployments (and test runs) sharing a
    # broker never see each other's messages.
    amqp_prefix: str = "nephos"
    amqp_prefetch: int = Field(default=64, gt=0, le=65535)
    # Durable queues as quorum queues (replicated across a RabbitMQ cluster) instead of classic
    # ones. Chosen before a prefix's first start: the broker will not convert existing queues.
    amqp_quorum: bool = False
    # A user (not an admin) found behind a bearer token is remembered this long by the process
    # that found it, so the user's requests skip reading it (accounts.KnownTokens says why that
    # is exact). 0 reads the caller on every request.
    auth_cache_seconds: float = Field(default=10, ge=0)
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = None
    # Where admin commands (``nephos admin ...``) find the running API; default NEPHOS_HOST:PORT.
    api_url: str | None = None
    hosts: str = "host-1:16:32768,host-2:16:32768"
    # Key that encrypts stored EC2 secrets (a Fernet key). When unset, one is
    # generated into ``secret_key_file`` on first start and reused after.
    secret_key: SecretStr | None = None
    secret_key_file: Path = Path("./var/secret.key")
    # Seconds a job may run before the stuck-task sweeper resolves it.
    job_deadline_seconds: int = Field(default=600, gt=0)
    log_level: str = "info"
    # Agents: how often they say they are alive and send their whole inventory.
    heartbeat_interval: float = Field(default=3.0, gt=0)
    inventory_interval: float = Field(default=30.0, gt=0)
    # Dispatchers: results queued up are applied up to this many per transaction (1: one by one),
    # by up to this many transactions at once per dispatcher process (another one starts only
    # when more than a whole batch waits for each one running).
    result_batch: int = Field(default=32, gt=0, le=1000)
    result_runners: int = Field(default=4, gt=0, le=64)
    # Dispatchers: how often the sweepers run, when a silent host is down, when to re-send.
    sweep_interval: float = Field(default=1.0, gt=0)
    host_timeout: float = Field(default=15.0, gt=0)
    resend_after: float = Field(default=3.0, gt=0)
    # Seconds between the dispatcher's reconciliation passes (the drift report).
    reconcile_interval: float = Field(default=60.0, gt=0)
    ec2_region: str = Field(
        default="us-east-1",
        min_length=1,
        max_length=64,
        description="The region the EC2 facade answers to (SigV4 scope, DescribeRegions)",
    )
    # Where ``up`` keeps the node definitions of its simulated hosts.
    state_dir: Path = Path("./var")
    # Agents on real hypervisors: image store, VM disks, graceful-stop timeout.
    image_dir: Path = Path("/var/lib/nephos/images")
    instance_dir: Path = Path("/var/lib/nephos/instances")
    stop_timeout: float = Field(default=60.0, gt=0)
    # Agents: libvirt's domain type on real hypervisors. "qemu" (software emulation) where
    # /dev/kvm exists but does not run guests, as in nested or container set-ups.
    domain_type: Literal["kvm", "qemu"] = "kvm"
    # Address a domain's VNC server listens on (agents). Loopback by default: reaching a
    # console from elsewhere is an operator's choice (a proxy, or an address on a private net).
    vnc_listen: str = Field(default="127.0.0.1", min_length=1)
    # Seconds between the lease sweeper's passes: due scheduled actions (leases' ends among
    # them), warnings to record, mails and webhook deliveries to send, the retention purge.
    lease_interval: float = Field(default=30.0, gt=0)
    # Mail (lease warnings and ends). No mail is sent while smtp_host is unset; notifications
    # are still recorded, and go out once a mail server is set.
    smtp_host: str | None = None
    smtp_port: int = Field(default=25, gt=0, lt=65536)
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = Field(default="nephos@localhost", min_length=3)
    smtp_timeout: float = Field(default=10.0, gt=0)
    # A mail or webhook delivery that failed is tried again after this many seconds, doubled
    # after each further failure (capped at an hour).
    notify_retry: float = Field(default=30.0, gt=0)
    # Webhooks: how long a receiver may take, and how many failures in a row disable one.
    webhook_timeout: float = Field(default=5.0, gt=0)
    webhook_max_failures: int = Field(default=8, gt=0)
    # The metadata service answers host-side proxies that send this key (unset: it answers none).
    metadata_proxy_key: SecretStr | None = None
    # Each agent on a real hypervisor runs the host-side proxy (when the key is set): it listens
    # here, and its guests' requests to 169.254.169.254:80 are redirected to it (0: no proxy).
    metadata_proxy_listen: str = "0.0.0.0"
    metadata_proxy_port: int = Field(default=8775, ge=0, le=65535)
    # Days a DESTROYED server's row, jobs and events are kept; 0 keeps them for ever.
    retention_days: float = Field(default=30, ge=0)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        """The async drivers Nephos uses; the usual spellings of a PostgreSQL or SQLite URL are
        taken as meaning them (``postgres://`` is what many tools print)."""
        for plain, driver in (
            ("postgres://", "postgresql+asyncpg://"),
            ("postgresql://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if value.startswith(plain):
                return driver + value[len(plain) :]
        if not value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError(
                "must be postgresql+asyncpg://user:password@host/database or sqlite+aiosqlite:///path/to/file.db"
            )
        return value

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        parse_hosts(value)
        return value

    @property
    def host_specs(self) -> list[HostSpec]:
        return parse_hosts(self.hosts)

    @property
    def public_api_url(self) -> str:
        """Where users reach the API (links in mails)."""
        return (self.api_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
