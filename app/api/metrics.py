"""/metrics: Prometheus gauges of the drift report and the hosts, read from the database at scrape."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from app.api.deps import CommittingRoute, StateDep
from app.logic import catalogue, reconcile

router = APIRouter(tags=["health"], route_class=CommittingRoute)


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format; no token (scrapers), nothing secret in it."""
    registry = CollectorRegistry()
    findings = Gauge(
        "nephos_drift_findings", "Findings of the last reconciliation pass, per kind", ["kind"], registry=registry
    )
    last_pass = Gauge(
        "nephos_drift_last_pass_timestamp_seconds", "When the last reconciliation pass started", registry=registry
    )
    duration = Gauge("nephos_drift_last_pass_duration_seconds", "How long it took", registry=registry)
    unreachable = Gauge(
        "nephos_drift_unreachable_hosts", "Hosts it could not judge (no fresh inventory)", registry=registry
    )
    hosts_up = Gauge("nephos_hosts_up", "Hosts whose agent is alive", registry=registry)
    async with state.sessions() as session:
        last = await reconcile.latest(session)
        hosts_up.set(await catalogue.hosts_up(session))
    for kind in reconcile.Report.KINDS:
        findings.labels(kind=kind).set(last.counts.get(kind, 0) if last else 0)
    if last is not None:
        last_pass.set(last.started_at.timestamp())
        duration.set(last.duration_s)
        unreachable.set(len(last.report.get("unreachable_hosts", [])))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
