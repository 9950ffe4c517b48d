"""Projects, users, bearer tokens and EC2 credentials.

Secrets never rest in the clear: bearer tokens are stored as SHA-256 digests
(they are 256 random bits, so a slow hash would buy nothing and cost every
request), EC2 secrets are encrypted with the server key (SigV4 needs the
secret itself). Both are shown once, in the reply that creates them.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import idempotency, quotas
from app.logic.actor import Actor, require_admin
from app.logic.errors import BadRequest, NotFound, Unauthorized
from app.logic.pagination import Page, paginate
from app.logic.rows import insert_unique
from app.models import Ec2Credential, Project, User, table_of

_users = table_of(User)
_creds = table_of(Ec2Credential)
ROLES = ("user", "admin")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "nph_" + secrets.token_urlsafe(32)


#: Every request reads its caller: the statement is built once.
_BY_TOKEN = sa.select(_users.c.id, _users.c.project_id, _users.c.role).where(
    _users.c.token_hash == sa.bindparam("token_hash")
)


class KnownTokens:
    """The users a process has recently found behind their tokens, so their requests do not read
    the caller again: one statement fewer on every call. Kept by token digest (never the token),
    for ``seconds`` at most (``NEPHOS_AUTH_CACHE_SECONDS``; 0 keeps none), at most ``size`` of
    them. A user's id, project and role never change once made, with one exception, which is
    why only users without the admin role are kept: ``ensure_admin`` (``nephos seed``, run while
    APIs serve) rotates the bootstrap admin's token, and that must take effect at once in every
    process. An unknown token is read every time. The one change a kept user may still miss for
    up to ``seconds``: the same ``ensure_admin`` giving the admin role to the user whose token
    ``NEPHOS_ADMIN_TOKEN`` names (that user gets less, not more, meanwhile)."""

    def __init__(self, seconds: float, size: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.size, self._clock = seconds, size, clock
        self._known: dict[str, tuple[Actor, float]] = {}

    def get(self, digest: str) -> Actor | None:
        found = self._known.get(digest)
        if found is None:
            return None
        if found[1] <= self._clock():
            del self._known[digest]
            return None
        return found[0]

    def put(self, digest: str, actor: Actor) -> None:
        if self.seconds <= 0 or actor.is_admin:
            return
        if len(self._known) >= self.size:  # the oldest goes first (dicts keep insertion order)
            del self._known[next(iter(self._known))]
        self._known[digest] = (actor, self._clock() + self.seconds)


async def authenticate(session: AsyncSession, token: str | None, known: KnownTokens | None = None) -> Actor:
    if not token:
        raise Unauthorized("a bearer token is required")
    digest = hash_token(token)
    actor = known.get(digest) if known is not None else None
    if actor is not None:
        return actor
    row = (await session.execute(_BY_TOKEN, {"token_hash": digest})).first()
    if row is None:
        raise Unauthorized("unknown token")
    actor = Actor(user_id=row.id, project_id=row.project_id, is_admin=row.role == "admin")
    if known is not None:
        known.put(digest, actor)
    return actor


# -- projects ------------------------------------------------------------------


async def create_project(
    session: AsyncSession, *, actor: Actor, name: str, limits: dict[str, int] | None = None
) -> Project:
    require_admin(actor)
    project = Project(name=name)
    await insert_unique(session, project, f"project {name}")
    await quotas.set_limits(session, project.id, limits or {})
    return project


async def get_project(session: AsyncSession, *, actor: Actor, project_id: uuid.UUID) -> Project:
    project = await session.get(Project, project_id)
    if project is None or not actor.sees(project.id):
        raise NotFound(f"project {project_id} not found", project_id=str(project_id))
    return project


async def update_project(
    session: AsyncSession, *, actor: Actor, project_id: uuid.UUID, name: str | None, limits: dict[str, int] | None
) -> Project:
    require_admin(actor)
    project = await get_project(session, actor=actor, project_id=project_id)
    if name is not None and name != project.name:
        if await find_project(session, name) is not None:
            raise BadRequest(f"project {name} already exists", field="name")
        project.name = name
    if limits:
        await quotas.lock_project(session, project.id)
        await quotas.set_limits(session, project.id, limits)
    return project


async def list_projects(session: AsyncSession, *, actor: Actor, limit: int, cursor: str | None) -> Page[Project]:
    require_admin(actor)
    table = table_of(Project)
    return await paginate(session, sa.select(Project), table.c.id, limit=limit, cursor=cursor)


async def find_project(session: AsyncSession, name: str) -> Project | None:
    return (await session.scalars(sa.select(Project).where(table_of(Project).c.name == name))).first()


# -- users -----------------------------------------------------------------------


@dataclass(frozen=True)
class NewUser:
    user: User
    token: str


async def create_user(
    session: AsyncSession,
    *,
    actor: Actor,
    name: str,
    email: str,
    project_id: uuid.UUID | None,
    role: str = "user",
    token: str | None = None,
) -> NewUser:
    """A user of ``project_id`` (by default the admin's own project), with a new token."""
    require_admin(actor)
    project_id = project_id or actor.project_id
    if project_id is None:
        raise BadRequest("give project_id", field="project_id")
    if role not in ROLES:
        raise BadRequest(f"role is one of {', '.join(ROLES)}", field="role")
    if await session.get(Project, project_id) is None:
        raise BadRequest(f"project {project_id} does not exist", field="project_id")
    token = token or new_token()
    user = User(name=name, email=email, project_id=project_id, role=role, token_hash=hash_token(token))
    await insert_unique(session, user, "a user with that token")
    return NewUser(user, token)


async def email_of(session: AsyncSession, actor: Actor) -> str:
    """The acting user's email address ("" when none, or for the system)."""
    user = await session.get(User, actor.user_id) if actor.user_id else None
    return user.email if user else ""


async def list_users(session: AsyncSession, *, actor: Actor, limit: int, cursor: str | None) -> Page[User]:
    require_admin(actor)
    return await paginate(session, sa.select(User), _users.c.id, limit=limit, cursor=cursor)


#: The name of the admin ``ensure_admin`` makes (the one whose token NEPHOS_ADMIN_TOKEN sets).
BOOTSTRAP_ADMIN = "admin"


async def ensure_admin(session: AsyncSession, *, project_id: uuid.UUID, token: str | None) -> NewUser | None:
    """The bootstrap admin: with ``token``, that admin exists with that token -- and with that one
    only: a bootstrap admin made earlier (a generated token, or another one set before) has its
    token replaced, so setting ``NEPHOS_ADMIN_TOKEN`` rotates it. Without one, an admin is made
    (and its new token returned) only when none exists yet."""
    if token is not None:
        found = (await session.scalars(sa.select(User).where(_users.c.token_hash == hash_token(token)))).first()
        if found is not None:
            found.role = "admin"
            return None
        bootstrap = (
            await session.scalars(
                sa.select(User)
                .where(_users.c.role == "admin", _users.c.name == BOOTSTRAP_ADMIN)
                .order_by(_users.c.created_at, _users.c.id)
                .limit(1)
            )
        ).first()
        if bootstrap is not None:
            bootstrap.token_hash = hash_token(token)  # the old token stops working now
            return None
    else:
        exists = (await session.scalars(sa.select(_users.c.id).where(_users.c.role == "admin"))).first()
        if exists is not None:
            return None
    system = Actor(user_id=None, project_id=None, is_admin=True)
    return await create_user(
        session, actor=system, name=BOOTSTRAP_ADMIN, email="", project_id=project_id, role="admin", token=token
    )


# -- EC2 credentials ---------------------------------------------------------------


@dataclass(frozen=True)
class NewCredential:
    credential: Ec2Credential
    secret_key: str


_ALNUM = string.ascii_uppercase + string.digits


async def create_ec2_credential(session: AsyncSession, *, actor: Actor, cipher: Fernet) -> NewCredential:
    if actor.user_id is None:
        raise BadRequest("EC2 credentials belong to a user")
    access_key = "AKIA" + "".join(secrets.choice(_ALNUM) for _ in range(16))
    secret = secrets.token_urlsafe(30)[:40]
    credential = Ec2Credential(
        access_key=access_key, user_id=actor.user_id, secret_encrypted=cipher.encrypt(secret.encode()).decode()
    )
    session.add(credential)
    await session.flush()
    return NewCredential(credential, secret)


async def list_ec2_credentials(
    session: AsyncSession, *, actor: Actor, limit: int, cursor: str | None
) -> Page[Ec2Credential]:
    stmt = sa.select(Ec2Credential).where(_creds.c.user_id == actor.user_id)
    # Access keys are random, so they page in key order rather than by time.
    return await paginate_by_key(session, stmt, limit=limit, cursor=cursor)


async def paginate_by_key(
    session: AsyncSession, stmt: sa.Select[Ec2Credential], *, limit: int, cursor: str | None
) -> Page[Ec2Credential]:
    if cursor:
        stmt = stmt.where(_creds.c.access_key > cursor)
    rows = list(await session.scalars(stmt.order_by(_creds.c.access_key).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, rows[-1].access_key if more and rows else None)


def credential_resource(access_key: str) -> str:
    """The credential's name in idempotency records (``idempotency.forget``)."""
    return f"ec2-credential:{access_key}"


async def delete_ec2_credential(session: AsyncSession, *, actor: Actor, access_key: str) -> None:
    credential = await session.get(Ec2Credential, access_key)
    if credential is None or (credential.user_id != actor.user_id and not actor.is_admin):
        raise NotFound(f"access key {access_key} not found", access_key=access_key)
    await idempotency.forget(session, credential_resource(access_key))
    await session.delete(credential)


#: An access key's user and sealed secret (every EC2 call reads it: built once).
_EC2_SECRET = (
    sa.select(_creds.c.secret_encrypted, _users.c.id, _users.c.project_id, _users.c.role)
    .join(_users, _users.c.id == _creds.c.user_id)
    .where(_creds.c.access_key == sa.bindparam("access_key"))
)


async def ec2_secret(session: AsyncSession, *, access_key: str, cipher: Fernet) -> tuple[Actor, str]:
    """The caller behind an access key and its secret (for SigV4); ``Unauthorized`` if unknown."""
    row = (await session.execute(_EC2_SECRET, {"access_key": access_key})).first()
    if row is None:
        raise Unauthorized("unknown access key")
    actor = Actor(user_id=row.id, project_id=row.project_id, is_admin=row.role == "admin")
    return actor, cipher.decrypt(row.secret_encrypted.encode()).decode()
