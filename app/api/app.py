"""The FastAPI application: REST under /api/v1, Swagger UI at /docs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline

from app.api import admin, catalogue, ec2, errors, health, jobs, keys, metrics, servers
from app.api.deps import AppState
from app.api.retry import RetryTransactions
from app.db import make_engine, make_sessionmaker
from app.serverkey import load_cipher
from app.settings import Settings

DESCRIPTION = """
Nephos is an asynchronous control plane for virtual machines.

Every call but `/healthz`, `/openapi.json` and `/docs` needs `Authorization: Bearer <token>`.
Actions answer **202** with a job; poll `GET /api/v1/jobs/{id}` or the server's `task`.
Errors share one body: `{"error": {"code", "message", "details"}}`.
"""


async def no_nul_in_url(request: Request) -> None:
    """A NUL in a path or query parameter is a validation error (PostgreSQL text cannot hold one)."""
    for where, value in (("path", request.url.path), *(("query", v) for v in request.query_params.values())):
        if "\x00" in value:
            raise RequestValidationError([{"loc": [where], "msg": "NUL characters are not allowed",
                                           "type": "value_error"}])


def create_app(settings: Settings | None = None, state: AppState | None = None) -> FastAPI:
    """The app; with ``state`` it uses the given engine and bus, else it makes its own."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state is not None:
            app.state.nephos = state
            yield
            return
        engine = make_engine(settings.database_url)
        app.state.nephos = AppState(settings=settings, sessions=make_sessionmaker(engine),
                                    cipher=load_cipher(settings))
        try:
            yield
        finally:
            await engine.dispose()

    # Swagger UI and ReDoc from assets this process serves (fastapi-offline ships them): the
    # pages work on a machine with no internet, as a cloud's control network often is.
    app = FastAPIOffline(title="Nephos", version="1", description=DESCRIPTION, lifespan=lifespan,
                         dependencies=[Depends(no_nul_in_url)], static_url="/docs-assets")
    errors.install(app)
    app.add_middleware(RetryTransactions)
    for module in (servers, jobs, catalogue, keys, admin, health, metrics, ec2):
        app.include_router(module.router)
    return app
