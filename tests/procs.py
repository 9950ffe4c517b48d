"""Nephos processes for tests that run the commands as an operator would."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nephos_bin(name: str = "nephos") -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


@contextmanager
def nephos_up(cwd: Path, **env: str) -> Iterator[tuple[str, list[str]]]:
    """``nephos up`` in ``cwd``; yields its base URL and, once stopped, its output lines."""
    port = free_port()
    environ = {**os.environ, "NEPHOS_PORT": str(port), **env}
    if "NEPHOS_ADMIN_TOKEN" not in env:
        environ.pop("NEPHOS_ADMIN_TOKEN", None)
    # To a file, not a pipe: a pipe nobody reads fills up with access logs and blocks the server.
    log = (cwd / f"nephos-up-{port}.log").open("w+")
    proc = subprocess.Popen([nephos_bin(), "up"], cwd=cwd, env=environ, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    base, output = f"http://127.0.0.1:{port}", []
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(log.read())
            time.sleep(0.1)
        yield base, output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.seek(0)
        output += log.read().splitlines()
        output.append(f"exit {proc.returncode}")
        log.close()
