"""The lease sweeper's outward half: mail digests and webhook deliveries.

It runs beside the lease pass, never inside it: a mail server that is away or a webhook
receiver that hangs delays only its own mails or its own project's deliveries. Rows are
claimed (``logic.notifications.claim``, ``logic.webhooks.claim``) and the claim committed before
any network call, so no row lock is held while talking to the outside, and two dispatchers
never send the same thing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable

import httpx
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import mail
from app.dispatcher.pace import Pace
from app.logic import notifications, webhooks
from app.settings import Settings

log = logging.getLogger("nephos.notifier")


class Notifier:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        cipher: Callable[[], Fernet],
        pace: Pace | None = None,
    ) -> None:
        self.sessions, self.settings, self._cipher = sessions, settings, cipher
        self.pace = pace or Pace()

    # -- mail ----------------------------------------------------------------------------------

    async def mail_once(self) -> int:
        """Mail every due notification, one digest per user; returns how many were mailed."""
        if not mail.configured(self.settings):
            return 0  # recorded, waiting for a mail server to be set
        hold = self.settings.smtp_timeout * 3 + 30
        async with self.sessions() as session:
            digests = await notifications.claim(session, hold=hold)
            await session.commit()
        mailed = 0
        for digest in digests:
            if not digest.email:
                async with self.sessions() as session:
                    await notifications.sent(session, digest.ids, error="the user has no email address: not mailed")
                    await session.commit()
                continue
            subject, body = notifications.compose(digest, api_url=self.settings.public_api_url)
            message_id = f"<{uuid.uuid5(uuid.NAMESPACE_URL, ','.join(map(str, sorted(digest.ids))))}@nephos>"
            msg = mail.message(self.settings, to=digest.email, subject=subject, body=body, message_id=message_id)
            try:
                await mail.send(self.settings, msg)
            except mail.MailError as exc:
                log.warning("mail to %s not sent, will retry: %s", digest.email, exc)
                async with self.sessions() as session:
                    await notifications.failed(session, digest.ids, error=str(exc), retry=self.settings.notify_retry)
                    await session.commit()
                continue
            async with self.sessions() as session:
                await notifications.sent(session, digest.ids)
                await session.commit()
            mailed += len(digest.ids)
        return mailed

    # -- webhooks ------------------------------------------------------------------------------

    async def hooks_once(self) -> int:
        """Deliver every project's due webhook events, projects side by side; returns how many
        were delivered."""
        hold = self.settings.webhook_timeout * 100 + 30
        async with self.sessions() as session:
            projects = await webhooks.claim(session, hold=hold)
            await session.commit()
        if not projects:
            return 0
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout) as client:
            counts = await asyncio.gather(*(self._deliver(client, project) for project in projects))
        return sum(counts)

    async def _deliver(self, client: httpx.AsyncClient, project_id: uuid.UUID) -> int:
        async with self.sessions() as session:
            url, secret, pending = await webhooks.due(session, project_id, self._cipher())
        done: list[uuid.UUID] = []
        failure: tuple[uuid.UUID, str] | None = None
        for delivery in pending:
            body = json.dumps(delivery.body, separators=(",", ":"), sort_keys=True).encode()
            headers = {
                "Content-Type": "application/json",
                "Nephos-Signature": webhooks.sign(secret, body),
                "Nephos-Delivery": str(delivery.id),
                "Nephos-Event": delivery.kind,
                "User-Agent": "Nephos-Webhook/1",
            }
            try:
                r = await client.post(url, content=body, headers=headers)
                error = "" if 200 <= r.status_code < 300 else f"the receiver answered {r.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error:
                failure = (delivery.id, error)
                break
            done.append(delivery.id)
        async with self.sessions() as session:
            await webhooks.delivered(session, project_id, done)
            if failure is not None:
                disabled = await webhooks.failed(
                    session,
                    project_id,
                    failure[0],
                    error=failure[1],
                    retry=self.settings.notify_retry,
                    max_failures=self.settings.webhook_max_failures,
                )
                if disabled is not None:
                    await notifications.tell_project(
                        session,
                        project_id,
                        notifications.Kind.WEBHOOK_DISABLED,
                        {"message": disabled},
                    )
                    log.warning("webhook of project %s disabled: %s", project_id, failure[1])
                else:
                    log.info("webhook of project %s failed, will retry: %s", project_id, failure[1])
            await session.commit()
        return len(done)

    async def run(self, interval: float) -> None:
        """Mail and webhooks, side by side, until the process stops."""
        await asyncio.gather(
            self.pace.every(interval, self.mail_once, "mail"), self.pace.every(interval, self.hooks_once, "webhook")
        )
