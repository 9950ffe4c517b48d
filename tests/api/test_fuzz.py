"""Schemathesis against a running ``nephos up`` on PostgreSQL: nothing a client sends is a 500.

Every operation of the OpenAPI document gets generated requests (valid and invalid), and the
stateful phase chains them (create a project, then use its id, ...). The verdict is the server's
own access log: no request may have been answered with 500. (Schemathesis's 5xx check would also
count 503 ``NoCapacity``, a documented answer when fuzzed hosts fill up.) The seed is fixed so a
failure reproduces; the server log names the failing route and its traceback.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.procs import nephos_bin, nephos_up

TOKEN = "nph_fuzz_admin_token"


def test_no_server_error_for_any_generated_request(pg_url: str, tmp_path: Path) -> None:
    with nephos_up(tmp_path, NEPHOS_DATABASE_URL=pg_url, NEPHOS_ADMIN_TOKEN=TOKEN) as (base, log):
        run = subprocess.run(
            [nephos_bin("st"), "run", f"{base}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}",
             "--checks", "not_a_server_error", "--max-examples", "60", "--seed", "20261122",
             "--workers", "2", "--no-color"],
            capture_output=True, text=True, timeout=600,
        )
    generated = re.search(r"(\d+) generated", run.stdout)
    assert generated and int(generated.group(1)) > 500, run.stdout[-4000:] + run.stderr[-2000:]
    requests = [line for line in log if '" ' in line and "HTTP/1.1" in line]
    assert len(requests) > 500
    errors = [line for line in log if "HTTP/1.1\" 500" in line or "unexpected error" in line]
    assert not errors, "\n".join(log[-200:])
