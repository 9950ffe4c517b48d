"""Row-level helpers shared by the logic modules."""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlmodel import SQLModel

from app.logic.errors import AlreadyExists
from app.models import table_of

#: ``session.info`` keys: per model, the rows ``lock_all`` locked in this transaction, by id; and
#: the rows ``keep`` keeps (read, not locked). The session's identity map holds loaded rows
#: weakly: kept here, ``session.get`` finds them there (no statement) until ``release_all``,
#: instead of reading each one again.
_HELD, _KEPT = "nephos.held", "nephos.kept"


def postgres(session: AsyncSession | Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def among(column: sa.ColumnElement[Any], name: str, *, postgres: bool) -> sa.ColumnElement[bool]:
    """``column IN :name``, a list bound at run time. On PostgreSQL it is one array parameter
    (``= ANY``): one statement text, and a plan made once, whatever the list's length (an
    expanding IN sends, and has PostgreSQL plan, a parameter per element). SQLite has no arrays:
    there it is the expanding IN."""
    if postgres:
        return column == sa.any_(sa.cast(sa.bindparam(name), sa.ARRAY(column.type)))
    return column.in_(sa.bindparam(name, expanding=True))


S = TypeVar("S")


class ByDialect(Generic[S]):
    """A statement built once for each dialect (``build(postgres)``, where it uses ``among``),
    the session's picked when it runs."""

    def __init__(self, build: Callable[[bool], S]) -> None:
        self._built = {is_postgres: build(is_postgres) for is_postgres in (True, False)}

    def of(self, session: AsyncSession | Session) -> S:
        return self._built[postgres(session)]

    def of_dialect(self, *, postgres: bool) -> S:
        return self._built[postgres]


async def insert_unique(session: AsyncSession, row: object, what: str) -> None:
    """Insert ``row``; a unique clash is the client's ``AlreadyExists``, not a 500.

    A savepoint keeps the clash from aborting the caller's transaction.
    """
    try:
        async with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise AlreadyExists(f"{what} already exists") from None


async def insert_or_skip(session: AsyncSession, table: sa.Table, values: dict[str, object]) -> bool:
    """``INSERT ... ON CONFLICT DO NOTHING``: True when this call inserted the row. A concurrent
    insert of the same unique key waits for the other transaction's end, then yields to it."""
    statement = insert_or_skip_statement(postgres(session), table, tuple(values))
    return (await session.execute(statement, values)).first() is not None


@functools.lru_cache(maxsize=64)
def insert_or_skip_statement(is_postgres: bool, table: sa.Table, columns: tuple[str, ...]) -> sa.Insert:
    """``insert_or_skip``'s statement for these columns, built once (the values are bound
    parameters named as the columns), also for a caller that sends it with a read of its own (a
    RunInstances claims its client token so): it returns the row's key when it inserted the
    row, nothing when it skipped it."""
    from sqlalchemy.dialects import postgresql, sqlite

    insert: Any = (postgresql if is_postgres else sqlite).insert(table)
    bound = {c: sa.bindparam(c, type_=table.c[c].type) for c in columns}
    statement: sa.Insert = insert.values(bound).on_conflict_do_nothing().returning(*table.primary_key.columns)
    return statement


#: ``insert_new`` writes up to so many rows in one statement on PostgreSQL (a create of one or
#: two VMs); more go in an INSERT of many rows per table.
_FEW = 12


@functools.lru_cache(maxsize=64)
def _one_statement(shape: tuple[tuple[sa.Table, int], ...], along: sa.Select[Any] | sa.Update | None) -> sa.Executable:
    """``insert_new``'s statement for so many rows of each table, built once: an INSERT per row
    (SQLAlchemy does not cache a multi-row VALUES), bound parameters ``{table}_{row}_{column}``,
    so each shape is compiled once (SQLAlchemy's statement cache); all but the last statement
    (``along``, or the last INSERT) are data-modifying CTEs of it."""
    inserts = [
        sa.insert(table).values({c.key: sa.bindparam(f"{t}_{r}_{c.key}", type_=c.type) for c in table.columns})
        for t, (table, count) in enumerate(shape)
        for r in range(count)
    ]
    last: sa.Select[Any] | sa.Update | sa.Insert = along if along is not None else inserts.pop()
    return last.add_cte(*(insert.cte(f"new_{i}") for i, insert in enumerate(inserts)))


@functools.cache
def _foreign_key_order() -> dict[sa.Table, int]:
    """Every table's place in foreign-key order (``MetaData.sorted_tables``), sorted once: the
    sort walks the whole schema, and ``insert_new`` runs on every create."""
    return {table: i for i, table in enumerate(SQLModel.metadata.sorted_tables)}


async def insert_new(
    session: AsyncSession, along: tuple[sa.Select[Any] | sa.Update, dict[str, Any]] | None = None
) -> None:
    """Write the objects added to ``session`` since its last flush, then keep them in the
    session as persistent, as a flush would: on PostgreSQL, a few rows in one statement (foreign
    keys are checked at a statement's end, so the order of its parts does not matter); else an
    INSERT of many rows per table, tables in foreign-key order (the unit of work does not order
    them: the models have no relationship()).

    For the path that writes a handful of rows of several tables at once (a create): no
    per-object flush bookkeeping, and one round trip. The objects carry every value (ids and
    defaults are set in Python); rows changed or deleted stay for the next flush, after these
    (autoflush is held off meanwhile).

    ``along``: a statement (built once) and its parameters, sent in the same statement on
    PostgreSQL, after the rows elsewhere (a lock the caller takes next, or a row it changes:
    one round trip fewer)."""
    new = list(session.new)
    if any(None in sa.inspect(obj).mapper.identity_key_from_instance(obj)[1] for obj in new):
        await session.flush()  # an id the database draws: the unit of work reads it back
        new = []
    by_table: dict[sa.Table, list[Any]] = defaultdict(list)
    for obj in new:
        by_table[sa.inspect(obj).mapper.local_table].append(obj)
    tables = sorted(by_table, key=_foreign_key_order().__getitem__)
    values = {
        table: [{prop.columns[0].key: getattr(o, prop.key) for prop in sa.inspect(o).mapper.column_attrs} for o in objs]
        for table, objs in by_table.items()
    }
    for obj in new:
        session.expunge(obj)
    with session.no_autoflush:  # a changed row may name a new one: it is flushed after
        if new and postgres(session) and len(new) <= _FEW:
            params: dict[str, Any] = dict(along[1]) if along is not None else {}
            for t, table in enumerate(tables):
                for r, row in enumerate(values[table]):
                    params.update((f"{t}_{r}_{key}", value) for key, value in row.items())
            shape = tuple((table, len(values[table])) for table in tables)
            await session.execute(_one_statement(shape, along[0] if along is not None else None), params)
        else:
            for table in tables:
                await session.execute(sa.insert(table), values[table])
            if along is not None:
                await session.execute(*along)
    for obj in new:
        make_transient_to_detached(obj)
        session.add(obj)


#: A change to a loaded row that ``changed_rows`` can write: its table, the columns it sets, and
#: the primary key's columns (the row it names).
_Change = tuple[sa.Table, tuple[str, ...], tuple[str, ...]]


def changed_rows(
    session: AsyncSession,
) -> tuple[sa.Update, dict[str, Any], list[Any]] | None:
    """The changes to the rows ``session`` loaded, as one statement for PostgreSQL: an UPDATE by
    primary key per row, setting the columns that changed, all but the last as CTEs of it (built
    once per shape); its parameters; and the objects it writes (``written`` marks them clean
    once it ran). None when there is nothing to write so, or what there is the unit of work must
    write: rows deleted, or a change to anything but a column."""
    if session.deleted:
        return None
    found = []
    for obj in session.dirty:
        state = sa.inspect(obj)
        mapper = state.mapper
        if any(state.attrs[rel.key].history.has_changes() for rel in mapper.relationships):
            return None
        changed = [prop for prop in mapper.column_attrs if state.attrs[prop.key].history.has_changes()]
        if changed:
            found.append((mapper.local_table.name, mapper.primary_key_from_instance(obj), obj, mapper, changed))
    if not found:
        return None
    # In table order, then by key: the same kinds of change make the same statement, whatever
    # order the session lists its rows in.
    found.sort(key=lambda entry: (entry[0], [str(v) for v in entry[1]]))
    shape: list[_Change] = []
    params: dict[str, Any] = {}
    for i, (_, key, obj, mapper, changed) in enumerate(found):
        primary = tuple(c.key for c in mapper.primary_key)
        shape.append((mapper.local_table, tuple(prop.columns[0].key for prop in changed), primary))
        params.update((f"u{i}_{prop.columns[0].key}", getattr(obj, prop.key)) for prop in changed)
        params.update((f"u{i}_pk_{column}", value) for column, value in zip(primary, key, strict=True))
    return _updates(tuple(shape)), params, [entry[2] for entry in found]


@functools.lru_cache(maxsize=64)
def _updates(shape: tuple[_Change, ...]) -> sa.Update:
    """``changed_rows``' statement for one shape, built once: bound parameters
    ``u{row}_{column}`` and ``u{row}_pk_{column}``."""
    updates = [
        table.update()
        .where(*(table.c[key] == sa.bindparam(f"u{i}_pk_{key}", type_=table.c[key].type) for key in primary))
        .values({key: sa.bindparam(f"u{i}_{key}", type_=table.c[key].type) for key in keys})
        for i, (table, keys, primary) in enumerate(shape)
    ]
    last = updates.pop()
    return last.add_cte(*(update.cte(f"changed_{i}") for i, update in enumerate(updates))) if updates else last


def written(session: AsyncSession, objects: list[Any]) -> None:
    """``changed_rows``' objects are as their statement wrote them: clean, as after a flush."""
    for obj in objects:
        state = sa.inspect(obj)
        # What the unit of work does to a row it has flushed (``InstanceState._commit_all``):
        # its values become the committed ones, and it leaves the session's modified set.
        state._commit_all(state.dict, session.sync_session.identity_map)


async def lock_all(session: AsyncSession, model: type[SQLModel], ids: Iterable[uuid.UUID]) -> list[Any]:
    """Lock several rows of ``model`` in one statement, in id order (the fixed order of multi-row
    locks), read afresh. Until ``release_all``, ``held`` says so, and the callers that would lock
    one of them read it from the session instead (no statement, no second wait)."""
    wanted = sorted(set(ids))
    if not wanted:
        return []
    found: list[Any] = list(await session.scalars(_lock_all(model, postgres(session)), {"ids": wanted}))
    for row in found:
        hold(session, row)
    return found


@functools.lru_cache(maxsize=32)
def _lock_all(model: type[SQLModel], is_postgres: bool) -> sa.Select[Any]:
    """``lock_all``'s statement for ``model``, built once: on PostgreSQL one text for any number
    of rows (``among``), so a batch of any size neither renders nor prepares it again."""
    table = table_of(model)
    return (
        sa.select(model)
        .where(among(table.c.id, "ids", postgres=is_postgres))
        .order_by(table.c.id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )


def hold(session: AsyncSession, row: Any) -> None:
    """A row this transaction locked and read afresh by other means than ``lock_all``: until
    ``release_all``, ``held`` says so, as if ``lock_all`` had locked it."""
    session.info.setdefault(_HELD, {}).setdefault(type(row), {})[row.id] = row


def take_only_move(session: AsyncSession, key: str, is_zero: Callable[[Any], bool]) -> tuple[Any, Any] | None:
    """The one move a deferring transaction summed under ``session.info[key]`` (per host, per
    project), taken, as (whose, how much), for a caller that sends it with other writes in one
    statement on PostgreSQL; None, taking nothing, unless the database is PostgreSQL and exactly
    one of the sums is not zero (then the moves are made one by one, in their fixed order)."""
    summed: dict[Any, Any] = session.info.get(key) or {}
    moving = [(whose, move) for whose, move in summed.items() if not is_zero(move)]
    if len(moving) != 1 or not postgres(session):
        return None
    session.info[key] = {}
    return moving[0]


def keep(session: AsyncSession, found: Iterable[Any]) -> None:
    """Keep rows this transaction read and will use again (not locked: ``held`` does not say
    so) until ``release_all``: ``session.get`` finds them with no statement."""
    session.info.setdefault(_KEPT, []).extend(found)


def held(session: AsyncSession, model: type[SQLModel], row_id: uuid.UUID | None) -> bool:
    """Did ``lock_all`` lock this row in this transaction?"""
    return row_id in session.info.get(_HELD, {}).get(model, ())


def release_all(session: AsyncSession) -> None:
    """Forget what ``lock_all`` held and ``keep`` kept (its transaction is over)."""
    session.info.pop(_HELD, None)
    session.info.pop(_KEPT, None)
