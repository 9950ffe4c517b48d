"""The agent of one hypervisor host: runs jobs on libvirt and reports what happens.

It consumes its host's job queue and publishes to the results queue: a final status per job
(and RUNNING first when the job takes longer than ``running_after``), state changes nobody
asked for (libvirt lifecycle events), its inventory (on
start, periodically and when asked) and heartbeats (the first one registers the host).

Every report about a VM carries ``seq``, which only grows: a hybrid clock, the larger of
"last + 1" and the wall clock in nanoseconds, so it keeps growing across agent restarts.
While a job runs on a domain, lifecycle events for that domain are not reported: the job's
own result says where it ended, and a stray event must not overtake it.

The agent imports only the message schemas, the bus and its driver: it never touches the
database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import libvirt
from pydantic import ValidationError

from app.backend.driver import Driver
from app.backend.metaproxy import MetadataProxy
from app.bus import Bus, Poison
from app.messages import (
    TO_AGENT,
    VERSION,
    Action,
    Heartbeat,
    Inventory,
    InventoryRequest,
    JobMessage,
    JobStatus,
    PeerAck,
    PeerTransfer,
    StateChange,
    encode,
)

log = logging.getLogger("nephos.agent")
_events_loop: asyncio.AbstractEventLoop | None = None


def register_event_loop_impl() -> None:
    """Dispatch libvirt's events on the running asyncio loop (before any connection opens).

    A process normally has one loop; when a new one runs (tests), the registration follows it,
    or lifecycle events would go to a loop that no longer runs.
    """
    global _events_loop
    import libvirtaio

    loop = asyncio.get_running_loop()
    if _events_loop is None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
    elif _events_loop is not loop:
        # libvirt takes one registration per process; handles and timers that connections
        # opened from now on add go to the loop the implementation points at.
        impl = libvirtaio.getCurrentImpl()
        assert impl is not None
        impl.loop = loop
    _events_loop = loop


class Agent:
    def __init__(
        self,
        *,
        host: str,
        zone: str,
        driver: Driver,
        bus: Bus,
        heartbeat_interval: float = 3.0,
        inventory_interval: float = 30.0,
        migration_uri: str | None = None,
        peer_timeout: float = 60.0,
        running_after: float = 0.5,
        metadata_proxy: MetadataProxy | None = None,
    ) -> None:
        self.host, self.zone, self.driver, self.bus = host, zone, driver, bus
        self.heartbeat_interval, self.inventory_interval = heartbeat_interval, inventory_interval
        self.migration_uri, self.peer_timeout, self.running_after = migration_uri, peer_timeout, running_after
        self._seq = 0
        self._locks: defaultdict[uuid.UUID, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._busy: set[uuid.UUID] = set()
        self._peers: dict[uuid.UUID, asyncio.Future[PeerAck]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._callback_id: int | None = None
        self.cpus, self.ram_mb = 0, 0
        self.metadata_proxy = metadata_proxy

    def next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns())
        return self._seq

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        register_event_loop_impl()
        await self.driver.open()
        self.cpus, self.ram_mb = await self.driver.capacity()
        assert self.driver.conn is not None
        self._callback_id = self.driver.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
        )
        if self.metadata_proxy is not None:
            await self.metadata_proxy.start()
        await self.heartbeat()
        await self.publish_inventory()
        await self.bus.consume_jobs(self.host, self.handle)
        self._loops = [
            asyncio.create_task(self._every(self.heartbeat_interval, self.heartbeat)),
            asyncio.create_task(self._every(self.inventory_interval, self.publish_inventory)),
        ]
        log.info(
            "agent for %s (%s) up: %d CPUs, %d MiB on %s", self.host, self.zone, self.cpus, self.ram_mb, self.driver.uri
        )

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._callback_id is not None and self.driver.conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.driver.conn.domainEventDeregisterAny(self._callback_id)
        if self.metadata_proxy is not None:
            await self.metadata_proxy.stop()
        await self.driver.close()

    async def _every(self, interval: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except Exception:  # the broker may be away; the next tick tries again
                log.warning("periodic %s failed", getattr(fn, "__name__", fn), exc_info=True)

    async def heartbeat(self) -> None:
        await self.bus.publish_heartbeat(
            encode(
                Heartbeat(
                    host=self.host,
                    zone=self.zone,
                    cpus=self.cpus,
                    ram_mb=self.ram_mb,
                    sent_at=datetime.now(UTC),
                    migration_uri=self.migration_uri,
                    hypervisor=self.driver.hypervisor,
                )
            )
        )

    async def publish_inventory(self, request_id: str | None = None) -> None:
        domains = await self.driver.domains()
        await self.bus.publish_result(
            encode(
                Inventory(
                    host=self.host,
                    zone=self.zone,
                    cpus=self.cpus,
                    ram_mb=self.ram_mb,
                    domains=domains,
                    taken_at=datetime.now(UTC),
                    request_id=request_id,
                )
            )
        )

    # -- unsolicited changes ------------------------------------------------------------------
    def _on_lifecycle(self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int, _opaque: Any) -> None:
        # Runs on the event loop: read only what the domain object already holds (its UUID);
        # the state is asked of libvirt off the loop, in ``_report``.
        try:
            server_id = uuid.UUID(dom.UUIDString())
        except ValueError:
            return
        self.driver.touched(server_id)  # a simulated host's file reads it again on its next write
        if server_id in self._busy:
            return  # the running job reports where it ends
        self.bus.spawn(self._report(server_id, f"libvirt lifecycle event {event}/{detail}"))

    async def _report(self, server_id: uuid.UUID, reason: str) -> None:
        try:
            state = await self.driver.state(server_id)
            if server_id in self._busy:
                return
            await self.bus.publish_result(
                encode(
                    StateChange(
                        server_id=server_id, host=self.host, domain_state=state, seq=self.next_seq(), reason=reason
                    )
                )
            )
        except Exception:
            log.warning("could not report a state change of %s: the next inventory will", server_id, exc_info=True)

    # -- jobs ---------------------------------------------------------------------------------
    async def handle(self, body: bytes) -> None:
        try:
            message = TO_AGENT.validate_json(body)
        except ValidationError as exc:
            raise Poison(f"not a message for an agent: {exc.errors()[:1]}") from None
        if message.v != VERSION:
            raise Poison(f"message version {message.v} is not {VERSION}")
        if isinstance(message, JobMessage):
            await self.run_job(message)
        elif isinstance(message, InventoryRequest):
            await self.publish_inventory(message.request_id)
        elif isinstance(message, PeerTransfer):
            await self._adopt(message)
        elif isinstance(message, PeerAck):
            waiter = self._peers.get(message.job_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)

    async def _status(self, job: JobMessage, status: str, **kw: Any) -> None:
        await self.bus.publish_result(
            encode(
                JobStatus(
                    job_id=job.job_id, server_id=job.server_id, host=self.host, status=status, seq=self.next_seq(), **kw
                )
            )
        )

    async def run_job(self, job: JobMessage) -> None:
        if job.host != self.host:
            raise Poison(f"job {job.job_id} is for {job.host}, not {self.host}")
        async with self._locks[job.server_id]:
            self._busy.add(job.server_id)
            # RUNNING is progress for slow jobs: one finished within ``running_after`` seconds
            # goes straight to its result (which records the start), saving a message and a
            # dispatcher transaction per job.
            running = asyncio.create_task(self._report_running(job))
            try:
                try:
                    details = await self._run(job)
                    error = None
                except libvirt.libvirtError as exc:
                    details, error = {}, str(exc)
                except Exception as exc:  # never crash on a job: report it
                    log.exception("job %s (%s) failed", job.job_id, job.action)
                    details, error = {}, f"{type(exc).__name__}: {exc}"
                running.cancel()
                await self._persist(job.server_id)
                state = await self.driver.state(job.server_id)
                # Publishing may fail (broker away): then the job is redelivered, runs again
                # (idempotent), and its result is published then.
                if job.params.get("purge"):
                    details = {**details, "purge": True}
                await self._status(
                    job, "ERROR" if error else "SUCCESS", error=error, domain_state=state, details=details
                )
            finally:
                running.cancel()
                self._busy.discard(job.server_id)

    async def _persist(self, changed: uuid.UUID | None = None) -> None:
        try:
            await self.driver.persist(changed)
        except Exception:  # a simulated host's file only: never fail a job over it
            log.warning("could not save the simulated host's domains", exc_info=True)

    async def _report_running(self, job: JobMessage) -> None:
        await asyncio.sleep(self.running_after)
        with contextlib.suppress(Exception):  # progress only: the result is what counts
            await self._status(job, "RUNNING")

    async def _run(self, job: JobMessage) -> dict[str, Any]:
        d, sid, p = self.driver, job.server_id, job.params
        if job.action in (Action.CREATE, Action.RELEASE):
            return await d.create(sid, p)
        if job.action in (Action.MIGRATE, Action.LIVE_MIGRATE):
            return await self._migrate(job)
        handler = getattr(d, job.action, None)
        if handler is None or job.action.startswith("_"):
            raise libvirt.libvirtError(f"unknown action {job.action}")
        return await handler(sid, p)  # type: ignore[no-any-return]

    async def _migrate(self, job: JobMessage) -> dict[str, Any]:
        target = str(job.params["target_host"])
        live = job.action == Action.LIVE_MIGRATE
        target_uri = job.params.get("target_uri")
        if not self.driver.simulated:
            # A real hypervisor migrates with libvirt itself (live: the guest keeps running);
            # never by a cold boot on the target while the source still runs.
            if not target_uri:
                raise libvirt.libvirtError(f"no migration URI for host {target}: its agent needs --migration-uri")
            await self.driver.migrate_native(job.server_id, str(target_uri), live)
            return {"target_host": target, "live": live, "via": str(target_uri)}
        exported = await self.driver.export(job.server_id, job.params.get("target_vnc_port"))
        if exported is None:
            # Not here: a redelivered job whose migration already happened.
            return {"target_host": target, "already_moved": True}
        domain_xml, running = exported
        waiter: asyncio.Future[PeerAck] = asyncio.get_running_loop().create_future()
        self._peers[job.job_id] = waiter
        try:
            await self.bus.publish_job(
                target,
                encode(
                    PeerTransfer(
                        job_id=job.job_id,
                        server_id=job.server_id,
                        source=self.host,
                        domain_xml=domain_xml,
                        start=running,
                    )
                ),
            )
            ack = await asyncio.wait_for(waiter, self.peer_timeout)
        except TimeoutError:
            message = f"host {target} did not take the domain within {self.peer_timeout:.0f}s"
            raise libvirt.libvirtError(message) from None
        finally:
            self._peers.pop(job.job_id, None)
        if not ack.ok:
            raise libvirt.libvirtError(f"host {target} refused the domain: {ack.error}")
        await self.driver.forget(job.server_id)
        return {"target_host": target}

    async def _adopt(self, transfer: PeerTransfer) -> None:
        async with self._locks[transfer.server_id]:
            self._busy.add(transfer.server_id)
            try:
                await self.driver.adopt(transfer.domain_xml, transfer.start)
                await self._persist(transfer.server_id)
                ack = PeerAck(job_id=transfer.job_id, ok=True)
            except libvirt.libvirtError as exc:
                ack = PeerAck(job_id=transfer.job_id, ok=False, error=str(exc))
            finally:
                self._busy.discard(transfer.server_id)
        await self.bus.publish_job(transfer.source, encode(ack))
