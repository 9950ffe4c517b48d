"""One table of every figure issue 13 names, from the JSON the benchmarks of this ``make bench``
wrote (bench/last-run.json, last-run-quorum.json, last-ec2.json, last-scale.json), with the
floors of the same run and the design's targets. It prints; it asserts nothing.

    python bench/summary.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(name: str) -> dict[str, Any] | None:
    path = HERE / name
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    run, quorum, ec2, scale = (
        load(n) for n in ("last-run.json", "last-run-quorum.json", "last-ec2.json", "last-scale.json")
    )
    rows: list[tuple[str, str, str]] = []
    if run:
        floor, stack = run["floor_actions_per_s"], run.get("stack_floor_actions_per_s")
        rate = run["actions_per_s"]
        rows += [
            (f"actions/s end to end (N = {run['n']}, C = {run['concurrency']})", f"{rate:.1f}", ""),
            ("floor (2 commits + 2 messages + 1 HTTP request, DESIGN.md), same run", f"{floor:.0f}", ""),
            ("Nephos / floor", f"{rate / floor:.2f}", "≥ 0.5"),
        ]
        if stack:
            rows += [
                ("stack floor: a whole action on the stack with no logic, same run", f"{stack:.0f}", ""),
                ("the stack with no logic / floor", f"{stack / floor:.2f}", ""),
                ("Nephos / stack floor of a whole action", f"{rate / stack:.2f}", ""),
            ]
        shape = run.get("shape_floor_actions_per_s")
        if shape:
            rows += [
                ("the design's shape with no logic (3 processes, SQLAlchemy Core), same run", f"{shape:.0f}", ""),
                ("the design's shape with no logic / floor", f"{shape / floor:.2f}", ""),
                ("Nephos / the design's shape with no logic", f"{rate / shape:.2f}", ""),
            ]
        every = run.get("latency_ms", {}).get(
            "all", {k: float("nan") for k in ("202_p50", "202_p99", "applied_p50", "applied_p99")}
        )
        rows += [
            (f"C = {run['concurrency']}: 202 p50 / p99 (ms)", f"{every['202_p50']:.0f} / {every['202_p99']:.0f}", ""),
            (
                f"C = {run['concurrency']}: 202 → applied p50 / p99 (ms)",
                f"{every['applied_p50']:.0f} / {every['applied_p99']:.0f}",
                "",
            ),
        ]
        for kind, probe in run["probes"].items():
            rows.append(
                (
                    f"C = 1 {kind}: 202 p50 / 202 → applied p50 (ms)",
                    f"{probe['202 p50 ms']:.1f} / {probe['202 to applied p50 ms']:.1f}",
                    "applied < 20" if kind == "create" else "",
                )
            )
        rows.append(("answers other than 202", str(sum(run["answers_other_than_202"].values())), "0"))
    if quorum:
        rows += [
            ("with quorum queues: actions/s (same N, C)", f"{quorum['actions_per_s']:.1f}", ""),
            (
                "with quorum queues: Nephos / floor",
                f"{quorum['actions_per_s'] / quorum['floor_actions_per_s']:.2f}",
                "",
            ),
            ("with quorum queues: answers other than 202", str(sum(quorum["answers_other_than_202"].values())), "0"),
        ]
    if scale:
        n = scale["n"]
        list_page = f"{scale['list_page_p50_ms']:.1f} / {scale['list_page_p99_ms']:.1f}"
        describe_page = f"{scale['describe_page_p50_ms']:.1f} / {scale['describe_page_p99_ms']:.1f}"
        rows += [
            (f"GET /api/v1/servers over {n} VMs, pages of 100: p50 / p99 (ms)", list_page, "p99 < 30"),
            (f"EC2 DescribeInstances over {n}, pages of 100: p50 / p99 (ms)", describe_page, ""),
            (
                f"POST /api/v1/admin/reconcile, {n} VMs on {scale['hosts']} hosts (s), worst of 3",
                f"{max(scale['reconcile_s']):.2f}",
                "< 2",
            ),
            (f"API RSS with {n} VMs after the list passes (MiB)", f"{scale['api_rss_mb_after_lists']:.0f}", "< 200"),
        ]
    if ec2:
        for phase, figures in ec2["phases"].items():
            if "ratio" in figures:
                target = "≥ 1" if phase in ("RunInstances", "TerminateInstances") else ""
                rows.append((f"EC2 {phase}: Nephos / moto (calls/s)", f"{figures['ratio']:.2f}", target))
    width = max(len(r[0]) for r in rows) if rows else 10
    print("| figure | measured | target |")
    print("| --- | ---: | ---: |")
    for name, value, target in rows:
        print(f"| {name.ljust(width)} | {value} | {target} |")


if __name__ == "__main__":
    main()
