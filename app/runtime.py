"""The processes: each role is a plain asyncio program built from the same pieces.

``api``, ``dispatcher`` and ``agent`` run separately in production (PostgreSQL + RabbitMQ);
``up`` runs all of them in one event loop on the embedded defaults (SQLite, the in-memory
bus, agents on libvirt's test driver). The code paths are the same; only transports differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt
import sqlalchemy as sa
import uvicorn
from cryptography.fernet import Fernet
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.backend.agent import Agent
from app.backend.driver import Driver, write_test_node
from app.backend.metaproxy import MetadataProxy
from app.bus import Bus, make_bus
from app.bus.base import Misconfigured
from app.bus.outbox import OutboxPublisher
from app.db import engine_of, make_engine, make_sessionmaker, transient
from app.dispatcher.handlers import Dispatcher
from app.dispatcher.notifier import Notifier
from app.dispatcher.pace import Pace
from app.dispatcher.sweepers import Sweepers
from app.serverkey import load_cipher
from app.settings import Settings

log = logging.getLogger("nephos")


@dataclass
class Plane:
    """Database and bus of one process, and what runs on them."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    bus: Bus
    outbox: OutboxPublisher
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    dispatcher: Dispatcher | None = None
    sweepers: Sweepers | None = None
    # Set when the process stops: the dispatcher's loops end between passes (``Pace``).
    pace: Pace = field(default_factory=Pace)

    @functools.cached_property
    def cipher(self) -> Fernet:
        """The server key, read (or made) when first needed: agents never need it."""
        return load_cipher(self.settings)

    async def start_dispatcher(self) -> Dispatcher:
        self.dispatcher = Dispatcher(
            self.sessions, batch=self.settings.result_batch, runners=self.settings.result_runners
        )
        await self.bus.consume_results(self.dispatcher.handle)
        await self.bus.consume_heartbeats(self.dispatcher.handle)
        s = self.settings
        self.sweepers = Sweepers(
            self.sessions,
            self.bus,
            self.outbox,
            interval=s.sweep_interval,
            host_timeout=s.host_timeout,
            resend_after=s.resend_after,
            reconcile_interval=s.reconcile_interval,
            lease_interval=s.lease_interval,
            retention_days=s.retention_days,
            pace=self.pace,
        )
        notifier = Notifier(self.sessions, s, lambda: self.cipher, self.pace)
        self.tasks.append(asyncio.create_task(self.sweepers.run()))
        self.tasks.append(asyncio.create_task(self.sweepers.reconcile_forever()))
        self.tasks.append(asyncio.create_task(self.sweepers.leases_forever()))
        self.tasks.append(asyncio.create_task(notifier.run(min(s.lease_interval, 5.0))))
        return self.dispatcher

    async def start_agent(
        self, *, host: str, uri: str, zone: str = "default", migration_uri: str | None = None
    ) -> Agent:
        s = self.settings
        # The metadata proxy runs beside an agent of a real hypervisor, when proxies have a key.
        proxied = not uri.startswith("test:") and s.metadata_proxy_key is not None and s.metadata_proxy_port > 0
        driver = Driver(
            uri,
            vnc_listen=s.vnc_listen,
            image_dir=s.image_dir,
            instance_dir=s.instance_dir,
            stop_timeout=s.stop_timeout,
            domain_type=s.domain_type,
            metadata_port=s.metadata_proxy_port if proxied else None,
        )
        proxy = None
        if proxied:
            assert s.metadata_proxy_key is not None
            proxy = MetadataProxy(
                gateways=driver.gateways,
                upstream=s.public_api_url,
                key=s.metadata_proxy_key.get_secret_value(),
                listen=s.metadata_proxy_listen,
                port=s.metadata_proxy_port,
            )
        agent = Agent(
            host=host,
            zone=zone,
            driver=driver,
            bus=self.bus,
            heartbeat_interval=s.heartbeat_interval,
            inventory_interval=s.inventory_interval,
            migration_uri=migration_uri,
            metadata_proxy=proxy,
        )
        try:
            await agent.start()
        except libvirt.libvirtError as exc:
            raise StartupError(f"libvirt at {uri} cannot be opened: {exc}") from None
        except OSError as exc:
            raise StartupError(str(exc)) from None
        self.agents.append(agent)
        return agent


class StartupError(Exception):
    """A process cannot start as configured (a wrong URL or password, a database that does not
    exist, no libvirt): the command line says so in one line and exits non-zero. ``lasting``:
    waiting will not help (a refused login, a refused topology), so even the API, which serves
    while the broker is away, stops."""

    def __init__(self, message: str, *, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting


def _masked(url: str) -> str:
    """A URL as it may be shown: without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _refused_login(exc: BaseException) -> bool:
    return "ACCESS_REFUSED" in str(exc) or type(exc).__name__ == "ProbableAuthenticationError"


async def connect_bus(bus: Bus, *, attempts: int | None = 60, delay: float = 1.0, url: str = "") -> None:
    """Connect, waiting for a broker that is still starting (``attempts=None``: for ever). A broker
    that refuses the login will not change its mind: that is a ``StartupError`` at once."""
    attempt = 0
    while True:
        attempt += 1
        try:
            await bus.start()
            return
        except Misconfigured as exc:
            raise StartupError(str(exc), lasting=True) from None
        except (ConnectionError, OSError) as exc:
            if _refused_login(exc):
                raise StartupError(
                    f"the message bus at {_masked(url)} refused the login (check the user and "
                    "password in NEPHOS_AMQP_URL)",
                    lasting=True,
                ) from None
            if attempts is not None and attempt >= attempts:
                raise StartupError(f"the message bus at {_masked(url)} cannot be reached: {exc}") from None
            log.warning("message bus not reachable (%s); retrying", exc)
            await asyncio.sleep(delay)


async def check_database(settings: Settings, engine: AsyncEngine | None = None) -> None:
    """One query before serving: a database that does not exist, refuses the login or cannot be
    reached is said in one line, instead of failing every request later. With ``engine`` (the
    process's own), the probe uses it; without, it makes and drops one (one-shot commands)."""
    probe = engine or make_engine(settings.database_url)
    try:
        async with probe.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except (sa_exc.DBAPIError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise StartupError(f"the database at {_masked(settings.database_url)} cannot be used: {reason}") from None
    finally:
        if engine is None:
            await probe.dispose()


@contextlib.asynccontextmanager
async def plane(settings: Settings, bus: Bus | None = None, *, wait_for_bus: bool = True) -> AsyncIterator[Plane]:
    """The database and bus of one process. ``wait_for_bus=False`` (the API): a broker that is
    away does not hold the process back; it connects in the background, ``/healthz`` says 503
    until it has, and jobs committed meanwhile wait in the outbox."""
    engine = engine_of(settings)
    try:
        await check_database(settings, engine)
    except StartupError:
        await engine.dispose()
        raise
    sessions = make_sessionmaker(engine)
    bus = bus or make_bus(settings)
    bus.transient = transient  # a handler's database hiccup is retried, never dead-lettered
    background: list[asyncio.Task[None]] = []
    if wait_for_bus:
        await connect_bus(bus, url=settings.amqp_url)
    else:
        try:
            await connect_bus(bus, attempts=1, url=settings.amqp_url)
        except StartupError as exc:
            if exc.lasting:
                raise
            log.warning("%s; serving anyway, and connecting in the background", exc)
            background.append(asyncio.create_task(_connect_later(bus, settings.amqp_url)))
    p = Plane(settings, engine, sessions, bus, OutboxPublisher(sessions, bus, lambda: p.cipher))
    p.tasks.extend(background)
    p.tasks.append(asyncio.create_task(p.outbox.run()))
    try:
        yield p
    finally:
        # Loops end between passes (a task cancelled inside a database call can leave its
        # connection half-closed); what still runs after the grace is cancelled. Each step of
        # the shutdown is bounded: a process asked to stop always stops.
        p.pace.stopping.set()
        p.outbox.stop()
        if p.tasks:
            _, running = await asyncio.wait(p.tasks, timeout=5.0)
            for task in running:
                task.cancel()
            await _bounded("background tasks", asyncio.gather(*running, return_exceptions=True))
        if p.dispatcher is not None:
            await _bounded("the dispatcher", p.dispatcher.close())
        for agent in p.agents:
            await _bounded(f"agent {agent.host}", agent.stop())
        await _bounded("the bus", bus.close())
        await _bounded("the database pool", engine.dispose())


async def _connect_later(bus: Bus, url: str) -> None:
    try:
        await connect_bus(bus, attempts=None, delay=2.0, url=url)
        log.info("message bus connected")
    except StartupError as exc:  # the login was refused after all: say so, keep serving (503)
        log.error("%s", exc)


async def _bounded(what: str, step: Awaitable[Any], seconds: float = 5.0) -> None:
    try:
        async with asyncio.timeout(seconds):
            await step
    except TimeoutError:
        log.warning("stopping %s took over %.0fs; going on without it", what, seconds)


#: Seconds a process has to stop cleanly once told to, before its watchdog ends it.
SHUTDOWN_GRACE = 20.0


async def until_signalled(grace: float = SHUTDOWN_GRACE) -> None:
    """Until SIGTERM/SIGINT; then the process has ``grace`` seconds to shut down cleanly before a
    watchdog ends it (a driver that ignores cancellation must not keep a stopped process alive)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    start_watchdog(grace)


def start_watchdog(grace: float = SHUTDOWN_GRACE) -> None:
    watchdog = threading.Timer(grace, _give_up, args=(grace,))
    watchdog.daemon = True
    watchdog.start()


def _give_up(grace: float) -> None:
    log.warning("shutdown took over %.0fs: exiting now", grace)
    logging.shutdown()
    os._exit(1)


async def serve_api(p: Plane, sock: socket.socket | None = None) -> None:
    """The REST API on this plane's database and bus, until SIGTERM/SIGINT (on ``sock`` when
    given: a socket bound by the parent of several workers)."""
    from app.api.app import create_app
    from app.api.deps import AppState

    s = p.settings
    state = AppState(
        settings=s,
        sessions=p.sessions,
        cipher=p.cipher,
        publish=p.outbox.submit,
        bus_ok=lambda: p.bus.connected,
        bus=p.bus,
    )
    config = uvicorn.Config(
        create_app(s, state),
        host=s.host,
        port=s.port,
        log_level=s.log_level,
        http="httptools",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    await uvicorn.Server(config).serve(sockets=[sock] if sock is not None else None)
    start_watchdog()  # uvicorn handled the signal; what follows is bounded too


async def run_api(settings: Settings, sock: socket.socket | None = None) -> None:
    async with plane(settings, wait_for_bus=False) as p:
        await serve_api(p, sock)


#: A worker that exits within this many seconds of its start is not started again (it is
#: misconfigured, not unlucky): the others are stopped and the command fails.
RESPAWN_AFTER = 5.0


def serve_workers(settings: Settings, workers: int, run: Callable[[Awaitable[None]], None]) -> int:
    """``workers`` API processes on one listening socket, each a whole ``nephos api`` (its own
    event loop, pool, bus connection and outbox); the kernel spreads connections among them.

    The parent binds the port, reads (or makes) the server key once so every worker seals with
    the same one, then forks. It forwards SIGTERM/SIGINT to the workers, starts again one that
    dies (SIGKILL, out of memory), and returns once all have stopped. Each worker is the leader of
    its own process group, so a terminal's ^C reaches the parent alone, which passes it on once.
    """
    if settings.secret_key is None:
        load_cipher(settings)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    children: dict[int, float] = {}
    stopping = False

    def start() -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            os.setpgid(0, 0)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                run(run_api(settings, sock))
            except BaseException:
                log.exception("API worker %d failed", os.getpid())
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = time.monotonic()

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(workers):
        start()
    log.info("%d API workers serving on %s:%d", workers, settings.host, settings.port)
    failed = False
    while children:
        pid, status = os.wait()
        started = children.pop(pid, None)
        if started is None or stopping:
            continue
        log.warning("API worker %d ended (%s)", pid, _ended(status))
        if time.monotonic() - started < RESPAWN_AFTER:
            failed = True
            stop(signal.SIGTERM, None)
        else:
            start()
    sock.close()
    return 1 if failed else 0


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


async def run_dispatcher(settings: Settings) -> None:
    async with plane(settings) as p:
        await p.start_dispatcher()
        log.info("dispatcher consuming results")
        await until_signalled()


async def run_agent(settings: Settings, *, host: str, uri: str, zone: str, migration_uri: str | None) -> None:
    async with plane(settings) as p:
        await p.start_agent(host=host, uri=uri, zone=zone, migration_uri=migration_uri)
        await until_signalled()


async def run_up(settings: Settings) -> None:
    """api + dispatcher + one agent per ``NEPHOS_HOSTS`` entry on the test driver, one process."""
    async with plane(settings) as p:
        await p.start_dispatcher()
        for spec in settings.host_specs:
            uri = write_test_node(settings.state_dir / "hosts", spec.name, spec.cpus, spec.ram_mb)
            await p.start_agent(host=spec.name, uri=uri, zone=spec.zone)
        await serve_api(p)
