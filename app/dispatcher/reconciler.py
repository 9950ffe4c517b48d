"""Running reconciliation: compare, then (with ``fix``) repair each finding in its own transaction."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.logic import reconcile


async def run(sessions: async_sessionmaker[AsyncSession], *, fix: bool, fresh_since: datetime | None = None
              ) -> reconcile.Report:
    async with sessions() as session:
        report = await reconcile.compare(session, fresh_since=fresh_since)
    if not fix:
        return report
    for kind in reconcile.FIXABLE:
        for entry in getattr(report, kind):
            async with sessions() as session:
                report.actions += await reconcile.fix_entry(session, kind, entry)
                await session.commit()
    async with sessions() as session:
        report.actions += await reconcile.fix_usage(session)
        await session.commit()
    report.fixed = True
    return report
