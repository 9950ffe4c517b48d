"""The FastAPI application: REST under /api/v1, Swagger UI at /docs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline

from app.api import (
    admin,
    catalogue,
    ec2,
    errors,
    events,
    health,
    jobs,
    keys,
    leases,
    metadata,
    metrics,
    networks,
    public_ips,
    servers,
    ui,
    webhooks,
)
from app.api.deps import AppState
from app.api.retry import RetryTransactions
from app.db import engine_of, make_sessionmaker
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
            raise RequestValidationError(
                [{"loc": [where], "msg": "NUL characters are not allowed", "type": "value_error"}]
            )


def create_app(settings: Settings | None = None, state: AppState | None = None) -> FastAPI:
    """The app; with ``state`` it uses the given engine and bus, else it makes its own."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # PostgreSQL: this process listens for committed stream events (``events.listen``).
        listening = None if settings.is_sqlite else asyncio.create_task(events.listen(settings.database_url))
        try:
            if state is not None:
                app.state.nephos = state
                yield
                return
            engine = engine_of(settings)
            app.state.nephos = AppState(
                settings=settings, sessions=make_sessionmaker(engine), cipher=load_cipher(settings)
            )
            try:
                yield
            finally:
                await engine.dispose()
        finally:
            if listening is not None:
                listening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listening

    # Swagger UI and ReDoc from assets this process serves (fastapi-offline ships them): the
    # pages work on a machine with no internet, as a cloud's control network often is.
    app = FastAPIOffline(
        title="Nephos",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(no_nul_in_url)],
        static_url="/docs-assets",
    )
    errors.install(app)
    app.add_middleware(RetryTransactions)
    app.openapi = _derived(app.openapi)  # type: ignore[method-assign]
    # EC2 first: its two routes (not in the document) are matched before the REST API's many,
    # where every EC2 call used to be matched against all of them first.
    for module in (
        ec2,
        servers,
        events,
        networks,
        public_ips,
        jobs,
        catalogue,
        keys,
        leases,
        webhooks,
        admin,
        health,
        metrics,
        metadata,
        ui,
    ):
        app.include_router(module.router)
    app.mount("/ui", ui.assets, name="ui")
    return app


#: A string may not hold NUL (PostgreSQL text cannot): the document says so on every string.
NO_NUL = "^[^\\u0000]*$"


def _derived(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """FastAPI's document, with what the code enforces everywhere written where it applies: no
    NUL in any string, and 409 IdempotencyConflict wherever an Idempotency-Key is taken."""
    done: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        if done:
            return done[0]
        spec = build()
        _no_nul(spec)
        conflict = {
            "description": "IdempotencyConflict: this Idempotency-Key was used with another request",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        for operations in spec.get("paths", {}).values():
            for op in operations.values():
                if any(p.get("name") == "Idempotency-Key" for p in op.get("parameters", [])):
                    op["responses"].setdefault("409", conflict)
        _links(spec)
        done.append(spec)
        return spec

    return openapi


#: OpenAPI links: what a reply's ids lead to (Swagger shows them; schemathesis's stateful phase
#: follows them). (path, method, status) -> [(link name, path, method, {parameter: expression})]
LINKS: dict[tuple[str, str, str], list[tuple[str, str, str, dict[str, str]]]] = {
    ("/api/v1/servers", "post", "202"): [
        (name, "/api/v1/servers/{server_id}" + sub, method, {"server_id": "$response.body#/servers/0/id"})
        # No DELETE link: a destroy is asynchronous and a destroyed server stays readable by id
        # (API.md), while a link from create to DELETE makes a stateful tester assert "deleted,
        # so GET is 404" -- true of most APIs, not of this resource (nor of EC2's instances).
        for name, sub, method in (
            ("GetServer", "", "get"),
            ("PatchServer", "", "patch"),
            ("ServerAction", "/actions", "post"),
            ("ServerEvents", "/events", "get"),
        )
    ]
    + [("GetBuildJob", "/api/v1/jobs/{job_id}", "get", {"job_id": "$response.body#/job_ids/0"})],
    ("/api/v1/servers/{server_id}/actions", "post", "202"): [
        ("GetJob", "/api/v1/jobs/{job_id}", "get", {"job_id": "$response.body#/job_id"})
    ],
    ("/api/v1/servers/{server_id}", "delete", "202"): [
        ("GetJob", "/api/v1/jobs/{job_id}", "get", {"job_id": "$response.body#/job_id"})
    ],
    ("/api/v1/admin/projects", "post", "201"): [
        ("GetProject", "/api/v1/admin/projects/{project_id}", "get", {"project_id": "$response.body#/id"}),
        ("PatchProject", "/api/v1/admin/projects/{project_id}", "patch", {"project_id": "$response.body#/id"}),
    ],
    ("/api/v1/admin/hosts", "post", "201"): [
        ("PatchHost", "/api/v1/admin/hosts/{name}", "patch", {"name": "$response.body#/name"})
    ],
    ("/api/v1/keypairs", "post", "201"): [
        ("DeleteKeypair", "/api/v1/keypairs/{name}", "delete", {"name": "$response.body#/name"})
    ],
    ("/api/v1/credentials/ec2", "post", "201"): [
        (
            "DeleteCredential",
            "/api/v1/credentials/ec2/{access_key}",
            "delete",
            {"access_key": "$response.body#/access_key"},
        )
    ],
}


def _links(spec: dict[str, Any]) -> None:
    paths = spec.get("paths", {})
    for (path, method, status), links in LINKS.items():
        reply = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if reply is None:
            continue
        for name, target, target_method, parameters in links:
            op = paths.get(target, {}).get(target_method)
            if op is not None:
                reply.setdefault("links", {})[name] = {"operationId": op["operationId"], "parameters": parameters}


def _no_nul(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "string" and not {"format", "enum", "const", "pattern"} & set(node):
            node["pattern"] = NO_NUL
        if node.get("type") == "object" and "additionalProperties" in node and "propertyNames" not in node:
            node["propertyNames"] = {"pattern": NO_NUL}  # a map's keys are strings too
        for value in node.values():
            _no_nul(value)
    elif isinstance(node, list):
        for value in node:
            _no_nul(value)
