"""FastAPI dependencies as ``Annotated`` aliases, and the per-request transaction.

One session per request; the route commits it (``Tx.commit``) before its reply
is built, and publishes the jobs the transaction wrote only after the commit.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from cryptography.fernet import Fernet
from fastapi import Depends, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.api.schemas import iso_8601
from app.bus import Bus
from app.logic import accounts, idempotency
from app.logic.actor import Actor
from app.logic.errors import Forbidden
from app.logic.jobs import Outbox
from app.logic.pagination import MAX_LIMIT
from app.settings import Settings

Publish = Callable[[list[Any]], Awaitable[Any]]


Since = Annotated[
    datetime | None,
    BeforeValidator(iso_8601),
    Query(description="ISO 8601: only servers changed since then (destroyed ones included)"),
]

#: Paging, as every list takes it: a page size, and the opaque cursor a previous page handed out.
PageLimit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page")]
Cursor = Annotated[
    str | None, Query(pattern=r"^[A-Za-z0-9_-]*$", max_length=64, description="The next_cursor of the previous page")
]


async def _publish_nothing(job_ids: list[Any]) -> None:
    """No bus attached: jobs stay PENDING in the outbox until a dispatcher sends them."""


@dataclass
class AppState:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    cipher: Fernet
    publish: Publish = _publish_nothing
    bus_ok: Callable[[], bool] = field(default=lambda: True)
    bus: Bus | None = None  # for admin work that talks to agents (reconcile)
    known_tokens: accounts.KnownTokens = field(init=False)

    def __post_init__(self) -> None:
        self.known_tokens = accounts.KnownTokens(self.settings.auth_cache_seconds)


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.nephos
    return state


StateDep = Annotated[AppState, Depends(get_state)]


class Tx:
    """The request's transaction, the jobs to publish once it commits, and other work that must
    wait for the commit (``later``). Routes never commit: ``CommittingRoute`` does, once the
    route has built its reply, and ``Idempotent`` where it stores that reply."""

    def __init__(self, session: AsyncSession, outbox: Outbox, publish: Publish) -> None:
        self.session = session
        self.outbox = outbox
        self._publish = publish
        self._later: list[Callable[[], Awaitable[Any]]] = []

    def later(self, step: Callable[[], Awaitable[Any]]) -> None:
        """Run ``step`` after the commit (a message to an agent): never for a rolled-back request."""
        self._later.append(step)

    async def commit(self) -> None:
        await self.session.commit()
        if self.outbox.jobs:
            jobs = list(self.outbox.jobs)  # the committed rows: published without reading them back
            self.outbox.clear()
            await self._publish(jobs)
        steps, self._later = self._later, []
        for step in steps:
            await step()


async def get_tx(state: StateDep) -> AsyncIterator[Tx]:
    async with state.sessions() as session:
        yield Tx(session, Outbox(state.settings.job_deadline_seconds), state.publish)


class CommittingRoute(APIRoute):
    """The one place a REST request's transaction commits: when the route has returned its reply
    (it was accepted), then what waited for the commit is published. A refusal is an exception
    and commits nothing; a commit that loses a race raises here, where the error handlers and
    the retry middleware take it like any other. The endpoint is wrapped, not the handler, so
    the commit runs while the request's session is surely open."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        @functools.wraps(endpoint)
        async def committing(*args: Any, **values: Any) -> Any:
            reply = await endpoint(*args, **values)
            tx = values.get("tx")  # routes take their transaction as ``tx``
            if isinstance(tx, Tx) and not (isinstance(reply, Response) and reply.status_code >= 400):
                await tx.commit()
            return reply

        super().__init__(path, committing, **kwargs)


TxDep = Annotated[Tx, Depends(get_tx)]

_bearer = HTTPBearer(auto_error=False, description="A user's API token")


async def current_user(
    tx: TxDep,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Actor:
    token = credentials.credentials if credentials else None
    return await accounts.authenticate(tx.session, token, state.known_tokens)


CurrentUser = Annotated[Actor, Depends(current_user)]


async def admin_user(actor: CurrentUser) -> Actor:
    if not actor.is_admin:
        raise Forbidden("this needs the admin role")
    return actor


AdminUser = Annotated[Actor, Depends(admin_user)]


class Idempotent:
    """Runs a creating request once per ``Idempotency-Key``; replays the first reply after."""

    def __init__(self, request: Request, tx: Tx, actor: Actor, key: str | None, cipher: Fernet) -> None:
        self.request, self.tx, self.actor, self.key, self.cipher = request, tx, actor, key, cipher
        self.resource: str | None = None

    def created(self, resource: str) -> None:
        """Name what this request created, when it can be deleted (``idempotency.forget``)."""
        self.resource = resource

    async def run(self, status_code: int, make: Callable[[], Awaitable[BaseModel]]) -> JSONResponse:
        if self.key is None or self.actor.user_id is None:
            reply = jsonable_encoder(await make())
            await self.tx.commit()
            return JSONResponse(reply, status_code=status_code)
        idempotency.check_key(self.key)
        fp = idempotency.fingerprint(self.request.method, self.request.url.path, await self.request.body())
        session, user_id = self.tx.session, self.actor.user_id
        stored = await idempotency.replay(session, user_id=user_id, key=self.key, fp=fp, cipher=self.cipher)
        if stored is not None:
            return JSONResponse(stored.response, status_code=stored.status_code)
        reply = jsonable_encoder(await make())
        idempotency.store(
            session,
            user_id=user_id,
            key=self.key,
            fp=fp,
            status_code=status_code,
            response=reply,
            cipher=self.cipher,
            resource=self.resource,
        )
        try:
            await self.tx.commit()
        except IntegrityError:
            # A concurrent request with this key committed first: ours rolled
            # back whole, and the winner's reply is the answer.
            await session.rollback()
            self.tx.outbox.clear()
            stored = await idempotency.replay(session, user_id=user_id, key=self.key, fp=fp, cipher=self.cipher)
            if stored is None:
                raise
            return JSONResponse(stored.response, status_code=stored.status_code)
        return JSONResponse(reply, status_code=status_code)


async def idempotent(
    request: Request,
    tx: TxDep,
    actor: CurrentUser,
    state: StateDep,
    key: Annotated[str | None, Header(alias="Idempotency-Key", description="Replays the first reply for 24 h")] = None,
) -> Idempotent:
    # An async factory, not the class itself: FastAPI runs sync dependencies on a thread pool.
    return Idempotent(request, tx, actor, key, state.cipher)


IdempotentDep = Annotated[Idempotent, Depends(idempotent)]
