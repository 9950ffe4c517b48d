"""The console in a terminal: ``nephos server|flavor|quota|lease|events`` against a running API.

Where the API is and who is asking: ``--url`` / ``--token``, else ``NEPHOS_API_URL`` /
``NEPHOS_TOKEN``, else the profile file (``NEPHOS_PROFILE``, default
``~/.config/nephos/profile``: ``url = ...`` and ``token = ...`` lines). Tables by default,
``--json`` for scripts. ``--wait`` follows the live event stream until every job the command
started has finished, showing each step, and exits non-zero if one failed. The stream is opened
before the request is sent, so nothing is missed. Exit status: 0 done, 1 refused or failed,
2 the API could not be reached or the command is incomplete.

Every rule stays the API's: these commands only call it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

server_cli = typer.Typer(help="Your VMs.", no_args_is_help=True)
flavor_cli = typer.Typer(help="Flavors.", no_args_is_help=True)
quota_cli = typer.Typer(help="Your project's quotas.", no_args_is_help=True)
lease_cli = typer.Typer(help="Leases.", no_args_is_help=True)
events_cli = typer.Typer(help="The live event stream.", no_args_is_help=True)

Url = Annotated[str | None, typer.Option("--url", help="The API (default: NEPHOS_API_URL, else the profile)")]
Token = Annotated[str | None, typer.Option("--token", help="Your token (default: NEPHOS_TOKEN, else the profile)")]
Json = Annotated[bool, typer.Option("--json", help="JSON for scripts, instead of a table")]
Wait = Annotated[bool, typer.Option("--wait", help="Follow the job(s) until they finish")]
TIMEOUT = 30.0


class Refused(Exception):
    """The API said no (exit 1), or could not be reached (exit 2)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _profile() -> dict[str, str]:
    path = Path(os.environ.get("NEPHOS_PROFILE") or Path.home() / ".config" / "nephos" / "profile")
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                out[key.strip()] = value.strip().strip('"')
    return out


class Api:
    """The running API, as this user."""

    def __init__(self, url: str | None, token: str | None) -> None:
        profile = _profile()
        base = url or os.environ.get("NEPHOS_API_URL") or profile.get("url") or "http://127.0.0.1:8000"
        secret = token or os.environ.get("NEPHOS_TOKEN") or profile.get("token")
        if not secret:
            raise Refused("a token is needed: --token, NEPHOS_TOKEN, or token = ... in the profile", 2)
        self.base, self.headers = base.rstrip("/"), {"Authorization": f"Bearer {secret}"}

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        try:
            r = httpx.request(
                method,
                f"{self.base}{path}",
                headers=self.headers,
                json=body,
                params={k: v for k, v in params.items() if v is not None},
                timeout=TIMEOUT,
            )
        except httpx.TransportError as exc:
            raise Refused(f"the Nephos API at {self.base} cannot be reached ({exc})", 2) from None
        if r.status_code >= 400:
            try:
                error = r.json()["error"]
                raise Refused(f"{r.status_code} {error['code']}: {error['message']}")
            except (ValueError, KeyError, TypeError):
                raise Refused(f"the API answered {r.status_code}: {r.text[:200]}") from None
        return r.json() if r.content else None

    def pages(self, path: str, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.call("GET", path, limit=500, cursor=cursor, **params)
            items += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    @contextmanager
    def stream(self, **params: Any) -> Iterator[Iterator[tuple[str, dict[str, Any]]]]:
        """The event stream, opened now: (kind, data) pairs as they come."""
        client = httpx.Client(timeout=httpx.Timeout(TIMEOUT, read=None))
        try:
            with client.stream(
                "GET", f"{self.base}/api/v1/events/stream", headers=self.headers, params=params
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise Refused(f"the event stream was refused: {response.status_code} {response.text[:200]}")
                yield _events(response.iter_lines())
        except httpx.TransportError as exc:
            raise Refused(f"the event stream at {self.base} broke off ({exc})", 2) from None
        finally:
            client.close()


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    kind, data = "message", ""
    for line in lines:
        if line == "":
            if data:
                yield kind, json.loads(data)
            kind, data = "message", ""
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def _out(as_json: bool, value: Any, table: Table | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(value, indent=2, sort_keys=True))
    elif table is not None:
        Console().print(table)


def _run(fn: Any) -> None:
    try:
        fn()
    except Refused as exc:
        Console(stderr=True).print(f"[red]nephos: {exc}")
        raise typer.Exit(exc.status) from None


def _servers_table(servers: list[dict[str, Any]]) -> Table:
    table = Table(title=f"servers ({len(servers)})")
    for column in ("id", "name", "state", "task", "flavor", "host", "address", "lease ends"):
        table.add_column(column)
    for s in servers:
        address = ", ".join(a["ip"] + (f" ({a['public_ip']})" if a.get("public_ip") else "") for a in s["addresses"])
        table.add_row(
            s["id"],
            s["name"],
            s["operstate"],
            s["task"] or "",
            s.get("flavor") or "",
            s.get("host") or "",
            address,
            (s.get("lease_expires_at") or "")[:19],
        )
    return table


def _follow(events: Iterator[tuple[str, dict[str, Any]]], jobs: list[str], servers: list[str], as_json: bool) -> bool:
    """Show the steps of ``servers`` until every job in ``jobs`` has finished; True if all
    succeeded."""
    # The stream was opened before the request was sent: every step of these jobs is in it.
    waiting, ok, console = set(jobs), True, Console(stderr=True)
    if not waiting:
        return ok
    with console.status(f"waiting for {len(waiting)} job(s)") as status:
        for kind, data in events:
            if data.get("server_id") not in servers:
                continue
            line = f"{data.get('server_id', '')[:8]} {kind}: {data.get('from') or ''}->{data.get('to') or ''}"
            line += f" {data.get('action') or ''} {data.get('message') or ''}".rstrip()
            if not as_json:
                console.print(line)
            if kind == "job.finished" and data.get("job_id") in waiting:
                waiting.discard(data["job_id"])
                ok = ok and data.get("event") == "job_succeeded"
                if not waiting:
                    return ok
                status.update(f"waiting for {len(waiting)} job(s)")
    return ok


# -- servers ----------------------------------------------------------------------------------


@server_cli.command("list")
def server_list(
    state: Annotated[str | None, typer.Option(help="Only VMs in this operstate")] = None,
    name: Annotated[str | None, typer.Option(help="Only VMs of this name")] = None,
    url: Url = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Your project's VMs."""

    def run() -> None:
        servers = Api(url, token).pages("/api/v1/servers", operstate=state, name=name)
        _out(as_json, servers, _servers_table(servers))

    _run(run)


@server_cli.command("show")
def server_show(server_id: str, url: Url = None, token: Token = None, as_json: Json = False) -> None:
    """One VM, whole."""

    def run() -> None:
        s = Api(url, token).call("GET", f"/api/v1/servers/{server_id}")
        table = Table(title=f"server {s['name']}", show_header=False)
        for key in ("id", "name", "operstate", "task", "flavor", "image", "host", "zone", "key_name", "created_at"):
            table.add_row(key, str(s.get(key) or ""))
        table.add_row("lease ends", str(s.get("lease_expires_at") or "never"))
        for a in s["addresses"]:
            table.add_row(
                f"address ({a['network']})",
                f"{a['ip']} {a['mac']}" + (f" public {a['public_ip']}" if a.get("public_ip") else ""),
            )
        _out(as_json, s, table)

    _run(run)


def _submit(api: Api, wait: bool, as_json: bool, send: Any) -> None:
    """Send a request that starts jobs; with ``wait``, follow them (the stream opened first)."""
    if not wait:
        typer.echo(json.dumps(send(), indent=2 if as_json else None, sort_keys=True))
        return
    with api.stream(kind=["server.state", "server.task", "job.finished"]) as events:
        reply = send()
        jobs = [str(j) for j in reply.get("job_ids") or ([reply["job_id"]] if reply.get("job_id") else [])]
        ids = [str(s["id"]) for s in reply.get("servers", [])] or [str(reply.get("server_id"))]
        ok = _follow(events, jobs, ids, as_json)
    final = [api.call("GET", f"/api/v1/servers/{sid}") for sid in ids if sid]
    if as_json:
        _out(True, {"reply": reply, "ok": ok, "servers": final})
    elif final:
        Console().print(_servers_table(final))
    if not ok:
        raise Refused("a job failed (see the events above)")


@server_cli.command("create")
def server_create(
    name: str,
    flavor: Annotated[str, typer.Option(help="The flavor's name")] = "small",
    image: Annotated[str, typer.Option(help="The image's name")] = "debian-12",
    count: Annotated[int, typer.Option(min=1, max=100, help="How many VMs (all or none)")] = 1,
    key: Annotated[str | None, typer.Option(help="A key pair's name")] = None,
    zone: Annotated[str | None, typer.Option(help="The zone")] = None,
    user_data: Annotated[Path | None, typer.Option(help="A file of user data")] = None,
    hold: Annotated[bool, typer.Option("--hold", help="Create on hold, unplaced")] = False,
    url: Url = None,
    token: Token = None,
    as_json: Json = False,
    wait: Wait = False,
) -> None:
    """Create VMs (with --wait: until they run)."""

    def run() -> None:
        api = Api(url, token)
        body: dict[str, Any] = {"name": name, "flavor": flavor, "image": image, "count": count, "hold": hold}
        if key:
            body["key_name"] = key
        if zone:
            body["zone"] = zone
        if user_data:
            body["user_data"] = user_data.read_text()
        _submit(api, wait, as_json, lambda: api.call("POST", "/api/v1/servers", body))

    _run(run)


@server_cli.command("action")
def server_action(
    server_id: str,
    action: Annotated[str, typer.Argument(help="start, stop, reboot, suspend, resume, release, resize, ...")],
    flavor: Annotated[str | None, typer.Option(help="resize: the new flavor")] = None,
    url: Url = None,
    token: Token = None,
    as_json: Json = False,
    wait: Wait = False,
) -> None:
    """Run an action on a VM (with --wait: until its job has finished)."""

    def run() -> None:
        api = Api(url, token)
        body: dict[str, Any] = {"action": action, **({"flavor": flavor} if flavor else {})}

        def send() -> Any:
            return {**api.call("POST", f"/api/v1/servers/{server_id}/actions", body), "server_id": server_id}

        _submit(api, wait, as_json, send)

    _run(run)


@server_cli.command("delete")
def server_delete(
    server_id: str, url: Url = None, token: Token = None, as_json: Json = False, wait: Wait = False
) -> None:
    """Destroy a VM (with --wait: until it is gone)."""

    def run() -> None:
        api = Api(url, token)

        def send() -> Any:
            return {**api.call("DELETE", f"/api/v1/servers/{server_id}"), "server_id": server_id}

        _submit(api, wait, as_json, send)

    _run(run)


@server_cli.command("events")
def server_events(server_id: str, url: Url = None, token: Token = None, as_json: Json = False) -> None:
    """A VM's history, oldest first."""

    def run() -> None:
        events = Api(url, token).pages(f"/api/v1/servers/{server_id}/events")
        table = Table(title=f"events of {server_id}")
        for column in ("when", "kind", "action", "from", "to", "message"):
            table.add_column(column)
        for e in events:
            table.add_row(
                e["created_at"][:19],
                e["kind"],
                e["action"] or "",
                e["operstate_from"] or "",
                e["operstate_to"] or "",
                e["message"],
            )
        _out(as_json, events, table)

    _run(run)


# -- flavors, quotas, leases, the stream ------------------------------------------------------


@flavor_cli.command("list")
def flavor_list(url: Url = None, token: Token = None, as_json: Json = False) -> None:
    """Flavors, and how many more of each the hosts take now."""

    def run() -> None:
        flavors = Api(url, token).pages("/api/v1/flavors")
        table = Table(title="flavors")
        for column in ("name", "vCPUs", "RAM (MiB)", "disk (GB)", "more fit now"):
            table.add_column(column, justify="left" if column == "name" else "right")
        for f in flavors:
            table.add_row(f["name"], str(f["vcpus"]), str(f["ram_mb"]), str(f["disk_gb"]), str(f["capacity"]))
        _out(as_json, flavors, table)

    _run(run)


def _bar(used: int, limit: int, width: int = 20) -> str:
    if limit <= 0:
        return ""
    filled = min(width, round(width * used / limit))
    return "#" * filled + "." * (width - filled)


@quota_cli.command("show")
def quota_show(url: Url = None, token: Token = None, as_json: Json = False) -> None:
    """Limits, usage and pending reservations, with bars."""

    def run() -> None:
        quotas = Api(url, token).call("GET", "/api/v1/quotas")
        table = Table(title="quotas")
        for column in ("resource", "usage", "pending", "limit", ""):
            table.add_column(column, justify="left" if column in ("resource", "") else "right")
        for r, q in quotas.items():
            table.add_row(
                r, str(q["usage"]), str(q["pending"]), str(q["limit"]), _bar(q["usage"] + q["pending"], q["limit"])
            )
        _out(as_json, quotas, table)

    _run(run)


@quota_cli.command("check")
def quota_check(
    steps: Annotated[
        list[str],
        typer.Argument(help="Steps: create:FLAVOR[:COUNT], resize:SERVER:FLAVOR, or ACTION:SERVER (start:ID, ...)"),
    ],
    url: Url = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Would this plan pass now? (Nothing is done.) Exit 1 if a step would be refused."""

    def run() -> None:
        plan = []
        for text in steps:
            parts = text.split(":")
            if parts[0] == "create" and len(parts) in (2, 3):
                plan.append({"action": "create", "flavor": parts[1], "count": int(parts[2]) if len(parts) == 3 else 1})
            elif parts[0] == "resize" and len(parts) == 3:
                plan.append({"action": "resize", "server_id": parts[1], "flavor": parts[2]})
            elif len(parts) == 2:
                plan.append({"action": parts[0], "server_id": parts[1]})
            else:
                raise Refused(
                    f"a step is create:FLAVOR[:COUNT], resize:SERVER:FLAVOR or ACTION:SERVER, not {text!r}", 2
                )
        answer = Api(url, token).call("POST", "/api/v1/quotas/check", {"plan": plan})
        table = Table(title="would pass" if answer["ok"] else "would be refused")
        for column in ("step", "verdict"):
            table.add_column(column)
        for text, verdict in zip(steps, answer["steps"], strict=True):
            table.add_row(text, "ok" if verdict["ok"] else f"{verdict['code']}: {verdict['message']}")
        headroom = Table(title="headroom")
        for column in ("resource", "now", "after"):
            headroom.add_column(column, justify="left" if column == "resource" else "right")
        for r, q in answer["quotas"].items():
            headroom.add_row(r, str(q["headroom_before"]), str(q["headroom_after"]))
        if as_json:
            _out(True, answer)
        else:
            Console().print(table)
            Console().print(headroom)
        if not answer["ok"]:
            raise typer.Exit(1)

    _run(run)


@lease_cli.command("renew")
def lease_renew(server_id: str, url: Url = None, token: Token = None, as_json: Json = False) -> None:
    """Renew a VM's lease by the project's policy."""

    def run() -> None:
        lease = Api(url, token).call("POST", f"/api/v1/servers/{server_id}/lease", {})
        if as_json:
            _out(True, lease)
        else:
            typer.echo(f"lease of {server_id} now ends {lease['lease_expires_at']} (at most {lease['max_expires_at']})")

    _run(run)


@events_cli.command("tail")
def events_tail(
    server: Annotated[str | None, typer.Option(help="Only this VM's events")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="Only these kinds (repeatable)")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many events")] = None,
    since: Annotated[str | None, typer.Option(help="Resume after this event id (0-0: from the start)")] = None,
    url: Url = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Follow the live event stream (Ctrl-C ends it)."""

    def run() -> None:
        api = Api(url, token)
        params: dict[str, Any] = {"server_id": server, "kind": kind or None, "last_event_id": since}
        seen = 0
        with api.stream(**{k: v for k, v in params.items() if v is not None}) as events:
            for kind_, data in events:
                if as_json:
                    typer.echo(json.dumps(data, sort_keys=True))
                else:
                    who = data.get("server_id") or data.get("project_id", "")
                    change = f"{data.get('from') or ''}->{data.get('to')}" if data.get("to") else ""
                    what = " ".join(x for x in (data.get("action") or "", change, data.get("message") or "") if x)
                    typer.echo(f"{(data.get('at') or '')[:19]} {kind_:14} {who} {what}")
                seen += 1
                if count is not None and seen >= count:
                    return

    try:
        _run(run)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
