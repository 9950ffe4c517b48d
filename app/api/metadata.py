"""/metadata: the EC2-compatible metadata service, answered to a host-side proxy
(``logic.metadata``). Its paths are the guest's (``/latest/meta-data/...``, ``/latest/user-data``,
``PUT /latest/api/token``) under ``/metadata``; the proxy adds ``X-Nephos-Proxy-Key``,
``X-Nephos-Network`` and ``X-Forwarded-For``. Answers are plain text, as EC2's are."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import PlainTextResponse

from app.api.deps import CommittingRoute, StateDep, TxDep
from app.logic import metadata
from app.models import Server

# Like /ec2, a wire format of its own (EC2's plain text, for proxies): not in the OpenAPI document.
router = APIRouter(prefix="/metadata", tags=["metadata"], route_class=CommittingRoute, include_in_schema=False)

ProxyKey = Annotated[str | None, Header(alias="X-Nephos-Proxy-Key", description="The proxy's shared key")]
Network = Annotated[str | None, Header(alias="X-Nephos-Network", description="The network the request came on")]
Forwarded = Annotated[str | None, Header(alias="X-Forwarded-For", description="The guest's address")]
Token = Annotated[str | None, Header(alias="X-aws-ec2-metadata-token", description="The IMDSv2 session token")]
Ttl = Annotated[str | None, Header(alias="X-aws-ec2-metadata-token-ttl-seconds", description="1 to 21600")]

_REFUSED = PlainTextResponse("", status_code=403)


def _source(network: str | None, forwarded: str | None) -> metadata.Source | None:
    if not network or not forwarded:
        return None
    try:
        return metadata.Source(uuid.UUID(network), forwarded.split(",")[0].strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class Asking:
    """The VM the proxy vouches for (None: not attributable) and the proxies' key."""

    server: Server | None
    secret: str


async def asking(
    tx: TxDep, state: StateDep, key: ProxyKey = None, network: Network = None, forwarded: Forwarded = None
) -> Asking:
    configured = state.settings.metadata_proxy_key
    secret = configured.get_secret_value() if configured else ""
    source = _source(network, forwarded)
    if not metadata.vouched(secret, key) or source is None:
        return Asking(None, secret)
    try:
        return Asking(await metadata.attribute(tx.session, source), secret)
    except metadata.Refused:
        return Asking(None, secret)


AskingDep = Annotated[Asking, Depends(asking)]


@router.put("/latest/api/token", response_class=PlainTextResponse, responses={400: {}, 403: {}})
async def session_token(who: AskingDep, ttl: Ttl = None) -> PlainTextResponse:
    """IMDSv2: a session token for the asking VM, valid ``ttl`` seconds (1 to 21600)."""
    if who.server is None:
        return _REFUSED
    try:
        seconds = int(ttl or "")
    except ValueError:
        seconds = 0
    if not 1 <= seconds <= metadata.MAX_TTL:
        return PlainTextResponse("X-aws-ec2-metadata-token-ttl-seconds must be 1 to 21600", status_code=400)
    token = metadata.token_for(who.secret, who.server.id, seconds)
    return PlainTextResponse(token, headers={"X-aws-ec2-metadata-token-ttl-seconds": str(seconds)})


async def _read(tx: TxDep, who: Asking, path: str, token: str | None) -> PlainTextResponse:
    if who.server is None:
        return _REFUSED
    try:
        metadata.check_token(who.secret, who.server.id, token)
    except metadata.Unauthorized:
        return PlainTextResponse("", status_code=401)
    if path == "user-data":
        data = who.server.user_data
        return PlainTextResponse(data) if data else PlainTextResponse("", status_code=404)
    value = (await metadata.document(tx.session, who.server)).read(path.removeprefix("meta-data"))
    return PlainTextResponse(value) if value is not None else PlainTextResponse("", status_code=404)


@router.get("/latest/user-data", response_class=PlainTextResponse, responses={401: {}, 403: {}, 404: {}})
async def user_data(tx: TxDep, who: AskingDep, token: Token = None) -> PlainTextResponse:
    """The VM's user data, as given at create."""
    return await _read(tx, who, "user-data", token)


@router.get("/latest/meta-data/{path:path}", response_class=PlainTextResponse, responses={401: {}, 403: {}, 404: {}})
async def meta_data(path: str, tx: TxDep, who: AskingDep, token: Token = None) -> PlainTextResponse:
    """A metadata path (``instance-id``, ``local-ipv4``, ``public-keys/0/openssh-key``, ...), or
    a directory's listing."""
    return await _read(tx, who, "meta-data/" + path, token)
