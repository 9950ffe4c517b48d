"""The ``nephos`` command line: one package, several roles."""

from __future__ import annotations

import asyncio
import logging

import typer
import uvicorn

from app.db import make_engine, make_sessionmaker, upgrade
from app.logic import bootstrap
from app.settings import Settings

cli = typer.Typer(help="Nephos: an asynchronous control plane for virtual machines.",
                  no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
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


@cli.command()
def up() -> None:
    """Everything in one process on the embedded defaults: migrate, seed, serve."""
    settings = Settings()
    _logging(settings)
    asyncio.run(_prepare(settings, seed_hosts=True))
    from app.api.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, loop="uvloop", http="httptools")


@cli.command()
def api() -> None:
    """The REST API alone (production: run as many as you like behind a balancer)."""
    settings = Settings()
    _logging(settings)
    from app.api.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, loop="uvloop", http="httptools")


@cli.command()
def seed() -> None:
    """Apply migrations and seed the default project, admin, flavors and images."""
    settings = Settings()
    asyncio.run(_prepare(settings, seed_hosts=False))


def main() -> None:
    cli()
