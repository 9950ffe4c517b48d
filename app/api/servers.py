"""/api/v1/servers: create, list, read, edit, act on and destroy VMs."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse

from app.api.deps import CommittingRoute, CurrentUser, Cursor, IdempotentDep, PageLimit, Since, StateDep, TxDep
from app.api.errors import responses
from app.api.schemas import (
    ActionBody,
    ConsoleOut,
    EventOut,
    FirewallChange,
    FirewallOpen,
    FirewallOut,
    FirewallRuleOut,
    JobAccepted,
    LiveMigrateAction,
    MigrateAction,
    Page,
    RebootAction,
    ResizeAction,
    SaveImageAction,
    ServerCreate,
    ServerOut,
    ServerPatch,
    ServersCreated,
)
from app.logic import actions, catalogue, events, firewall, firewall_rules, servers
from app.logic.operstate import Action, Operstate
from app.logic.pagination import DEFAULT_LIMIT
from app.models import Job

router = APIRouter(prefix="/api/v1/servers", tags=["servers"], route_class=CommittingRoute)


@router.post("", status_code=202, response_model=ServersCreated, responses=responses(400, 409, 413, 503))
async def create_server(body: ServerCreate, tx: TxDep, actor: CurrentUser, idem: IdempotentDep) -> JSONResponse:
    """Create one VM or `count` VMs (all or none); each gets a BUILD job unless held."""

    async def make() -> ServersCreated:
        created = await servers.create(tx.session, tx.outbox, actor=actor, spec=servers.CreateSpec(**body.model_dump()))
        labels = catalogue.Labels(  # known from the create: no reads
            flavors={c.server.flavor_id: c.flavor for c in created},
            images={c.server.image_id: c.image for c in created},
            addresses={c.server.id: c.addresses for c in created},
        )
        return ServersCreated(
            servers=[ServerOut.of(c.server, labels) for c in created],
            job_ids=[c.job.id for c in created if c.job is not None],
        )

    return await idem.run(202, make)


@router.get("", response_model=Page[ServerOut], responses=responses(400, 403))
async def list_servers(
    tx: TxDep,
    actor: CurrentUser,
    operstate: Operstate | None = None,
    name: str | None = None,
    zone: str | None = None,
    host: Annotated[str | None, Query(description="Admin only")] = None,
    user_id: uuid.UUID | None = None,
    changes_since: Since = None,
    all_projects: Annotated[bool, Query(description="Admin only: every project's servers")] = False,
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Page[ServerOut]:
    """List servers, oldest first; destroyed ones only with `operstate=DESTROYED`."""
    filters = servers.ListFilter(
        operstate=operstate,
        name=name,
        zone=zone,
        host=host,
        user_id=user_id,
        changes_since=changes_since,
        all_projects=all_projects,
    )
    page = await servers.list_servers(tx.session, actor=actor, filters=filters, limit=limit, cursor=cursor)
    labels = await catalogue.labels(tx.session, page.items)
    return Page(items=[ServerOut.of(s, labels) for s in page.items], next_cursor=page.next_cursor)


@router.get("/{server_id}", response_model=ServerOut, responses=responses(404))
async def get_server(server_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> ServerOut:
    """One server, destroyed ones included."""
    server = await servers.get(tx.session, actor=actor, server_id=server_id)
    return ServerOut.of(server, await catalogue.labels(tx.session, [server]))


@router.patch("/{server_id}", response_model=ServerOut, responses=responses(404, 409))
async def patch_server(server_id: uuid.UUID, body: ServerPatch, tx: TxDep, actor: CurrentUser) -> ServerOut:
    """Edit name, description or metadata (no job)."""
    server = await servers.update(tx.session, actor=actor, server_id=server_id, **body.model_dump())
    reply = ServerOut.of(server, await catalogue.labels(tx.session, [server]))
    return reply


@router.delete("/{server_id}", status_code=202, response_model=JobAccepted, responses=responses(404, 409))
async def delete_server(server_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> JobAccepted:
    """Destroy the server (overtakes any pending task); a destroyed one answers with its destroy job."""
    job = await actions.destroy(tx.session, tx.outbox, actor=actor, server_id=server_id)
    return JobAccepted(job_id=job.id if job is not None else None)


@router.post(
    "/{server_id}/actions",
    status_code=202,
    responses={
        **responses(400, 403, 404, 409, 413, 503),
        202: {"model": JobAccepted, "description": "The action's job was accepted"},
        200: {"model": ConsoleOut, "description": "console: VNC connection details"},
    },
)
async def server_action(
    server_id: uuid.UUID,
    body: Annotated[ActionBody, Body()],
    tx: TxDep,
    actor: CurrentUser,
    idem: IdempotentDep,
    state: StateDep,
) -> JSONResponse:
    """Run a lifecycle action; 202 with its job, or 200 with VNC details for `console`."""
    s, o, sid = tx.session, tx.outbox, server_id
    if body.action == "console":

        async def console() -> ConsoleOut:
            c = await actions.console(s, o, actor=actor, server_id=sid, cipher=state.cipher)
            return ConsoleOut(host=c.host, port=c.port, password=c.password, url=c.url, job_id=c.job.id)

        return await idem.run(200, console)

    async def act() -> JobAccepted:
        job: Job | None
        if isinstance(body, RebootAction):
            job = await actions.reboot(s, o, actor=actor, server_id=sid, hard=body.hard)
        elif isinstance(body, ResizeAction):
            job = await actions.resize(s, o, actor=actor, server_id=sid, flavor_id=body.flavor_id, flavor=body.flavor)
        elif isinstance(body, MigrateAction):
            job = await actions.migrate(
                s, o, actor=actor, server_id=sid, host=body.host, live=isinstance(body, LiveMigrateAction)
            )
        elif isinstance(body, SaveImageAction):
            job = await actions.save_image(s, o, actor=actor, server_id=sid, image_name=body.image_name)
        else:
            job = await actions.run(Action(body.action), s, o, actor=actor, server_id=sid)
        return JobAccepted(job_id=job.id if job is not None else None)

    return await idem.run(202, act)


@router.get("/{server_id}/firewall", response_model=FirewallOut, responses=responses(404))
async def get_firewall(server_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> FirewallOut:
    """What the VM's firewall lets in (everything else inbound is dropped; outbound is open):
    its opened ports, then its security groups' rules."""
    await servers.get(tx.session, actor=actor, server_id=server_id)
    rules = await firewall_rules.effective(tx.session, server_id)
    return FirewallOut(rules=[FirewallRuleOut.model_validate(asdict(r)) for r in rules])


@router.post("/{server_id}/firewall", status_code=202, response_model=JobAccepted, responses=responses(400, 404, 409))
async def change_firewall(
    server_id: uuid.UUID,
    body: Annotated[FirewallChange, Body()],
    tx: TxDep,
    actor: CurrentUser,
    idem: IdempotentDep,
) -> JSONResponse:
    """Open or close a port (`{"open": {"protocol", "port", "cidr"}}` or `{"close": ...}`); the
    VM's whole rule set then goes to its host in a `firewall` job (null for a VM not on a host
    yet: its create job carries the rules). The task lock applies: 409 `TaskPending`."""
    op, spec = ("open", body.open) if isinstance(body, FirewallOpen) else ("close", body.close)

    async def change() -> JobAccepted:
        job = await firewall.change(
            tx.session,
            tx.outbox,
            actor=actor,
            server_id=server_id,
            op=op,  # type: ignore[arg-type]
            protocol=spec.protocol,
            port=spec.port,
            cidr=spec.cidr,
        )
        return JobAccepted(job_id=job.id if job is not None else None)

    return await idem.run(202, change)


@router.get("/{server_id}/events", response_model=Page[EventOut], responses=responses(400, 404))
async def server_events(
    server_id: uuid.UUID, tx: TxDep, actor: CurrentUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[EventOut]:
    """The server's history, oldest first: actions, job outcomes, out-of-band changes."""
    await servers.get(tx.session, actor=actor, server_id=server_id)
    page = await events.list_for(tx.session, server_id, limit=limit, cursor=cursor)
    return Page(items=[EventOut.model_validate(e) for e in page.items], next_cursor=page.next_cursor)
