"""The ``nephos`` command line: one package, several roles."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

import typer

from app.db import make_engine, make_sessionmaker, upgrade
from app.logic import bootstrap
from app.settings import Settings

cli = typer.Typer(help="Nephos: an asynchronous control plane for virtual machines.",
                  no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
admin_cli = typer.Typer(help="Operator commands.", no_args_is_help=True)
cli.add_typer(admin_cli, name="admin")
log = logging.getLogger("nephos")


def _logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _prepare(settings: Settings, *, seed_hosts: bool) -> None:
    """Apply migrations and seed what is missing (API.md "Running")."""
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
    settings = Settings()
    asyncio.run(upgrade(settings.database_url, revision))
    typer.echo(f"database at {revision}")


def _run(coro: Any) -> None:
    """Run on uvloop when it is there (it is, with uvicorn[standard])."""
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
def api() -> None:
    """The REST API (production: as many as you like behind a load balancer)."""
    settings = Settings()
    _logging(settings)
    from app.runtime import run_api

    _run(run_api(settings))


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


@admin_cli.command("reconcile")
def admin_reconcile(
    fix: Annotated[bool, typer.Option("--fix", help="Repair what is found (default: report only)")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the hosts' fresh inventories")] = 10.0,
) -> None:
    """Compare the database with every host and quotas with the VMs; with --fix, repair."""
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.table import Table

    from app.dispatcher import reconciler
    from app.logic.reconcile import Report
    from app.runtime import plane

    settings = Settings()
    console = Console()

    async def go() -> Report:
        async with plane(settings) as p:
            # Progress for large fleets: hosts that answered, then repairs made.
            with Progress(*Progress.get_default_columns(), console=console, transient=True) as bar:
                tasks: dict[str, TaskID] = {}

                def progress(phase: str, done: int, total: int) -> None:
                    if phase not in tasks:
                        tasks[phase] = bar.add_task({"inventories": "hosts answered",
                                                     "repairs": "repairs"}.get(phase, phase), total=total)
                    bar.update(tasks[phase], completed=done, total=total)
                return await reconciler.fresh(p.sessions, p.bus, fix=fix, wait=wait, progress=progress)

    report = asyncio.run(go())
    table = Table(title="reconciliation" + (" (fixed)" if report.fixed else " (dry run)"))
    for column in ("kind", "count", "what"):
        table.add_column(column)
    for kind, count in report.counts().items():
        entries = getattr(report, kind)
        shown = "; ".join(", ".join(f"{k}={v}" for k, v in e.items()) for e in entries[:5])
        table.add_row(kind, str(count), shown + (f" (+{count - 5} more)" if count > 5 else ""))
    console.print(table)
    if report.unreachable_hosts:
        console.print(f"[yellow]no fresh inventory from: {', '.join(report.unreachable_hosts)} (not judged)")
    for action in report.actions:
        console.print(f"fixed: {action}")
    raise typer.Exit(0 if report.empty() or report.fixed else 1)


def main() -> None:
    cli()
