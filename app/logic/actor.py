"""Who is asking: every logic function takes the caller as ``actor``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from app.logic.errors import Forbidden


@dataclass(frozen=True)
class Actor:
    user_id: uuid.UUID | None
    project_id: uuid.UUID | None
    is_admin: bool = False

    def sees(self, project_id: uuid.UUID | None) -> bool:
        """Whether a resource of ``project_id`` is visible (others' are 404)."""
        return self.is_admin or project_id == self.project_id


#: The dispatcher, sweepers and reconciliation act as the system itself.
SYSTEM = Actor(user_id=None, project_id=None, is_admin=True)


def require_admin(actor: Actor) -> None:
    if not actor.is_admin:
        raise Forbidden("this needs the admin role")
