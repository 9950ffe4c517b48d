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


def test_make_run_installs_what_running_needs_and_make_test_the_rest() -> None:
    """``make run`` on a fresh clone installs the package alone (no pytest, mypy, moto,
    schemathesis or awscli); ``make test`` adds the development extras and chromium."""
    makefile = (ROOT / "Makefile").read_text()
    rules = {
        line.split(":", 1)[0]: line.split(":", 1)[1].split()
        for line in makefile.splitlines()
        if line
        and not line[0].isspace()
        and ":" in line
        and not line.startswith(("#", ".", "\t"))
        and "=" not in line.split(":", 1)[0]
    }
    assert rules["run"] == ["install-runtime"]
    assert rules["install-runtime"] == ["$(RUNTIME)"]
    runtime = makefile.split("$(RUNTIME): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    assert "-e ." in runtime and "[dev]" not in runtime
    assert "install" in rules["test"] and "[dev]" in makefile.split("$(STAMP): $(RUNTIME)", 1)[1].split("\n\n", 1)[0]
    assert "test-fast" in rules
