"""``/ec2``: the EC2 Query API over the same logic layer as REST (EC2.md).

One endpoint (POST, and GET for old tools). Each request: hash the raw body, verify SigV4
against the caller's EC2 credential, then run the action in one transaction as that user --
with REST's project isolation -- and publish its jobs after the commit. ``DryRun`` runs the
action and rolls it back: it answers ``DryRunOperation`` exactly when the action would have
been accepted, with no side effect. A domain error becomes its EC2 code (``errors``); anything
unexpected is logged and answered as a generic ``InternalError``, never a traceback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.deps import AppState, Tx
from app.api.ec2 import sigv4
from app.api.ec2.params import PARAMETERS
from app.api.ec2.protocol import Ec2Error, Params, invalid, render, render_error, version_of
from app.api.retry import RETRY_HEADER
from app.db import database_unavailable, retriable
from app.logic import accounts, ec2
from app.logic import errors as e
from app.logic.actor import Actor
from app.logic.jobs import Outbox

log = logging.getLogger("nephos.ec2")
router = APIRouter(tags=["ec2"])

_AUTH_PARAMS = {
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Amz-Expires",
}


@dataclass
class Ctx:
    """One EC2 request: its transaction, caller and settings."""

    session: AsyncSession
    outbox: Outbox
    actor: Actor
    state: AppState
    params: Params
    dry_run: bool

    @property
    def project_id(self) -> uuid.UUID:
        assert self.actor.project_id is not None
        return self.actor.project_id


Handler = Callable[[Ctx], Awaitable[dict[str, Any]]]
ACTIONS: dict[str, Handler] = {}


def action(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        ACTIONS[name] = fn
        return fn

    return register


#: Domain errors as EC2 codes (instance-specific NotFound is raised by the handlers themselves).
CODES: dict[type[e.NephosError], tuple[str, int]] = {
    e.BadRequest: ("InvalidParameterValue", 400),
    e.Unauthorized: ("AuthFailure", 401),
    e.Forbidden: ("UnauthorizedOperation", 403),
    e.NotFound: ("InvalidParameterValue", 400),
    e.AlreadyExists: ("InvalidParameterValue", 400),
    e.TaskPending: ("IncorrectInstanceState", 400),
    e.InvalidState: ("IncorrectInstanceState", 400),
    e.HostDown: ("IncorrectInstanceState", 400),
    e.Protected: ("OperationNotPermitted", 400),
    e.InUse: ("DependencyViolation", 400),
    e.AddressInUse: ("InvalidIPAddress.InUse", 400),
    e.IdempotencyConflict: ("IdempotentParameterMismatch", 400),
    e.OverLimit: ("InstanceLimitExceeded", 400),
    e.NoCapacity: ("InsufficientInstanceCapacity", 500),
    e.NetworkFull: ("InsufficientFreeAddressesInSubnet", 400),
    e.Unavailable: ("Unavailable", 503),
}


def _instances_not_found(ids: list[str]) -> Ec2Error:
    quoted = ", ".join(f"'{i}'" for i in ids)
    many = len(ids) > 1
    return Ec2Error(
        "InvalidInstanceID.NotFound",
        f"The instance ID{'s' if many else ''} {quoted} do{'' if many else 'es'} not exist",
    )


#: Names that did not resolve, in EC2's words: each builds its error from the details.
WORDED: dict[type[e.NephosError], Callable[[dict[str, Any]], Ec2Error]] = {
    e.UnknownInstances: lambda d: _instances_not_found(d["ids"]),
    e.UnknownImage: lambda d: Ec2Error(
        "InvalidAMIID.NotFound", f"The image id '[{', '.join(d['ids'])}]' does not exist"
    ),
    e.ImageUnavailable: lambda d: Ec2Error(
        "InvalidAMIID.Unavailable", f"The image id '[{d['ids'][0]}]' is {d['state']}"
    ),
    e.UnknownFlavor: lambda d: invalid("InstanceType", ", ".join(d["names"]), "No such instance type."),
    e.UnknownKeyPair: lambda d: Ec2Error("InvalidKeyPair.NotFound", f"The key pair '{d['name']}' does not exist"),
    e.UnknownZone: lambda d: invalid("Placement.AvailabilityZone", d["name"], "No such availability zone."),
    e.UnknownFilter: lambda d: invalid("Filter.Name", d["name"], "Unsupported filter name."),
    e.UnknownSubnet: lambda d: Ec2Error("InvalidSubnetID.NotFound", f"The subnet ID '{d['ids'][0]}' does not exist"),
}


def well_formed_ids(ids: list[str], prefix: str, code: str) -> list[str]:
    """``ids`` as given, each of the ``prefix-`` form (else ``code``, a ``*.Malformed``)."""
    for i in ids:
        if not ec2.well_formed(i, prefix):
            raise Ec2Error(code, f'Invalid id: "{i}"')
    return ids


def ec2_error(exc: e.NephosError) -> Ec2Error:
    worded = WORDED.get(type(exc))
    if worded is not None:
        return worded(exc.details)
    if isinstance(exc, e.UnknownGroup):
        return Ec2Error("InvalidGroup.NotFound", exc.message)
    code, status = CODES.get(type(exc), ("InvalidParameterValue", 400))
    if isinstance(exc, e.OverLimit) and exc.details.get("resource") in ("cpu", "active_cpu"):
        code = "VcpuLimitExceeded"
    if isinstance(exc, e.OverLimit) and exc.details.get("resource") == "public_ip":
        code = "AddressLimitExceeded"
    return Ec2Error(code, exc.message, status)


@router.api_route("/ec2", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/ec2/", methods=["GET", "POST"], include_in_schema=False)
async def ec2_endpoint(request: Request) -> Response:
    request_id = str(uuid.uuid4())
    state: AppState = request.app.state.nephos
    body = await request.body()  # the raw bytes, hashed for the signature before any parsing
    query = request.url.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if request.method == "POST":
        try:
            pairs += parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            return _error(Ec2Error("InvalidParameterValue", "The request body is not UTF-8"), request_id)
    values = {k: v for k, v in pairs if k not in _AUTH_PARAMS}
    if any("\x00" in k or "\x00" in v for k, v in values.items()):
        return _error(Ec2Error("InvalidParameterValue", "Parameters must not contain NUL characters"), request_id)
    version = version_of(values.pop("Version", None))
    name = values.pop("Action", None)
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        signed = sigv4.parse(headers, dict(pairs))
        sigv4.check_time(signed)
        sigv4.check_region(signed, state.settings.ec2_region)
        if name is None:
            raise Ec2Error("MissingAction", "The request must contain the parameter Action")
        handler = ACTIONS.get(name)
        if handler is None:
            raise Ec2Error("InvalidAction", f"The action {name} is not valid for this web service.")
        async with state.sessions() as session:
            try:
                actor, secret = await accounts.ec2_secret(session, access_key=signed.access_key, cipher=state.cipher)
            except e.Unauthorized:
                raise sigv4.auth_failure() from None
            sigv4.verify(
                signed, secret, method=request.method, path=request.url.path, query=query, headers=headers, body=body
            )
            allowed = PARAMETERS.get(name, frozenset())
            unknown = sorted({key.split(".", 1)[0] for key in values} - allowed)
            if unknown:
                raise Ec2Error("UnknownParameter", f"The parameter {unknown[0][:64]} is not recognized")
            params = Params(values)
            dry_run = params.flag("DryRun")
            tx = Tx(session, Outbox(state.settings.job_deadline_seconds), state.publish)
            ctx = Ctx(session, tx.outbox, actor, state, params, dry_run)
            try:
                reply = await handler(ctx)
            except e.NephosError as exc:
                raise ec2_error(exc) from None
            if dry_run:  # every action, as on AWS: would it have been allowed?
                await session.rollback()
                tx.outbox.clear()
                raise Ec2Error("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
            await tx.commit()
    except Ec2Error as exc:
        return _error(exc, request_id)
    except Exception as exc:
        if retriable(exc):  # a lost race: the retry middleware runs the request again
            return _error(
                Ec2Error("Unavailable", "The request conflicted with concurrent ones; retry shortly", 503),
                request_id,
                {"Retry-After": "1", RETRY_HEADER.decode(): "1"},
            )
        if database_unavailable(exc):
            return _error(Ec2Error("Unavailable", "The service is unavailable; retry shortly", 503), request_id)
        log.exception("unexpected error in EC2 %s", name)
        return _error(Ec2Error("InternalError", "An internal error has occurred; it has been logged", 500), request_id)
    return Response(render(name, version, request_id, reply), media_type="text/xml;charset=UTF-8")


def _error(exc: Ec2Error, request_id: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        render_error(exc.code, exc.message, request_id),
        status_code=exc.status,
        media_type="text/xml;charset=UTF-8",
        headers=headers,
    )
