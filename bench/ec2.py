"""EC2 benchmark: the same boto3 workload against Nephos's /ec2 and against moto's server.

Nephos runs as in ``bench/run.py`` (api, dispatcher, two simulated agents on PostgreSQL +
RabbitMQ); moto's server (a dev dependency) is started on loopback by this script. On each,
with C client threads: WARM RunInstances and their TerminateInstances first, not timed (a fresh server's first
calls open connections and compile statements, or load moto's backend); then RunInstances x N
(one instance each), wait until all are running,
DescribeInstances of all N (paginated until the last page, so both really return N),
TerminateInstances x N. Printed: each phase's calls per second and latency on both, and the
ratio Nephos / moto (of calls per second: above 1, Nephos is faster). moto keeps everything
in memory and does no signature check, quota, placement or durable commit: it is a ceiling
for an EC2 front end in Python, not a peer.

    python bench/ec2.py [--n 200] [--concurrency 8]
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ADMIN, ROOT, arguments, free_port, pct, running

REGION = "us-east-1"
#: Calls of each kind made on each server before the timed phases (see ``run_workload``).
WARM = 16


def make_client(endpoint: str, key: str, secret: str, concurrency: int) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}, max_pool_connections=concurrency * 2),
    )


def run_workload(ec2: Any, image: str, itype: str, n: int, concurrency: int) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        return time.perf_counter() - t0, result

    with ThreadPoolExecutor(concurrency) as pool:
        # Not timed: a fresh server's first calls (Nephos: pooled connections opened, statements
        # compiled and prepared; moto: its EC2 backend loaded) are not its steady rate.
        warm = list(
            pool.map(
                lambda _: ec2.run_instances(ImageId=image, InstanceType=itype, MinCount=1, MaxCount=1), range(WARM)
            )
        )
        list(pool.map(lambda r: ec2.terminate_instances(InstanceIds=[r["Instances"][0]["InstanceId"]]), warm))
        t0 = time.perf_counter()
        runs = list(
            pool.map(
                lambda _: timed(ec2.run_instances, ImageId=image, InstanceType=itype, MinCount=1, MaxCount=1), range(n)
            )
        )
        out["RunInstances"] = (time.perf_counter() - t0, [t for t, _ in runs], n)
        ids = [r["Instances"][0]["InstanceId"] for _, r in runs]

        t0 = time.perf_counter()
        waiter = ec2.get_waiter("instance_running")
        waiter.config.delay, waiter.config.max_attempts = 0.2, 3000
        for chunk in range(0, n, 100):
            waiter.wait(InstanceIds=ids[chunk : chunk + 100])
        out["(until all running)"] = (time.perf_counter() - t0, [], 0)

        t0 = time.perf_counter()
        seen = 0
        for page in ec2.get_paginator("describe_instances").paginate():
            seen += sum(len(r["Instances"]) for r in page["Reservations"])
        elapsed = time.perf_counter() - t0
        assert seen >= n, f"DescribeInstances returned {seen} of {n}"
        out["DescribeInstances (all N)"] = (elapsed, [elapsed], 1)

        t0 = time.perf_counter()
        terms = list(pool.map(lambda i: timed(ec2.terminate_instances, InstanceIds=[i]), ids))
        out["TerminateInstances"] = (time.perf_counter() - t0, [t for t, _ in terms], n)
    return out


async def nephos_credentials(base: str, n: int) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        r = await client.post(
            "/api/v1/admin/projects",
            headers=ADMIN,
            json={
                "name": "ec2-bench",
                "quotas": {"vm": n, "cpu": n, "ram": n * 512, "disk": n, "active_cpu": n, "active_ram": n * 512},
            },
        )
        r = await client.post("/api/v1/admin/users", headers=ADMIN, json={"name": "b", "project_id": r.json()["id"]})
        user = {"Authorization": f"Bearer {r.json()['token']}"}
        r = await client.post("/api/v1/credentials/ec2", headers=user)
        return r.json()["access_key"], r.json()["secret_key"]


def start_moto(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (workdir / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(f"{url}/moto-api/", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("moto's server did not come up")


def table(nephos: dict[str, Any], moto: dict[str, Any], n: int, concurrency: int) -> str:
    lines = [
        f"EC2 workload: N={n}, {concurrency} client threads, boto3 {boto3.__version__}",
        "| phase | Nephos calls/s | moto calls/s | Nephos / moto | Nephos p50 / p99 ms | moto p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for phase in nephos:
        (nw, nl, nc), (mw, ml, mc) = nephos[phase], moto[phase]
        if not nc:
            lines.append(f"| {phase} | {nw:.2f} s | {mw:.2f} s | | | |")
            continue
        nr, mr = nc / nw, mc / mw
        lines.append(
            f"| {phase} | {nr:.1f} | {mr:.1f} | {nr / mr:.2f} | "
            f"{pct(nl, 50) * 1000:.0f} / {pct(nl, 99) * 1000:.0f} | "
            f"{pct(ml, 50) * 1000:.0f} / {pct(ml, 99) * 1000:.0f} |"
        )
    total_n = sum(v[0] for v in nephos.values())
    total_m = sum(v[0] for v in moto.values())
    lines.append(f"| whole workload (wall) | {total_n:.2f} s | {total_m:.2f} s | {total_m / total_n:.2f} | | |")
    return "\n".join(lines)


async def main() -> None:
    args = arguments(__doc__, n=200, concurrency=8)
    with tempfile.TemporaryDirectory(prefix="nephos-bench-ec2-") as tmp:
        async with running(args, Path(tmp)) as cluster:
            base = f"http://127.0.0.1:{cluster.port}"
            key, secret = await nephos_credentials(base, args.n + WARM)
            ec2 = make_client(f"{base}/ec2", key, secret, args.concurrency)
            image = ec2.describe_images(Filters=[{"Name": "name", "Values": ["debian-12"]}])["Images"][0]["ImageId"]
            nephos = await asyncio.to_thread(run_workload, ec2, image, "tiny", args.n, args.concurrency)
        proc, url = start_moto(Path(tmp))
        try:
            ec2 = make_client(url, "testing", "testing", args.concurrency)
            image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
            moto = await asyncio.to_thread(run_workload, ec2, image, "t2.micro", args.n, args.concurrency)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    print(table(nephos, moto, args.n, args.concurrency))
    record = {
        "n": args.n,
        "concurrency": args.concurrency,
        "phases": {
            phase: {
                "nephos_wall_s": nephos[phase][0],
                "moto_wall_s": moto[phase][0],
                **(
                    {
                        "nephos_calls_per_s": nephos[phase][2] / nephos[phase][0],
                        "moto_calls_per_s": moto[phase][2] / moto[phase][0],
                        "ratio": (nephos[phase][2] / nephos[phase][0]) / (moto[phase][2] / moto[phase][0]),
                    }
                    if nephos[phase][2]
                    else {}
                ),
            }
            for phase in nephos
        },
    }
    (ROOT / "bench" / "last-ec2.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
