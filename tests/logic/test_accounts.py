"""The callers an API process remembers behind their tokens (``accounts.KnownTokens``)."""

from __future__ import annotations

import uuid

from app.logic.accounts import KnownTokens
from app.logic.actor import Actor


def _user() -> Actor:
    return Actor(user_id=uuid.uuid4(), project_id=uuid.uuid4())


def test_a_user_is_kept_for_its_seconds_then_read_again() -> None:
    now = [100.0]
    known = KnownTokens(10, clock=lambda: now[0])
    alice = _user()
    known.put("a", alice)
    assert known.get("a") is alice
    now[0] = 109.9
    assert known.get("a") is alice
    now[0] = 110.0
    assert known.get("a") is None


def test_admins_are_never_kept_nor_anything_when_off() -> None:
    known = KnownTokens(10)
    known.put("root", Actor(user_id=uuid.uuid4(), project_id=uuid.uuid4(), is_admin=True))
    assert known.get("root") is None
    off = KnownTokens(0)
    off.put("a", _user())
    assert off.get("a") is None


def test_a_full_cache_lets_its_oldest_go() -> None:
    known = KnownTokens(10, size=2)
    first, second, third = _user(), _user(), _user()
    known.put("1", first)
    known.put("2", second)
    known.put("3", third)
    assert (known.get("1"), known.get("2"), known.get("3")) == (None, second, third)
