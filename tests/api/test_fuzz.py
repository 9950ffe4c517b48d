"""Schemathesis, every check (``st run --checks all``), against a running ``nephos up``.

The OpenAPI document is the truth: schema-valid requests are accepted (or answered with a code
API.md gives them), schema-violating ones are refused, every status answered is documented, 405s
name the allowed methods, replies match their schemas -- and no request is a 500. Two runs, one
per role: the admin's token on PostgreSQL (the production database), a user's on SQLite with the
in-memory bus (what ``make run`` serves). The stateful phase follows the document's links.
``schemathesis.toml`` at the root of the checkout holds the one setting the runs read (the
answers API.md gives schema-valid requests). Seeds are fixed so a failure reproduces; the
server log names the failing route and its traceback.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from app.db import ROOT
from tests.procs import nephos_bin, nephos_up

pytestmark = pytest.mark.slow

TOKEN = "nph_fuzz_admin_token"


def _schemathesis(base: str, token: str, seed: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            nephos_bin("st"),
            "run",
            f"{base}/openapi.json",
            "-H",
            f"Authorization: Bearer {token}",
            "--checks",
            "all",
            "--max-examples",
            "30",
            "--seed",
            str(seed),
            "--workers",
            "1",
            "--no-color",
            # A stream's answer never ends; its refusals and its events are tested in
            # tests/api/test_event_stream.py and tests/e2e/test_stream.py.
            "--exclude-path",
            "/api/v1/events/stream",
        ],
        capture_output=True,
        text=True,
        timeout=400,  # below the test's own timeout: a stalled run fails with its output, no killed worker
        cwd=ROOT,  # reads ROOT/schemathesis.toml
    )


def _verdict(run: subprocess.CompletedProcess[str], log: list[str]) -> None:
    generated = re.search(r"(\d+) generated", run.stdout)
    assert generated and int(generated.group(1)) > 500, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0 and not re.search(r"\d+ failures?\b", run.stdout), run.stdout[-8000:]
    assert len([line for line in log if "HTTP/1.1" in line]) > 500
    errors = [line for line in log if 'HTTP/1.1" 500' in line or "unexpected error" in line]
    assert not errors, "\n".join(log[-200:])


@pytest.mark.timeout(900)
def test_every_check_passes_with_an_admins_token_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    with nephos_up(tmp_path, NEPHOS_DATABASE_URL=pg_url, NEPHOS_ADMIN_TOKEN=TOKEN) as (base, log):
        run = _schemathesis(base, TOKEN, seed=20261202)
    _verdict(run, log)


@pytest.mark.timeout(900)
def test_every_check_passes_with_a_users_token_on_the_embedded_cloud(tmp_path: Path) -> None:
    with nephos_up(tmp_path, NEPHOS_ADMIN_TOKEN=TOKEN) as (base, log):
        user = httpx.post(
            f"{base}/api/v1/admin/users", headers={"Authorization": f"Bearer {TOKEN}"}, json={"name": "fuzzed"}
        )
        assert user.status_code == 201, user.text
        run = _schemathesis(base, user.json()["token"], seed=20261203)
    _verdict(run, log)
