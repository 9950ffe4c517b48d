"""A host's state: the one vocabulary placement, deadlines, reconciliation and the API share."""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import orm

from app.models import Host


class HostState(StrEnum):
    """Up: its agent is heard and VMs are placed there. Down: its agent is silent (only destroy
    is accepted for its VMs). Disabled: an admin took it out of placement."""

    UP = "up"
    DOWN = "down"
    DISABLED = "disabled"


#: Reading a host without its last inventory: a JSON document of every domain it runs, which the
#: hot paths (placement, an action's host, a heartbeat) never need. Touching it then raises.
WITHOUT_INVENTORY = orm.defer(Host.inventory, raiseload=True)  # type: ignore[arg-type]
