"""A host's state: the one vocabulary placement, deadlines, reconciliation and the API share."""

from __future__ import annotations

from enum import StrEnum


class HostState(StrEnum):
    """Up: its agent is heard and VMs are placed there. Down: its agent is silent (only destroy
    is accepted for its VMs). Disabled: an admin took it out of placement."""

    UP = "up"
    DOWN = "down"
    DISABLED = "disabled"
