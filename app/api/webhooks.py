"""/api/v1/webhook: a project's webhook (events POSTed as signed JSON; ``logic.webhooks``)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import CommittingRoute, CurrentUser, StateDep, TxDep
from app.api.errors import responses
from app.api.schemas import WebhookIn, WebhookOut
from app.logic import webhooks
from app.models import Webhook

router = APIRouter(prefix="/api/v1", tags=["notifications"], route_class=CommittingRoute)

ProjectQuery = Annotated[uuid.UUID | None, Query(description="Admin: the project (default: the caller's)")]


async def _out(tx: TxDep, hook: Webhook) -> WebhookOut:
    return WebhookOut(
        project_id=hook.project_id,
        url=hook.url,
        enabled=hook.enabled,
        failures=hook.failures,
        disabled_reason=hook.disabled_reason,
        pending=await webhooks.pending_count(tx.session, hook.project_id),
        updated_at=hook.updated_at,
    )


@router.put("/webhook", response_model=WebhookOut, responses=responses(400, 403, 404))
async def put_webhook(
    body: WebhookIn, state: StateDep, tx: TxDep, actor: CurrentUser, project_id: ProjectQuery = None
) -> WebhookOut:
    """Set the project's webhook (replacing one); it starts enabled with no failures. Each
    delivery is signed: ``Nephos-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``."""
    hook = await webhooks.put(
        tx.session, actor=actor, project_id=project_id, url=body.url, secret=body.secret, cipher=state.cipher
    )
    return await _out(tx, hook)


@router.get("/webhook", response_model=WebhookOut, responses=responses(403, 404))
async def get_webhook(tx: TxDep, actor: CurrentUser, project_id: ProjectQuery = None) -> WebhookOut:
    """The project's webhook: its URL, whether it is enabled, failures in a row, deliveries
    waiting (the secret is never shown)."""
    return await _out(tx, await webhooks.get(tx.session, actor=actor, project_id=project_id))


@router.delete("/webhook", status_code=204, responses=responses(403, 404))
async def delete_webhook(tx: TxDep, actor: CurrentUser, project_id: ProjectQuery = None) -> Response:
    """Remove the project's webhook; deliveries still waiting are dropped."""
    await webhooks.delete(tx.session, actor=actor, project_id=project_id)
    return Response(status_code=204)
