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


class NetworkFull(NephosError):
    """A network (or the pool networks come from) has no free address (range) left."""

    code = "NetworkFull"


class InUse(NephosError):
    """The thing is still used by another (a security group by a VM or by another group's rule)."""

    code = "InUse"


class AddressInUse(InUse):
    """The fixed address asked for is another VM's."""


class UnknownSubnet(NotFound):
    """A network named by its EC2 subnet id that the project does not have."""


class Protected(NephosError):
    """The VM's termination or stop protection is on."""

    code = "Protected"


class Unavailable(NephosError):
    """A part of the cloud this request needs cannot be reached now; retry later."""

    code = "Unavailable"


# -- names that do not resolve: each facade words them its own way (REST 400/404, EC2's codes) --


class UnknownFilter(BadRequest):
    """A list filter the listing does not know (``details``: ``name``)."""

    code = "BadRequest"


class UnknownInstances(NotFound):
    """Instances named by their EC2 ids that this project does not have (``details``: ``ids``)."""

    code = "NotFound"


class UnknownImage(NotFound):
    """An image named (by id) that the caller cannot see (``details``: ``ids``)."""

    code = "NotFound"


class ImageUnavailable(BadRequest):
    """An image that exists but cannot be used now (saving, failed)."""

    code = "BadRequest"


class UnknownFlavor(BadRequest):
    """A flavor (instance type) named that does not exist (``details``: ``names``)."""

    code = "BadRequest"


class UnknownKeyPair(NotFound):
    code = "NotFound"


class UnknownZone(BadRequest):
    code = "BadRequest"


class UnknownGroup(NotFound):
    """Security groups named that the project does not have (``details``: ``ids``)."""

    code = "NotFound"
