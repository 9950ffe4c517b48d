"""The pages a person sees: Swagger UI and ReDoc render from this process alone, with the network off.

Debian's chromium loads ``/docs`` from a real server on the loopback interface, with every other
address unreachable (a proxy on a closed port for anything not on loopback, and no name
resolution), runs the page's scripts, and must show the API's operations; a screenshot is kept.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.api.app import create_app
from app.settings import Settings
from tests.conftest import IN_CI

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if IN_CI:
            pytest.fail("chromium is not installed (make test installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    return found


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[str]:
    port = _free_port()
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'docs.db'}", port=port)
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                if (await client.get(f"{base}/openapi.json")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    yield base
    server.should_exit = True
    await task


def _offline_chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            _chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--disable-background-networking",
            # The network is off: nothing resolves, and anything not on loopback goes to a closed port.
            "--proxy-server=http://127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(profile)},
        check=False,
    )


@pytest.mark.parametrize("page", ["docs", "redoc"])
async def test_the_documentation_renders_with_the_network_off(served: str, page: str, tmp_path: Path) -> None:
    async with httpx.AsyncClient() as client:
        html = (await client.get(f"{served}/{page}")).text
    assert "cdn." not in html and "fonts.googleapis" not in html, html
    dom = await asyncio.to_thread(_offline_chromium, "--dump-dom", f"{served}/{page}", profile=tmp_path / "p1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The scripts ran and drew the operations from /openapi.json.
    assert "/api/v1/servers/{server_id}/actions" in dom.stdout, dom.stdout[:2000]
    if page == "docs":
        assert "opblock" in dom.stdout
    shot = tmp_path / f"{page}.png"
    taken = await asyncio.to_thread(
        _offline_chromium,
        f"--screenshot={shot}",
        "--window-size=1280,1600",
        f"{served}/{page}",
        profile=tmp_path / "p2",
    )
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = os.environ.get("NEPHOS_SCREENSHOTS")
    if keep:  # for a person to look at
        await asyncio.to_thread(lambda: Path(keep).mkdir(parents=True, exist_ok=True))
        await asyncio.to_thread(shutil.copy, shot, Path(keep) / shot.name)
