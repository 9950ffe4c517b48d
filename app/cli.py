"""The ``nephos`` command line: one package, several roles."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Annotated, Any

import typer

from app import console
from app.db import make_engine, make_sessionmaker, upgrade
from app.logic import bootstrap
from app.settings import Settings

cli = typer.Typer(help="Nephos: an asynchronous control plane for virtual machines.", no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
admin_cli = typer.Typer(help="Operator commands.", no_args_is_help=True)
cli.add_typer(admin_cli, name="admin")
# The console in a terminal: a user's commands against a running API (``app.console``).
cli.add_typer(console.server_cli, name="server")
cli.add_typer(console.flavor_cli, name="flavor")
cli.add_typer(console.quota_cli, name="quota")
cli.add_typer(console.lease_cli, name="lease")
cli.add_typer(console.events_cli, name="events")
log = logging.getLogger("nephos")


def _logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _prepare(settings: Settings, *, seed_hosts: bool) -> None:
    """Apply migrations and seed what is missing (API.md "Running")."""
    from app.runtime import check_database

    await check_database(settings)
    await upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            token = await bootstrap.seed(
                session,
                admin_token=settings.admin_token.get_secret_value() if settings.admin_token else None,
                hosts=settings.host_specs if seed_hosts else (),
            )
            await session.commit()
    finally:
        await engine.dispose()
    if token:
        # Printed once, to the operator's terminal: it is stored only as a hash.
        typer.echo(f"bootstrap admin token (shown once): {token}")


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the migrations up to REVISION."""
    from app.runtime import check_database

    settings = Settings()

    async def go() -> None:
        await check_database(settings)
        await upgrade(settings.database_url, revision)

    asyncio.run(go())
    typer.echo(f"database at {revision}")


def _run(coro: Any) -> None:
    """Run on uvloop when it is there (it is, with uvicorn[standard]).

    The garbage collector first: what is loaded at start (modules, the app, the ORM's mappers)
    lives as long as the process, so it is frozen out of every collection, and the youngest
    generation is collected every 50,000 allocations instead of 700. A request makes thousands
    of short-lived objects (an ORM row, a pydantic model, a JSON tree); collecting them 70 times
    less often took a 100-VM list page from about 15 ms to 11 ms, and the cycles they form are
    still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(coro)
    else:
        uvloop.run(coro)


@cli.command()
def up() -> None:
    """Everything in one process on the embedded defaults: migrate, seed, api + dispatcher + agents."""
    settings = Settings()
    _logging(settings)
    asyncio.run(_prepare(settings, seed_hosts=False))
    from app.runtime import run_up

    _run(run_up(settings))


@cli.command()
def api(
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            envvar="NEPHOS_API_WORKERS",
            help="API processes sharing the port (each with its own database pool and bus connection)",
        ),
    ] = 1,
) -> None:
    """The REST API (production: as many as you like behind a load balancer)."""
    settings = Settings()
    _logging(settings)
    from app.runtime import run_api, serve_workers

    if workers == 1:
        _run(run_api(settings))
    else:
        raise typer.Exit(serve_workers(settings, workers, _run))


@cli.command()
def dispatcher() -> None:
    """Consume results, apply them, run the sweepers (production: run two or more)."""
    settings = Settings()
    _logging(settings)
    from app.runtime import run_dispatcher

    _run(run_dispatcher(settings))


@cli.command()
def agent(
    host: Annotated[str, typer.Option(help="This hypervisor's name (its job queue)")],
    libvirt_uri: Annotated[str, typer.Option(help="qemu:///system, or test:///path/node.xml")] = "qemu:///system",
    zone: Annotated[str, typer.Option(help="The zone this host serves")] = "default",
    simulate: Annotated[str | None, typer.Option(help="CPUS:RAM_MB: a private test-driver host of that size")] = None,
    migration_uri: Annotated[str | None, typer.Option(help="How peers' libvirt reaches this host")] = None,
) -> None:
    """The agent of one hypervisor host."""
    settings = Settings()
    _logging(settings)
    from app.backend.driver import write_test_node
    from app.runtime import run_agent

    if simulate:
        cpus, ram = (int(x) for x in simulate.split(":"))
        libvirt_uri = write_test_node(settings.state_dir / "hosts", host, cpus, ram)
    _run(run_agent(settings, host=host, uri=libvirt_uri, zone=zone, migration_uri=migration_uri))


@cli.command()
def seed() -> None:
    """Apply migrations and seed the default project, admin, flavors and images."""
    settings = Settings()
    asyncio.run(_prepare(settings, seed_hosts=False))


class _Fatal(Exception):
    """An operator mistake or an unreachable service: one clear line, and a non-zero exit."""


def _admin_api(settings: Settings, url: str | None, token: str | None) -> tuple[str, dict[str, str]]:
    """Where the running API is and the admin's headers: admin commands go through the API, so
    they work against every mode (``nephos up``'s in-memory bus included) and every rule holds."""
    base = (url or settings.public_api_url).rstrip("/")
    secret = token or (settings.admin_token.get_secret_value() if settings.admin_token else None)
    if not secret:
        raise _Fatal("an admin token is needed: pass --token or set NEPHOS_ADMIN_TOKEN")
    return base, {"Authorization": f"Bearer {secret}"}


def _call_api(method: str, url: str, headers: dict[str, str], body: Any, timeout: float) -> Any:
    import httpx

    try:
        r = httpx.request(method, url, headers=headers, json=body, timeout=timeout)
    except httpx.TransportError as exc:
        raise _Fatal(
            f"the Nephos API at {url} cannot be reached ({exc}); is it running? (set NEPHOS_API_URL or --url)"
        ) from None
    if r.status_code >= 400:
        try:
            error = r.json()["error"]
            raise _Fatal(f"the API refused: {r.status_code} {error['code']}: {error['message']}")
        except (ValueError, KeyError, TypeError):
            raise _Fatal(f"the API answered {r.status_code}: {r.text[:200]}") from None
    return r.json()


@admin_cli.command("reconcile")
def admin_reconcile(
    fix: Annotated[
        bool, typer.Option("--fix", help="Repair what is found (default: report only)", show_default=False)
    ] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the hosts' fresh inventories")] = 10.0,
    url: Annotated[str | None, typer.Option(help="The API (default: NEPHOS_API_URL, else NEPHOS_HOST:PORT)")] = None,
    token: Annotated[str | None, typer.Option(help="An admin's token (default: NEPHOS_ADMIN_TOKEN)")] = None,
) -> None:
    """Compare the database with every host and quotas with the VMs; with --fix, repair.

    Exit status: 0 nothing found (or all of it fixed), 1 drift found, 2 it could not be judged
    (a host did not answer, or the API could not be reached).
    """
    from rich.console import Console
    from rich.table import Table

    from app.logic.reconcile import Report

    console = Console()
    settings = Settings()
    base, headers = _admin_api(settings, url, token)
    with console.status("asking every host for its inventory, then comparing"):
        report = _call_api(
            "POST", f"{base}/api/v1/admin/reconcile", headers, {"fix": fix, "wait": wait}, timeout=wait + 120
        )
    kinds = Report.KINDS  # the report's kinds, as the engine names them
    table = Table(title="reconciliation" + (" (fixed)" if report["fixed"] else " (dry run)"))
    for column in ("kind", "count", "what"):
        table.add_column(column)
    for kind in kinds:
        entries = report.get(kind, [])
        shown = "; ".join(", ".join(f"{k}={v}" for k, v in e.items()) for e in entries[:5])
        table.add_row(kind, str(len(entries)), shown + (f" (+{len(entries) - 5} more)" if len(entries) > 5 else ""))
    console.print(table)
    for action in report["actions"]:
        console.print(f"fixed: {action}")
    if report["unreachable_hosts"]:
        console.print(f"[yellow]no fresh inventory from: {', '.join(report['unreachable_hosts'])} (not judged)")
        raise typer.Exit(2)
    found = any(report.get(kind) for kind in kinds)
    raise typer.Exit(0 if not found or report["fixed"] else 1)


UrlOption = Annotated[str | None, typer.Option(help="The API (default: NEPHOS_API_URL, else NEPHOS_HOST:PORT)")]
TokenOption = Annotated[str | None, typer.Option(help="An admin's token (default: NEPHOS_ADMIN_TOKEN)")]


@admin_cli.command("leases")
def admin_leases(
    within: Annotated[float, typer.Option(help="Leases ending within this many days")] = 7.0,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Leases ending soon, across projects, soonest first."""
    from datetime import UTC, datetime, timedelta
    from urllib.parse import urlencode

    from rich.console import Console
    from rich.table import Table

    base, headers = _admin_api(Settings(), url, token)
    before = (datetime.now(UTC) + timedelta(days=within)).isoformat()
    servers: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = urlencode({"before": before, "limit": 500, **({"cursor": cursor} if cursor else {})})
        page = _call_api("GET", f"{base}/api/v1/admin/leases?{query}", headers, None, timeout=60)
        servers += page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    table = Table(title=f"leases ending within {within:g} days ({len(servers)})")
    for column in ("ends (UTC)", "server", "name", "project", "state"):
        table.add_column(column)
    for s in sorted(servers, key=lambda s: s["lease_expires_at"]):
        table.add_row(s["lease_expires_at"][:19], s["id"], s["name"], s["project_id"], s["operstate"])
    Console().print(table)


@admin_cli.command("capacity")
def admin_capacity(url: UrlOption = None, token: TokenOption = None) -> None:
    """Per flavor and zone: how many more VMs fit now, and how many would fit on empty hosts."""
    from rich.console import Console
    from rich.table import Table

    base, headers = _admin_api(Settings(), url, token)
    items = _call_api("GET", f"{base}/api/v1/admin/capacity", headers, None, timeout=60)["items"]
    table = Table(title="capacity (up hosts)")
    for column in ("flavor", "zone", "fit now", "fit on empty hosts", "hosts up"):
        table.add_column(column, justify="right" if column.startswith(("fit", "hosts")) else "left")
    for item in items:
        table.add_row(item["flavor"], item["zone"], str(item["fit_now"]), str(item["fit_empty"]), str(item["hosts_up"]))
    Console().print(table)


@admin_cli.command("notify-test")
def admin_notify_test(
    to: Annotated[str | None, typer.Option(help="Recipient (default: the admin's own email)")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Send a test mail through the mail server the API is set up with (NEPHOS_SMTP_*)."""
    base, headers = _admin_api(Settings(), url, token)
    sent = _call_api("POST", f"{base}/api/v1/admin/notify-test", headers, {"to": to}, timeout=120)
    typer.echo(f"sent a test mail to {sent['to']} through {sent['server']}")


def main() -> None:
    from pydantic import ValidationError

    from app.runtime import StartupError

    try:
        cli()
    except (_Fatal, StartupError) as exc:
        typer.echo(f"nephos: {exc}", err=True)
        raise SystemExit(2) from None
    except ValidationError as exc:  # the settings: one line per wrong variable
        for error in exc.errors():
            where = "_".join(str(part) for part in error.get("loc", ())).upper()
            typer.echo(f"nephos: NEPHOS_{where}: {error.get('msg', 'invalid')}", err=True)
        raise SystemExit(2) from None
