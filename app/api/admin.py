"""/api/v1/admin: projects and quotas, users and tokens, hosts, flavors, images."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from app import mail
from app.api.deps import AdminUser, AppState, CommittingRoute, Cursor, IdempotentDep, PageLimit, StateDep, TxDep
from app.api.errors import responses
from app.api.schemas import (
    CapacityItem,
    CapacityOut,
    DomainAdopt,
    DomainDestroyed,
    DriftOut,
    FlavorCreate,
    FlavorOut,
    HostCreate,
    HostOut,
    HostPatch,
    ImageCreate,
    ImageOut,
    NotifyTestIn,
    NotifyTestOut,
    Page,
    ProjectCreate,
    ProjectOut,
    ProjectPatch,
    QuotasOut,
    ReconcileReport,
    ReconcileRequest,
    ServerOut,
    UserCreate,
    UserOut,
)
from app.bus import Bus
from app.dispatcher import reconciler
from app.logic import accounts, catalogue, domains, placement, quotas
from app.logic import reconcile as reconcile_logic
from app.logic.errors import BadRequest, Unavailable
from app.logic.pagination import DEFAULT_LIMIT
from app.messages import MARK, Action
from app.models import Project

router = APIRouter(prefix="/api/v1/admin", tags=["admin"], route_class=CommittingRoute)
ADMIN = responses(400, 403)


async def _project(session: AsyncSession, project: Project) -> ProjectOut:
    report = QuotasOut.model_validate(await quotas.report(session, project.id))
    return ProjectOut(
        id=project.id,
        name=project.name,
        created_at=project.created_at,
        quotas=report,
        purged_servers=project.purged_servers,
    )


@router.post("/projects", status_code=201, response_model=ProjectOut, responses=responses(400, 403, 409))
async def create_project(body: ProjectCreate, tx: TxDep, actor: AdminUser, idem: IdempotentDep) -> JSONResponse:
    """A project with quota limits (defaults for the resources not given)."""

    async def make() -> ProjectOut:
        project = await accounts.create_project(tx.session, actor=actor, name=body.name, limits=body.quotas.limits())
        return await _project(tx.session, project)

    return await idem.run(201, make)


@router.get("/projects", response_model=Page[ProjectOut], responses=ADMIN)
async def list_projects(
    tx: TxDep, actor: AdminUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[ProjectOut]:
    """Every project with its quotas."""
    page = await accounts.list_projects(tx.session, actor=actor, limit=limit, cursor=cursor)
    return Page(items=[await _project(tx.session, p) for p in page.items], next_cursor=page.next_cursor)


@router.get("/projects/{project_id}", response_model=ProjectOut, responses=responses(403, 404))
async def get_project(project_id: uuid.UUID, tx: TxDep, actor: AdminUser) -> ProjectOut:
    """One project with its quotas."""
    return await _project(tx.session, await accounts.get_project(tx.session, actor=actor, project_id=project_id))


@router.patch("/projects/{project_id}", response_model=ProjectOut, responses=responses(400, 403, 404))
async def patch_project(project_id: uuid.UUID, body: ProjectPatch, tx: TxDep, actor: AdminUser) -> ProjectOut:
    """Rename a project or change some of its quota limits."""
    project = await accounts.update_project(
        tx.session,
        actor=actor,
        project_id=project_id,
        name=body.name,
        limits=body.quotas.limits() if body.quotas else None,
    )
    reply = await _project(tx.session, project)
    return reply


@router.post("/users", status_code=201, response_model=UserOut, responses=responses(400, 403, 409))
async def create_user(body: UserCreate, tx: TxDep, actor: AdminUser, idem: IdempotentDep) -> JSONResponse:
    """A user in a project; the reply carries its bearer token, shown this once."""

    async def make() -> UserOut:
        made = await accounts.create_user(tx.session, actor=actor, **body.model_dump())
        return UserOut.model_validate({**UserOut.model_validate(made.user).model_dump(), "token": made.token})

    return await idem.run(201, make)


@router.get("/users", response_model=Page[UserOut], responses=ADMIN)
async def list_users(
    tx: TxDep, actor: AdminUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[UserOut]:
    """Every user (tokens are never shown again)."""
    page = await accounts.list_users(tx.session, actor=actor, limit=limit, cursor=cursor)
    return Page(items=[UserOut.model_validate(u) for u in page.items], next_cursor=page.next_cursor)


@router.get("/hosts", response_model=Page[HostOut], responses=ADMIN)
async def list_hosts(
    tx: TxDep, actor: AdminUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[HostOut]:
    """Hypervisor hosts with capacity, usage, state and last heartbeat."""
    page = await catalogue.list_hosts(tx.session, actor=actor, limit=limit, cursor=cursor)
    return Page(items=[HostOut.model_validate(h) for h in page.items], next_cursor=page.next_cursor)


@router.post("/hosts", status_code=201, response_model=HostOut, responses=ADMIN)
async def register_host(body: HostCreate, tx: TxDep, actor: AdminUser) -> HostOut:
    """Register a host (or update its capacity); agents do this with their first heartbeat."""
    host = await catalogue.register_host(tx.session, actor=actor, **body.model_dump())
    return HostOut.model_validate(host)


@router.patch("/hosts/{name}", response_model=HostOut, responses=responses(400, 403, 404))
async def patch_host(name: str, body: HostPatch, tx: TxDep, actor: AdminUser) -> HostOut:
    """Disable a host (no new VMs placed on it) or bring it back up."""
    host = await catalogue.set_host_state(tx.session, actor=actor, name=name, state=body.state)
    return HostOut.model_validate(host)


@router.post("/flavors", status_code=201, response_model=FlavorOut, responses=responses(400, 403, 409))
async def create_flavor(body: FlavorCreate, tx: TxDep, actor: AdminUser, idem: IdempotentDep) -> JSONResponse:
    """A new flavor."""

    async def make() -> FlavorOut:
        flavor = await catalogue.create_flavor(tx.session, actor=actor, **body.model_dump())
        room = await placement.capacity(tx.session, [flavor])
        return FlavorOut(
            id=flavor.id,
            name=flavor.name,
            vcpus=flavor.vcpus,
            ram_mb=flavor.ram_mb,
            disk_gb=flavor.disk_gb,
            capacity=room[flavor.id],
        )

    return await idem.run(201, make)


@router.post("/images", status_code=201, response_model=ImageOut, responses=ADMIN)
async def create_image(body: ImageCreate, tx: TxDep, actor: AdminUser, idem: IdempotentDep) -> JSONResponse:
    """Register an image (public, or private to the admin's project)."""

    async def make() -> ImageOut:
        return ImageOut.model_validate(await catalogue.create_image(tx.session, actor=actor, **body.model_dump()))

    return await idem.run(201, make)


@router.post("/reconcile", response_model=ReconcileReport, responses=ADMIN)
async def reconcile(body: ReconcileRequest, state: StateDep, tx: TxDep, _: AdminUser) -> ReconcileReport:
    """Compare the database with every host's fresh inventory and quotas with the VMs; fix on request."""
    # This request's own transaction (it only authenticated the caller) ends here, writing
    # nothing: the work below runs its own, and on SQLite an open transaction would hold the
    # write lock throughout.
    await tx.session.rollback()
    if state.bus is not None:
        report = await reconciler.fresh(state.sessions, state.bus, fix=body.fix, wait=body.wait, publish=state.publish)
    else:  # no bus (tests of the API alone): the inventories the hosts last sent
        report = await reconciler.run(state.sessions, fix=body.fix, publish=state.publish)
    return ReconcileReport.model_validate(report, from_attributes=True)


def _bus(state: AppState) -> Bus:
    if state.bus is None:
        raise Unavailable("no message bus is attached to this API process: hosts cannot be reached")
    return state.bus


@router.post(
    "/hosts/{host}/domains/{domain_uuid}/destroy",
    status_code=202,
    response_model=DomainDestroyed,
    responses=responses(403, 404, 409, 503),
)
async def destroy_domain(
    host: str, domain_uuid: uuid.UUID, state: StateDep, tx: TxDep, actor: AdminUser
) -> DomainDestroyed:
    """Destroy a domain no VM owns (reconciliation's orphan), named by host and UUID; foreign ones too."""
    seen = await domains.for_destroy(tx.session, actor=actor, host=host, domain_uuid=domain_uuid)
    bus = _bus(state)
    tx.later(lambda: reconciler.send_untracked(bus, host, domain_uuid, Action.DESTROY))
    return DomainDestroyed(
        host=host, domain_uuid=domain_uuid, domain_name=seen.get("name", ""), owned=bool(seen.get("owned"))
    )


@router.post(
    "/hosts/{host}/domains/{domain_uuid}/adopt",
    status_code=201,
    response_model=ServerOut,
    responses=responses(400, 403, 404, 409, 413, 503),
)
async def adopt_domain(
    host: str, domain_uuid: uuid.UUID, body: DomainAdopt, state: StateDep, tx: TxDep, actor: AdminUser
) -> ServerOut:
    """Make a domain no VM owns a VM of a project (its UUID becomes the server's id); it gets Nephos's mark."""
    bus = _bus(state)
    server = await domains.adopt(tx.session, actor=actor, host=host, domain_uuid=domain_uuid, **body.model_dump())
    tx.later(lambda: reconciler.send_untracked(bus, host, domain_uuid, MARK))  # once the VM row is committed
    return ServerOut.of(server, await catalogue.labels(tx.session, [server]))


@router.get("/drift", response_model=DriftOut, responses=ADMIN)
async def drift(tx: TxDep, _: AdminUser) -> DriftOut:
    """The last periodic reconciliation pass: when, how long, what it found and what it fixed."""
    last = await reconcile_logic.latest(tx.session)
    if last is None:
        return DriftOut(started_at=None, duration_s=None, fixed=False, counts={}, report={})
    return DriftOut(
        started_at=last.started_at, duration_s=last.duration_s, fixed=last.fixed, counts=last.counts, report=last.report
    )


@router.get("/capacity", response_model=CapacityOut, responses=ADMIN)
async def capacity(tx: TxDep, _: AdminUser) -> CapacityOut:
    """Per flavor and zone: how many more VMs fit on the up hosts now, and how many would fit
    were those hosts empty."""
    flavors = await catalogue.all_flavors(tx.session)
    return CapacityOut(
        items=[
            CapacityItem(flavor=f.flavor.name, zone=f.zone, fit_now=f.now, fit_empty=f.empty, hosts_up=f.hosts_up)
            for f in await placement.fits(tx.session, flavors)
        ]
    )


@router.post("/notify-test", response_model=NotifyTestOut, responses=responses(400, 403, 503))
async def notify_test(body: NotifyTestIn, state: StateDep, tx: TxDep, actor: AdminUser) -> NotifyTestOut:
    """Send a test mail through the configured mail server (to ``to``, or the caller): 400 when
    no mail server is set, 503 ``Unavailable`` with the server's complaint when it refuses."""
    to = body.to or await accounts.email_of(tx.session, actor)
    if not to:
        raise BadRequest("the caller has no email address: name one in to", field="to")
    settings = state.settings
    if not mail.configured(settings):
        raise BadRequest("no mail server is set (NEPHOS_SMTP_HOST): nothing can be sent", field="NEPHOS_SMTP_HOST")
    msg = mail.message(
        settings,
        to=to,
        subject="[Nephos] test mail",
        body=f"This is a test mail from Nephos at {settings.public_api_url}.\nLease warnings will reach you.\n",
    )
    try:
        await mail.send(settings, msg)
    except mail.MailError as exc:
        raise Unavailable(f"the mail server did not take the mail: {exc}") from None
    return NotifyTestOut(sent=True, to=to, server=f"{settings.smtp_host}:{settings.smtp_port}")
