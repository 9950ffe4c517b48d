"""Domain errors, each with a stable code.

``app/api/errors.py`` maps them to HTTP statuses, the EC2 facade to EC2 codes.
An expected refusal is one of these; anything else is a bug and becomes a 500.
"""

from __future__ import annotations

from typing import Any


class NephosError(Exception):
    code = "Error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(NephosError):
    code = "BadRequest"


class Unauthorized(NephosError):
    code = "Unauthorized"


class Forbidden(NephosError):
    code = "Forbidden"


class NotFound(NephosError):
    code = "NotFound"


class AlreadyExists(NephosError):
    code = "AlreadyExists"


class TaskPending(NephosError):
    code = "TaskPending"


class InvalidState(NephosError):
    code = "InvalidState"


class IdempotencyConflict(NephosError):
    code = "IdempotencyConflict"


class OverLimit(NephosError):
    code = "OverLimit"


class NoCapacity(NephosError):
    code = "NoCapacity"


class HostDown(NephosError):
    code = "HostDown"


class InUse(NephosError):
    """The thing is still used by another (a security group by a VM or by another group's rule)."""

    code = "InUse"


class Protected(NephosError):
    """The VM's termination or stop protection is on."""

    code = "Protected"


class Unavailable(NephosError):
    """A part of the cloud this request needs cannot be reached now; retry later."""

    code = "Unavailable"
