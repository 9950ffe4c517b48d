"""Sending mail through the operator's SMTP server (``NEPHOS_SMTP_*``), with aiosmtplib."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib

from app.settings import Settings


class MailError(Exception):
    """The mail server could not be reached or refused the message."""


def configured(settings: Settings) -> bool:
    return bool(settings.smtp_host)


def message(settings: Settings, *, to: str, subject: str, body: str, message_id: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = settings.smtp_from, to, subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    if message_id:
        msg["Message-ID"] = message_id
    msg.set_content(body)
    return msg


async def send(settings: Settings, msg: EmailMessage) -> None:
    """Hand one message to the mail server; ``MailError`` when it cannot be."""
    if not settings.smtp_host:
        raise MailError("no mail server is set (NEPHOS_SMTP_HOST)")
    try:
        await aiosmtplib.send(
            msg,
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_user,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            use_tls=settings.smtp_tls == "tls",
            start_tls=True if settings.smtp_tls == "starttls" else False,
            timeout=settings.smtp_timeout,
        )
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise MailError(f"{type(exc).__name__}: {exc}") from exc
