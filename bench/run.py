"""End-to-end benchmark: Nephos on PostgreSQL + RabbitMQ against the floor of the same machine.

Starts ``nephos api``, ``nephos dispatcher`` and two ``nephos agent`` processes on a fresh
database and a private RabbitMQ prefix, drives N VMs through create -> STARTED -> stop -> start
-> destroy with C of them in flight at once, then measures in the same run what PostgreSQL and
RabbitMQ alone manage: single-row commits per second (asyncpg) and persistent, confirmed
publish + consume messages per second (aio-pika). One VM action costs at least two commits
(accept it, apply its result) and two such messages (the job, its result): that is the floor.

    python bench/run.py [--n 1000] [--concurrency 50] [--pg postgresql://...] [--amqp amqp://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "nph_bench_admin_token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ACTIONS = ("create", "stop", "start", "destroy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nephos() -> str:
    return shutil.which("nephos", path=str(Path(sys.executable).parent)) or "nephos"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Cluster:
    def __init__(self, pg: str, amqp: str, workdir: Path) -> None:
        self.pg_admin, self.amqp, self.workdir = pg, amqp, workdir
        self.database = f"nephos_bench_{uuid.uuid4().hex[:8]}"
        self.url = pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1) + "/" + self.database
        self.port = free_port()
        self.prefix = f"nephos-bench-{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("NEPHOS_")},
            "NEPHOS_DATABASE_URL": self.url,
            "NEPHOS_AMQP_URL": amqp,
            "NEPHOS_AMQP_PREFIX": self.prefix,
            "NEPHOS_PORT": str(self.port),
            "NEPHOS_ADMIN_TOKEN": TOKEN,
            "NEPHOS_LOG_LEVEL": "warning",
            "NEPHOS_STATE_DIR": str(workdir),
            "NEPHOS_SECRET_KEY_FILE": str(workdir / "secret.key"),
        }

    async def start(self) -> None:
        conn = await asyncpg.connect(self.pg_admin)
        await conn.execute(f'CREATE DATABASE "{self.database}"')
        await conn.close()
        subprocess.run([nephos(), "seed"], env=self.env, check=True, capture_output=True)
        self._spawn("api", [nephos(), "api"])
        self._spawn("dispatcher", [nephos(), "dispatcher"])
        for host in ("bench-1", "bench-2"):
            self._spawn(host, [nephos(), "agent", "--host", host, "--simulate", "160:400000"])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            for _ in range(600):
                try:
                    r = await client.get("/healthz")
                    if r.status_code == 200 and r.json()["hosts_up"] == 2:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("the cluster did not come up")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    async def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        conn = await asyncpg.connect(self.pg_admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        await conn.close()
        connection = await aio_pika.connect(self.amqp)
        channel = await connection.channel()
        for q in (
            f"{self.prefix}.results",
            f"{self.prefix}.dead",
            f"{self.prefix}.jobs.bench-1",
            f"{self.prefix}.jobs.bench-2",
        ):
            await channel.queue_delete(q)
        for x in (f"{self.prefix}.jobs", f"{self.prefix}.dlx"):
            await channel.exchange_delete(x)
        await connection.close()


async def workload(cluster: Cluster, n: int, concurrency: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{cluster.port}"
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        r = await client.post(
            "/api/v1/admin/projects",
            headers=ADMIN,
            json={
                "name": "bench",
                "quotas": {"vm": n, "cpu": n, "ram": n * 512, "disk": n, "active_cpu": n, "active_ram": n * 512},
            },
        )
        r = await client.post("/api/v1/admin/users", headers=ADMIN, json={"name": "b", "project_id": r.json()["id"]})
        user = {"Authorization": f"Bearer {r.json()['token']}"}
        accept: dict[str, list[float]] = {a: [] for a in ACTIONS}
        answers: Counter[str] = Counter()
        jobs: list[str] = []
        slots = asyncio.Semaphore(concurrency)

        # Waiting on results: one watcher reads the jobs table for every outstanding job at once,
        # so the client's own polling does not load the API it measures.
        waiting: dict[uuid.UUID, asyncio.Future[str]] = {}
        db = await asyncpg.connect(cluster.url.replace("postgresql+asyncpg://", "postgresql://"))

        async def watcher() -> None:
            while True:
                if waiting:
                    rows = await db.fetch(
                        "SELECT id, status FROM jobs WHERE id = ANY($1::uuid[]) AND status IN ('SUCCESS', 'ERROR')",
                        list(waiting),
                    )
                    for row in rows:
                        future = waiting.pop(row["id"], None)
                        if future is not None and not future.done():
                            future.set_result(row["status"])
                await asyncio.sleep(0.01)

        watching = asyncio.create_task(watcher())

        async def wait(job_id: str) -> None:
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            waiting[uuid.UUID(job_id)] = future
            if await future != "SUCCESS":
                raise RuntimeError(f"job {job_id} failed")

        async def timed(action: str, method: str, url: str, body: Any = None) -> str:
            for _ in range(5):
                t0 = time.perf_counter()
                r = await client.request(method, url, headers=user, json=body)
                accept[action].append(time.perf_counter() - t0)
                if r.status_code == 202:
                    break
                # Every other answer is counted by kind (the table prints them); a 503 is
                # retried after its Retry-After, as a client would, anything else ends the run.
                code = (
                    r.json().get("error", {}).get("code", "?")
                    if r.headers.get("content-type", "").startswith("application/json")
                    else "?"
                )
                answers[f"{action}: {r.status_code} {code}"] += 1
                if r.status_code != 503:
                    raise RuntimeError(f"{action} answered {r.status_code}: {r.text}")
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            else:
                raise RuntimeError(f"{action} still answered {r.status_code} after 5 tries: {r.text}")
            data = r.json()
            job_id = data["job_ids"][0] if "job_ids" in data else data["job_id"]
            jobs.append(job_id)
            await wait(job_id)
            return data["servers"][0]["id"] if "servers" in data else job_id

        async def one_vm(i: int) -> None:
            async with slots:
                sid = await timed(
                    "create", "POST", "/api/v1/servers", {"name": f"b{i}", "flavor": "tiny", "image": "debian-12"}
                )
                await timed("stop", "POST", f"/api/v1/servers/{sid}/actions", {"action": "stop"})
                await timed("start", "POST", f"/api/v1/servers/{sid}/actions", {"action": "start"})
                await timed("destroy", "DELETE", f"/api/v1/servers/{sid}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one_vm(i) for i in range(n)))
        wall = time.perf_counter() - t0
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await db.close()

    conn = await asyncpg.connect(cluster.url.replace("postgresql+asyncpg://", "postgresql://"))
    rows = await conn.fetch("SELECT action, EXTRACT(EPOCH FROM finished_at - created_at) AS s FROM jobs")
    await conn.close()
    applied: dict[str, list[float]] = {a: [] for a in ACTIONS}
    for row in rows:
        applied[row["action"]].append(float(row["s"]))
    return {"wall": wall, "actions": 4 * n, "accept": accept, "applied": applied, "answers": answers}


async def floor_commits(pg: str, concurrency: int, seconds: float = 4.0) -> float:
    """Single-row INSERT commits per second, asyncpg, ``concurrency`` connections."""
    conn = await asyncpg.connect(pg)
    table = f"bench_floor_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE TABLE {table} (id uuid PRIMARY KEY, at timestamptz NOT NULL, body text)")
    pool = await asyncpg.create_pool(pg, min_size=concurrency, max_size=concurrency)
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        async with pool.acquire() as c:
            while time.perf_counter() < deadline:
                await c.execute(f"INSERT INTO {table} VALUES ($1, now(), 'x')", uuid.uuid4())
                count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = count / (time.perf_counter() - t0)
    await pool.close()
    await conn.execute(f"DROP TABLE {table}")
    await conn.close()
    return rate


async def floor_messages(amqp: str, concurrency: int, total: int = 5000) -> float:
    """Persistent messages published with confirms (``concurrency`` in flight) and consumed with acks."""
    connection = await aio_pika.connect_robust(amqp)
    publish = await connection.channel(publisher_confirms=True)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=concurrency)
    name = f"bench-floor-{uuid.uuid4().hex[:8]}"
    queue = await consume.declare_queue(name, durable=True)
    got = asyncio.Event()
    received = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal received
        await message.ack()
        received += 1
        if received == total:
            got.set()

    await queue.consume(on_message)
    window = asyncio.Semaphore(concurrency)

    async def send(i: int) -> None:
        async with window:
            await publish.default_exchange.publish(
                aio_pika.Message(b"{}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=name
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(send(i) for i in range(total)))
    await got.wait()
    rate = total / (time.perf_counter() - t0)
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    return rate


def table(result: dict[str, Any], commits: float, messages: float, n: int, concurrency: int) -> str:
    ms = 1000.0
    rate = result["actions"] / result["wall"]
    floor = 1 / (2 / commits + 2 / messages)
    lines = [
        f"N = {n} VMs, concurrency C = {concurrency}, {result['actions']} actions in {result['wall']:.1f} s",
        "",
        "| step | 202 p50 (ms) | 202 p99 (ms) | 202 → applied p50 (ms) | 202 → applied p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for a in ACTIONS:
        acc, app = result["accept"][a], result["applied"][a]
        lines.append(
            f"| {a} | {pct(acc, 50) * ms:.1f} | {pct(acc, 99) * ms:.1f} | {pct(app, 50) * ms:.1f} | "
            f"{pct(app, 99) * ms:.1f} |"
        )
    every_accept = [x for a in ACTIONS for x in result["accept"][a]]
    every_applied = [x for a in ACTIONS for x in result["applied"][a]]
    lines.append(
        f"| **all** | {pct(every_accept, 50) * ms:.1f} | {pct(every_accept, 99) * ms:.1f} | "
        f"{pct(every_applied, 50) * ms:.1f} | {pct(every_applied, 99) * ms:.1f} |"
    )
    lines += [
        "",
        "| measure | per second |",
        "| --- | ---: |",
        f"| Nephos: VM actions (create, stop, start, destroy), end to end | {rate:.1f} |",
        f"| floor: asyncpg single-row commits ({concurrency} connections) | {commits:.0f} |",
        f"| floor: aio-pika persistent confirmed publish + consume ({concurrency} in flight) | {messages:.0f} |",
        f"| floor: one action = 2 commits + 2 messages → 1 / (2/commits + 2/messages) | {floor:.1f} |",
        f"| **Nephos / floor** | **{rate / floor:.2f}** |",
        "",
        "| answers other than 202 | count |",
        "| --- | ---: |",
        *(f"| {kind} | {count} |" for kind, count in sorted(result["answers"].items())),
        f"| **total** | **{sum(result['answers'].values())}** |",
    ]
    return "\n".join(lines)


def arguments(doc: str | None, n: int, concurrency: int) -> argparse.Namespace:
    """The options both benchmarks take: N, concurrency, and the services."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--concurrency", type=int, default=concurrency)
    parser.add_argument(
        "--pg", default=os.environ.get("NEPHOS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    parser.add_argument("--amqp", default=os.environ.get("NEPHOS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/"))
    return parser.parse_args()


@contextlib.asynccontextmanager
async def running(args: argparse.Namespace, workdir: Path) -> AsyncIterator[Cluster]:
    """A Nephos cluster for the body; if the body fails, the processes' logs are printed."""
    cluster = Cluster(args.pg, args.amqp, workdir)
    await cluster.start()
    try:
        yield cluster
    except Exception:
        for log in sorted(workdir.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        await cluster.stop()


async def main() -> None:
    args = arguments(__doc__, n=1000, concurrency=50)
    with tempfile.TemporaryDirectory(prefix="nephos-bench-") as tmp:
        async with running(args, Path(tmp)) as cluster:
            result = await workload(cluster, args.n, args.concurrency)
    commits = await floor_commits(args.pg, args.concurrency)
    messages = await floor_messages(args.amqp, args.concurrency)
    print(table(result, commits, messages, args.n, args.concurrency))


if __name__ == "__main__":
    asyncio.run(main())
