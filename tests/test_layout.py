"""The house's edges, checked where import-linter cannot see: the API layer holds no SQL."""

from __future__ import annotations

import re
from pathlib import Path

API = Path(__file__).resolve().parent.parent / "app" / "api"


def test_no_sql_under_the_api() -> None:
    """Routers and the EC2 facade parse, call one logic function and shape the reply: queries
    live in app/logic (the API may name SQLAlchemy's exceptions and session type, nothing more)."""
    offenders = []
    for path in sorted(API.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(
                r"^\s*import sqlalchemy|\bsa\.(select|update|delete|insert|case|and_|or_)\b"
                r"|\.(execute|scalars?)\(|table_of\(",
                line,
            ):
                offenders.append(f"{path.relative_to(API.parent.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
