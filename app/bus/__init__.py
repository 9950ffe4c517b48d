"""The message bus: one contract, two transports (RabbitMQ for production, memory for ``up``).

Contract, honoured by both:

* ``publish_job(host, body)`` puts a job on that host's durable queue and returns once the
  broker has confirmed it; ``publish_result(body)`` does the same for the shared results queue.
* ``consume_jobs(host, handler)`` / ``consume_results(handler)`` run ``handler(body)`` for each
  message, several at once (up to ``prefetch``). The message is acknowledged only after the
  handler returns, so a crash before then means redelivery: handlers must be idempotent.
* A handler that raises is retried with exponential backoff; after ``max_attempts`` the message
  is dead-lettered. A handler that raises ``Poison`` (malformed, can never succeed) dead-letters
  it at once. Either way the queue keeps moving and nothing is dropped silently.
"""

from __future__ import annotations

from app.bus.base import Bus, Handler, Poison
from app.settings import Settings


def make_bus(settings: Settings) -> Bus:
    if settings.amqp_url.startswith("memory://"):
        from app.bus.memory import MemoryBus

        return MemoryBus()
    from app.bus.amqp import AmqpBus

    return AmqpBus(
        settings.amqp_url, prefix=settings.amqp_prefix, prefetch=settings.amqp_prefetch, quorum=settings.amqp_quorum
    )


__all__ = ["Bus", "Handler", "Poison", "make_bus"]
