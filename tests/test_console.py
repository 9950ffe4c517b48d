"""The console in a terminal, run as a user runs it: ``nephos server|flavor|quota|lease|events``
as processes against a running ``nephos up``, tables and ``--json``, ``--wait`` following the
live stream until the VM is where its job leaves it, and refusals as one line and exit 1."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import nephos_bin, nephos_up

TOKEN = "nph_console_admin_token"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running Nephos and a user's environment for the commands (URL and token from a profile)."""
    where = tmp_path_factory.mktemp("console")
    with nephos_up(where, NEPHOS_ADMIN_TOKEN=TOKEN) as (base, _):
        admin = {"Authorization": f"Bearer {TOKEN}"}
        project = httpx.post(f"{base}/api/v1/admin/projects", headers=admin, json={"name": "term"}).json()
        user = httpx.post(
            f"{base}/api/v1/admin/users", headers=admin, json={"name": "t", "project_id": project["id"]}
        ).json()
        profile = where / "profile"
        profile.write_text(f'# nephos profile\nurl = {base}\ntoken = "{user["token"]}"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEPHOS_")}
        yield {**env, "NEPHOS_PROFILE": str(profile), "COLUMNS": "200"}


def nephos(env: dict[str, str], *args: str, expect: int = 0) -> str:
    run = subprocess.run([nephos_bin(), *args], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == expect, (args, run.returncode, run.stdout[-3000:], run.stderr[-3000:])
    return run.stdout + run.stderr


def as_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(nephos(env, *args, "--json").split("\n", 0)[0])


def test_create_wait_act_and_delete_through_the_terminal(running: dict[str, str]) -> None:
    env = running
    made = as_json(env, "server", "create", "web", "--flavor", "tiny", "--count", "2", "--wait")
    assert made["ok"] and [s["operstate"] for s in made["servers"]] == ["STARTED", "STARTED"]
    assert all(s["task"] is None for s in made["servers"])
    first = made["servers"][0]["id"]
    table = nephos(env, "server", "list")
    assert "web-1" in table and "web-2" in table and "STARTED" in table
    listed = as_json(env, "server", "list", "--state", "STARTED")
    assert {s["id"] for s in listed} == {s["id"] for s in made["servers"]}
    shown = nephos(env, "server", "show", first)
    assert first in shown and "lease ends" in shown

    # --wait follows the stream: its progress lines, then the VM where the job left it.
    stopped = nephos(env, "server", "action", first, "stop", "--wait")
    assert "server.state: STARTED->STOPPED" in stopped and "job.finished" in stopped
    assert as_json(env, "server", "show", first)["operstate"] == "STOPPED"
    # Without --wait: the job's id, at once.
    started = as_json(env, "server", "action", first, "start")
    assert started["job_id"] and started["server_id"] == first

    history = as_json(env, "server", "events", first)
    assert [e["kind"] for e in history][:1] == ["action"] and len(history) >= 4
    assert "tiny" in nephos(env, "flavor", "list")
    quotas = as_json(env, "quota", "show")
    assert quotas["vm"]["usage"] == 2
    assert "#" in nephos(env, "quota", "show")  # the bars
    renewed = as_json(env, "lease", "renew", first)
    assert renewed["lease_expires_at"]

    # What-if: a plan that fits (exit 0) and one over the quota (exit 1, the step's code).
    assert "would pass" in nephos(env, "quota", "check", "create:tiny:1")
    over = nephos(env, "quota", "check", "create:large:50", expect=1)
    assert "OverLimit" in over
    # The stream, bounded: the events so far, from the start.
    tail = nephos(env, "events", "tail", "--since", "0-0", "--count", "5")
    assert len([line for line in tail.splitlines() if line.strip()]) == 5
    lines = nephos(env, "events", "tail", "--since", "0-0", "--count", "3", "--json").splitlines()
    heard = [json.loads(line) for line in lines]
    assert all("kind" in e for e in heard)

    gone = as_json(env, "server", "delete", made["servers"][1]["id"], "--wait")
    assert gone["ok"] and gone["servers"][0]["operstate"] == "DESTROYED"


def test_refusals_are_one_line_and_a_status(running: dict[str, str], tmp_path: Path) -> None:
    env = running
    refused = nephos(env, "server", "action", "00000000-0000-0000-0000-000000000000", "stop", expect=1)
    assert "404 NotFound" in refused and "Traceback" not in refused
    assert "OverLimit" in nephos(env, "server", "create", "big", "--count", "100", expect=1)
    nobody = {**env, "NEPHOS_PROFILE": str(tmp_path / "none")}
    assert "a token is needed" in nephos(nobody, "server", "list", expect=2)
    away = {**nobody, "NEPHOS_TOKEN": "x", "NEPHOS_API_URL": "http://127.0.0.1:9"}
    assert "cannot be reached" in nephos(away, "server", "list", expect=2)
    assert "not 'create'" in nephos(env, "quota", "check", "create", expect=2)
