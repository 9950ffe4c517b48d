"""Nephos processes for tests that run the commands as an operator would."""

from __future__ import annotations

import asyncio
import contextlib
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
    proc = subprocess.Popen([nephos_bin(), "up"], cwd=cwd, env=environ, stdout=log, stderr=subprocess.STDOUT, text=True)
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


class Proxy:
    """A TCP proxy (to RabbitMQ or PostgreSQL) that a test can cut and restore: the service
    'restarts' for the processes behind it only, so other tests sharing it carry on."""

    def __init__(self, target_port: int = 5672) -> None:
        self.port, self.target_port = free_port(), target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()
        with contextlib.suppress(TimeoutError):  # 3.12+ waits for the handlers too: never hang here
            async with asyncio.timeout(5):
                await self.server.wait_closed()
