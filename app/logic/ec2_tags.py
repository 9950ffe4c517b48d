"""EC2 tags: on instances, set and deleted by clients, described and filtered on; and the
read-only lease tag (``nephos:lease-expires``) every leased instance shows. Keys starting with
``aws:`` or ``nephos:`` are not the clients' to set or delete.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from app.logic import rows
from app.logic.ec2 import Filter, Given, matches, where
from app.logic.errors import BadRequest
from app.models import Ec2Tag, Server, table_of

_servers, _tags = table_of(Server), table_of(Ec2Tag)


_TAGS_OF = rows.ByDialect(
    lambda postgres: (
        sa.select(_tags.c.resource_id, _tags.c.key, _tags.c.value)
        .where(rows.among(_tags.c.resource_id, "ids", postgres=postgres))
        .order_by(_tags.c.key)
    )
)


async def tags_of(session: AsyncSession, resource_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {r: [] for r in resource_ids}
    if resource_ids:
        for rid, key, value in (await session.execute(_TAGS_OF.of(session), {"ids": resource_ids})).all():
            out[rid].append((key, value))
    return out


#: The read-only tag of every instance with a lease: the lease's end (ISO 8601, UTC, seconds).
LEASE_TAG = "nephos:lease-expires"
#: Tag keys clients may not set or delete (AWS reserves "aws:"; Nephos its own).
RESERVED_TAG_PREFIXES = ("aws:", "nephos:")


def lease_tag(server: Server) -> list[tuple[str, str]]:
    """The lease tag of an instance (none without a lease)."""
    end = server.lease_expires_at
    return [(LEASE_TAG, end.strftime("%Y-%m-%dT%H:%M:%SZ"))] if end is not None else []


class iso_utc(FunctionElement[str]):
    """A timestamp as ``lease_tag`` writes it, computed in the database (for filters)."""

    type = sa.String()
    inherit_cache = True


@compiles(iso_utc, "postgresql")
def _iso_utc_pg(element: iso_utc, compiler: Any, **kw: Any) -> str:
    arg = compiler.process(next(iter(element.clauses)), **kw)
    return f"to_char({arg} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"


@compiles(iso_utc, "sqlite")
def _iso_utc_sqlite(element: iso_utc, compiler: Any, **kw: Any) -> str:
    arg = compiler.process(next(iter(element.clauses)), **kw)
    return f"strftime('%Y-%m-%dT%H:%M:%SZ', {arg})"


def lease_tag_filter(values: list[str]) -> sa.ColumnElement[bool]:
    """``tag:nephos:lease-expires``: instances with a lease, its end matching a value (if any)."""
    has = _servers.c.lease_expires_at.is_not(None)
    return sa.and_(has, matches(iso_utc(_servers.c.lease_expires_at), values)) if values else has


def _writable(keys: list[str]) -> None:
    for key in keys:
        if key.lower().startswith(RESERVED_TAG_PREFIXES):
            raise BadRequest(
                f"Tag keys starting with {' or '.join(RESERVED_TAG_PREFIXES)} are reserved: {key}", field="Tag.Key"
            )


async def set_tags(
    session: AsyncSession,
    project_id: uuid.UUID,
    resource_ids: list[str],
    tags: list[tuple[str, str]],
    *,
    new: bool = False,
) -> None:
    """Each resource gets these tags, replacing its tags of the same keys (a key given twice: the
    last value); ``new``: resources this transaction made, with no tags yet. Two statements at
    most, whatever the number of resources and tags."""
    _writable([key for key, _ in tags])
    values = dict(tags)
    if not values or not resource_ids:
        return
    if not new:
        await session.execute(_tags.delete().where(_tags.c.resource_id.in_(resource_ids), _tags.c.key.in_(values)))
    await session.execute(
        _tags.insert(),
        [
            {"project_id": project_id, "resource_id": rid, "key": key, "value": value}
            for rid in resource_ids
            for key, value in values.items()
        ],
    )


async def delete_tags(
    session: AsyncSession, project_id: uuid.UUID, resource_ids: list[str], tags: list[tuple[str, str | None]]
) -> None:
    _writable([key for key, _ in tags])
    base = sa.and_(_tags.c.project_id == project_id, _tags.c.resource_id.in_(resource_ids))
    if not tags:
        await session.execute(_tags.delete().where(base))
    for key, value in tags:
        cond = sa.and_(base, _tags.c.key == key)
        if value is not None:
            cond = sa.and_(cond, _tags.c.value == value)
        await session.execute(_tags.delete().where(cond))


def has_tag(*conditions: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """Instances with a tag meeting ``conditions`` (on the tags table's key and value)."""
    return sa.exists().where(_tags.c.resource_id == _servers.c.ec2_id, *conditions)


def tag_filter(key: str, values: list[str]) -> sa.ColumnElement[bool]:
    """``tag:KEY``: instances with that tag, its value matching one of ``values`` (if any)."""
    return has_tag(_tags.c.key == key, *([matches(_tags.c.value, values)] if values else []))


#: DescribeTags' filters (only instances are tagged here).
TAG_FILTERS: dict[str, Filter] = {
    "resource-id": _tags.c.resource_id,
    "key": _tags.c.key,
    "value": _tags.c.value,
    "resource-type": lambda values: sa.true() if "instance" in values else sa.false(),
}


async def describe_tags(
    session: AsyncSession, project_id: uuid.UUID, *, filters: Given, after: tuple[str, str] | None, size: int | None
) -> tuple[list[tuple[str, str, str]], tuple[str, str] | None]:
    """The project's tags as (resource, key, value), filtered, in (resource, key) order, after
    ``after``; and where the next page starts after, when there is one."""
    stmt = sa.select(_tags.c.resource_id, _tags.c.key, _tags.c.value).where(_tags.c.project_id == project_id)
    stmt = where(stmt, TAG_FILTERS, filters)
    if after is not None:
        stmt = stmt.where(
            sa.tuple_(_tags.c.resource_id, _tags.c.key) > sa.tuple_(sa.literal(after[0]), sa.literal(after[1]))
        )
    stmt = stmt.order_by(_tags.c.resource_id, _tags.c.key)
    found = [
        (str(r), str(k), str(v))
        for r, k, v in (await session.execute(stmt if size is None else stmt.limit(size + 1))).all()
    ]
    if size is not None and len(found) > size:
        found = found[:size]
        return found, (found[-1][0], found[-1][1])
    return found, None
