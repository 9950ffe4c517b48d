"""The dashboard in Debian's chromium (Playwright drives it), against a running ``nephos up``:
sign in with a token, create a VM and see it reach STARTED without reloading, stop it from its
row, renew its lease, see an over-quota create refused before it is sent, and, as admin, run a
reconcile; a user never sees another project's VM or an admin page. Every page is
photographed: into the test run's own directory, or, with NEPHOS_SCREENSHOTS set (``make
screenshots``), into that one -- docs/screenshots/, which the README shows. A test run leaves the
checkout as it found it.

``make test`` installs chromium; in CI its absence is a failure, never a skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import nephos_up

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "nph_dashboard_admin_token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Debian's chromium is not installed (make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def nephos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nephos_up(tmp_path_factory.mktemp("dashboard"), NEPHOS_ADMIN_TOKEN=TOKEN) as (base, _):
        yield base


def _user(base: str, name: str, **quotas: int) -> dict[str, Any]:
    project = httpx.post(f"{base}/api/v1/admin/projects", headers=ADMIN, json={"name": name, "quotas": quotas})
    assert project.status_code == 201, project.text
    user = httpx.post(
        f"{base}/api/v1/admin/users", headers=ADMIN, json={"name": name, "project_id": project.json()["id"]}
    )
    assert user.status_code == 201, user.text
    return {"token": user.json()["token"], "project_id": project.json()["id"]}


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    executable = _chromium()
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=executable, args=["--no-sandbox"], headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


async def _signed_in(browser: Any, base: str, token: str, width: int = 1280) -> Any:
    page = await (await browser.new_context(viewport={"width": width, "height": 860})).new_page()
    await page.goto(base + "/")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("heading", name="Servers").wait_for()
    assert token not in page.url
    return page


Shot = Callable[[Any, str], Awaitable[None]]


@pytest.fixture
def shot(tmp_path: Path) -> Shot:
    """Photograph a page, full length, as ``{name}.png`` (where: the module's docstring)."""
    asked = os.environ.get("NEPHOS_SCREENSHOTS")
    where = (ROOT / asked) if asked else tmp_path / "screenshots"
    where.mkdir(parents=True, exist_ok=True)

    async def take(page: Any, name: str) -> None:
        await page.screenshot(path=str(where / f"{name}.png"), full_page=True)

    return take


async def test_a_user_creates_watches_stops_and_renews_and_is_refused_before_submit(
    nephos: str, browser: Any, shot: Shot
) -> None:
    base = nephos
    alice = _user(base, "alice", vm=3, cpu=8)
    bob = _user(base, "bob")
    http = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {alice['token']}"})
    theirs = await http.post(
        "/api/v1/servers",
        headers={"Authorization": f"Bearer {bob['token']}"},
        json={"name": "bobs-secret-vm", "flavor": "tiny", "image": "debian-12"},
    )
    assert theirs.status_code == 202
    page = await _signed_in(browser, base, alice["token"])
    assert await page.get_by_role("link", name="Hosts", exact=True).count() == 0  # no admin pages for a user

    # Create: the what-if answers before anything is sent.
    await page.get_by_role("link", name="Create", exact=True).click()
    await page.get_by_label("Name").fill("web")
    await page.get_by_label("Flavor").select_option("tiny")
    await page.get_by_text("This would pass").wait_for()
    await shot(page, "create")
    await page.get_by_role("button", name="Create", exact=True).click()
    # The list follows the live stream: STARTED appears without a reload.
    row = page.locator("tr", has_text="web")
    await row.locator(".state.STARTED").wait_for(timeout=20000)
    assert await page.get_by_text("bobs-secret-vm").count() == 0  # another project's VM: never
    await shot(page, "servers")
    assert await row.get_by_role("button", name="start web").count() == 0  # not offered while running
    await row.get_by_role("button", name="stop web").click()
    await row.locator(".state.STOPPED").wait_for(timeout=20000)

    # Its page: the timeline, and the lease renewed.
    await row.get_by_role("link", name="web").click()
    await page.get_by_role("heading", name="Timeline").wait_for()
    sid = page.url.rsplit("/", 1)[1]
    before = (await http.get(f"/api/v1/servers/{sid}")).json()["lease_expires_at"]
    await page.get_by_role("button", name="Renew lease").click()
    await page.locator(".timeline li", has_text="lease renewed").wait_for()
    after = (await http.get(f"/api/v1/servers/{sid}")).json()["lease_expires_at"]
    assert after > before
    await page.get_by_text(after.replace("T", " ")[:19]).first.wait_for()  # the page shows the new end
    assert await page.locator(".timeline li").count() >= 4
    await shot(page, "server")

    # Over the quota (3 VMs): refused before submit, with the API's code, and the button off.
    await page.get_by_role("link", name="Create", exact=True).click()
    await page.get_by_label("How many").fill("5")
    await page.get_by_text("This would be refused").wait_for()
    assert "OverLimit" in await page.locator("#verdict").inner_text()
    assert await page.get_by_role("button", name="Create", exact=True).is_disabled()
    await shot(page, "create-refused")

    for name in ("Quotas", "Flavors", "Images", "Key pairs", "EC2 credentials"):
        await page.get_by_role("link", name=name, exact=True).click()
        await page.get_by_role("heading", name=name, exact=True).wait_for()
        await shot(page, name.lower().replace(" ", "-"))
    await page.get_by_role("link", name="Flavors", exact=True).click()
    await page.get_by_role("columnheader", name="Room in default").wait_for()  # room per zone
    await page.get_by_role("link", name="Quotas", exact=True).click()
    assert "3" in await page.locator("tr[data-resource=vm] .bar-label").inner_text()  # the vm quota's limit
    # An admin page asked for by its address shows the user's servers instead.
    await page.goto(base + "/#/drift")
    await page.get_by_role("heading", name="Servers").wait_for()
    assert await page.get_by_role("button", name="Reconcile now").count() == 0
    # On a narrow screen the page still works.
    narrow = await _signed_in(browser, base, alice["token"], width=390)
    await narrow.locator("tr", has_text="web").wait_for()
    await shot(narrow, "servers-narrow")
    await http.aclose()


async def test_an_admin_reconciles_and_sees_the_hosts(nephos: str, browser: Any, shot: Shot) -> None:
    page = await _signed_in(browser, nephos, TOKEN)
    await page.get_by_role("link", name="Hosts", exact=True).click()
    await page.get_by_role("heading", name="Hosts").wait_for()
    assert await page.locator("[data-host]").count() >= 2
    await shot(page, "hosts")
    await page.get_by_role("link", name="Drift", exact=True).click()
    await page.get_by_role("button", name="Reconcile now").click()
    await page.get_by_text("Reconciled (report only), just now").wait_for(timeout=30000)
    assert await page.locator("#drift tbody tr").count() >= 5
    await shot(page, "drift")
    for name, heading in (("Projects", "Projects and users"), ("Leases", "Leases ending within 7 days")):
        await page.get_by_role("link", name=name, exact=True).click()
        await page.get_by_role("heading", name=heading).wait_for()
        await shot(page, name.lower())
