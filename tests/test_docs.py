"""The operator docs and the README say what the code does."""

from __future__ import annotations

from pathlib import Path

from app.logic.operstate import TABLE
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_state_table_doc_matches_the_code() -> None:
    doc = (ROOT / "docs" / "state-table.md").read_text()
    rows = {
        line.split("|")[1].strip().split()[0].strip("`"): [c.strip() for c in line.split("|")[1:-1]]
        for line in doc.splitlines()
        if line.startswith("| `")
    }
    assert set(rows) == {a.value for a in TABLE}
    for action, rule in TABLE.items():
        _, task, allowed, on_accept, on_success, on_failure, commission = rows[action.value]
        assert task == f"`{rule.task}`"
        assert allowed == (", ".join(sorted(s.value for s in rule.allowed_from)) or "—")
        assert on_accept.split()[0] == (rule.on_accept.value if rule.on_accept else "unchanged")
        assert on_success == (rule.on_success.value if rule.on_success else "unchanged")
        assert on_failure == (rule.on_failure.value if rule.on_failure else "unchanged")
        assert commission == ("accepted at once" if rule.commit_at_once else "pending")
        assert ("(admin)" in rows[action.value][0]) == rule.admin_only


def test_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.splitlines()[3:5] == [
        "make run    # installs what it needs, migrates, seeds, serves the API on "
        "http://127.0.0.1:8000 (Swagger UI: /docs)",
        "make test   # installs, brings up PostgreSQL and RabbitMQ if they are not running, runs the whole suite",
    ]
    for name in Settings.model_fields:
        assert f"NEPHOS_{name.upper()}" in readme, name
