"""Time-ordered UUIDs (version 7, RFC 9562) and UTC time.

Ids that sort by creation time make every list's "oldest first" order and its
cursor one indexed column (``ORDER BY id``, ``WHERE id > :cursor``), on
PostgreSQL's ``uuid`` and SQLite's hex text alike. Python 3.11 has no
``uuid.uuid7``; these few lines stand in for it.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> uuid.UUID:
    """A version-7 UUID; ids made by one process strictly increase."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            # Same (or a clock step back): keep the last millisecond and count
            # up in the 12-bit rand_a field so the order still holds.
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:
                ms += 1
                _counter = 0
        else:
            _counter = 0
        _last_ms = ms
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def utcnow() -> datetime:
    return datetime.now(UTC)


def ec2_id(prefix: str) -> str:
    """An EC2-style id: ``prefix-`` and 17 lowercase hex digits (``i-``, ``r-``, ``ami-`` ...)."""
    return f"{prefix}-{os.urandom(9).hex()[:17]}"
