"""Scale figures: a cloud of 10,000 VMs on 10 hosts, through the API.

Starts ``nephos api``, ``nephos dispatcher`` and ten ``nephos agent`` processes (simulated
test-driver hosts) on a fresh PostgreSQL database and a private RabbitMQ prefix, creates N VMs
(default 10,000) through ``POST /api/v1/servers`` with ``count`` = 100, waits until every one is
STARTED, then measures, one client request at a time:

* ``GET /api/v1/servers`` over all of them in pages of 100 (the cursor to the end, twice): each page;
* EC2 ``DescribeInstances`` with ``MaxResults`` = 100 over the same (boto3, NextToken to the end);
* ``POST /api/v1/admin/reconcile``: every agent asked for its inventory, 10,000 VMs compared;
* the API process's resident memory after those passes.

It prints a table and writes ``bench/last-scale.json``; it never asserts a time, and exits
non-zero only if a request failed or the reconcile found drift (the figures would be wrong).

    python bench/scale.py [--n 10000]
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ec2 import make_client
from run import ADMIN, ROOT, arguments, pct, running

HOSTS = 10
PER_REQUEST = 100


async def fill(client: httpx.AsyncClient, db: asyncpg.Connection, user: dict[str, str], n: int) -> float:
    """N VMs through the API, ``PER_REQUEST`` per create, 4 creates at once; until all STARTED."""
    slots = asyncio.Semaphore(4)

    async def create(i: int) -> None:
        async with slots:
            body = {"name": f"s{i}", "flavor": "tiny", "image": "debian-12", "count": min(PER_REQUEST, n - i)}
            body["networks"] = ["scale"]
            r = await client.post("/api/v1/servers", headers=user, json=body)
            if r.status_code != 202:
                raise RuntimeError(f"create answered {r.status_code}: {r.text}")

    t0 = time.perf_counter()
    await asyncio.gather(*(create(i) for i in range(0, n, PER_REQUEST)))
    while True:
        done = await db.fetchval("SELECT count(*) FROM servers WHERE operstate = 'STARTED' AND task IS NULL")
        failed = await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'ERROR'")
        if failed:
            raise RuntimeError(f"{failed} creates failed")
        if done >= n:
            return time.perf_counter() - t0
        await asyncio.sleep(0.2)


async def list_pages(client: httpx.AsyncClient, user: dict[str, str]) -> tuple[list[float], int]:
    took, seen, cursor = [], 0, None
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        t0 = time.perf_counter()
        r = await client.get("/api/v1/servers", headers=user, params=params)
        took.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"list answered {r.status_code}: {r.text}")
        page = r.json()
        seen += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return took, seen


def describe_pages(ec2: Any) -> tuple[list[float], int]:
    took, seen, token = [], 0, None
    while True:
        t0 = time.perf_counter()
        page = ec2.describe_instances(MaxResults=100, **({"NextToken": token} if token else {}))
        took.append(time.perf_counter() - t0)
        seen += sum(len(r["Instances"]) for r in page["Reservations"])
        token = page.get("NextToken")
        if not token:
            return took, seen


async def scale(args: Any, workdir: Path) -> dict[str, Any]:
    n = args.n
    size = f"{n // HOSTS + 200}:{(n // HOSTS + 200) * 512}"
    async with running(args, workdir, hosts=HOSTS, size=size) as cluster:
        base = f"http://127.0.0.1:{cluster.port}"
        db = await asyncpg.connect(cluster.url.replace("postgresql+asyncpg://", "postgresql://"))
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            quotas = {"vm": n, "cpu": n, "ram": n * 512, "disk": n, "active_cpu": n, "active_ram": n * 512}
            r = await client.post("/api/v1/admin/projects", headers=ADMIN, json={"name": "scale", "quotas": quotas})
            project = r.json()["id"]
            r = await client.post("/api/v1/admin/users", headers=ADMIN, json={"name": "s", "project_id": project})
            user = {"Authorization": f"Bearer {r.json()['token']}"}
            # Room for every VM's address: a /16 of the project's own.
            r = await client.post("/api/v1/networks", headers=user, json={"name": "scale", "cidr": "10.200.0.0/16"})
            if r.status_code != 201:
                raise RuntimeError(f"network answered {r.status_code}: {r.text}")
            filled = await fill(client, db, user, n)
            rss_before = cluster.rss_mb("api")

            listed, seen = await list_pages(client, user)
            more, _ = await list_pages(client, user)  # a second pass: twice the samples for the p99
            listed += more
            if seen != n:
                raise RuntimeError(f"the list showed {seen} of {n} VMs")

            r = await client.post("/api/v1/credentials/ec2", headers=user)
            ec2 = make_client(f"{base}/ec2", r.json()["access_key"], r.json()["secret_key"], 1)
            described, seen = await asyncio.to_thread(describe_pages, ec2)
            if seen != n:
                raise RuntimeError(f"DescribeInstances showed {seen} of {n} instances")
            rss_after = cluster.rss_mb("api")
            if args.profile is not None:  # the API's flame graph: one more pass of each, not measured
                args.profile.mkdir(parents=True, exist_ok=True)
                spy = subprocess.Popen(
                    [shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy", "record", "--pid",
                     str(cluster.roles["api"][0]), "--rate", "200", "--nonblocking", "--output",
                     str(args.profile / "api-list.svg")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                await asyncio.sleep(1.0)
                await list_pages(client, user)
                await asyncio.to_thread(describe_pages, ec2)
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)

            reconciles = []
            for _ in range(3):
                t0 = time.perf_counter()
                r = await client.post("/api/v1/admin/reconcile", headers=ADMIN, json={"fix": False, "wait": 30})
                reconciles.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"reconcile answered {r.status_code}: {r.text}")
                report = r.json()
                drift = {k: len(v) for k, v in report.items() if isinstance(v, list) and v and k != "actions"}
                if drift:
                    raise RuntimeError(f"reconcile found drift in a quiet cloud: {drift}")
        await db.close()
    return {
        "n": n,
        "hosts": HOSTS,
        "create_wall_s": filled,
        "create_vms_per_s": n / filled,
        "list_pages": len(listed),
        "list_page_p50_ms": pct(listed, 50) * 1000,
        "list_page_p99_ms": pct(listed, 99) * 1000,
        "describe_pages": len(described),
        "describe_page_p50_ms": pct(described, 50) * 1000,
        "describe_page_p99_ms": pct(described, 99) * 1000,
        "reconcile_s": reconciles,
        "api_rss_mb_after_create": rss_before,
        "api_rss_mb_after_lists": rss_after,
    }


def table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"Scale: {r['n']} VMs on {r['hosts']} hosts",
            "",
            "| measure | value |",
            "| --- | ---: |",
            f"| create {r['n']} VMs (100 per request, 4 requests at once) until all STARTED | "
            f"{r['create_wall_s']:.1f} s ({r['create_vms_per_s']:.0f} VMs/s) |",
            f"| GET /api/v1/servers, {r['list_pages']} pages of 100 (two passes): p50 / p99 per page | "
            f"{r['list_page_p50_ms']:.1f} / {r['list_page_p99_ms']:.1f} ms |",
            f"| EC2 DescribeInstances, {r['describe_pages']} pages of 100: p50 / p99 per page | "
            f"{r['describe_page_p50_ms']:.1f} / {r['describe_page_p99_ms']:.1f} ms |",
            f"| POST /api/v1/admin/reconcile ({r['hosts']} fresh inventories, {r['n']} VMs), 3 runs | "
            + " / ".join(f"{s:.2f}" for s in r["reconcile_s"])
            + " s |",
            f"| API RSS after the creates / after the list passes | "
            f"{r['api_rss_mb_after_create']:.0f} / {r['api_rss_mb_after_lists']:.0f} MiB |",
        ]
    )


async def main() -> None:
    args = arguments(__doc__, n=10_000, concurrency=1)
    with tempfile.TemporaryDirectory(prefix="nephos-scale-") as tmp:
        result = await scale(args, Path(tmp))
    print(table(result))
    (ROOT / "bench" / "last-scale.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
