"""Instance attributes, console output and status (EC2.md §2, rows 10 and 23-25).

ModifyInstanceAttribute changes one thing per call: the instance type (``actions.resize``,
a job, only when stopped), user data (only when stopped), the termination and stop
protections (``servers.set_attributes``; ``actions`` refuses a destroy or a stop while one is
on, through REST too, and the facade answers ``OperationNotPermitted``), or the security groups.
GetConsoleOutput is the VM's log as the control plane saw it (its events: builds, actions,
state changes, errors). DescribeInstanceStatus reports a running instance ``ok`` while its host
is up and ``impaired`` while it is down.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from app.api.ec2.instances import find, listing, next_token, state_item
from app.api.ec2.keys import find_groups
from app.api.ec2.protocol import Ec2Error, Params, invalid, missing
from app.api.ec2.router import Ctx, action, ec2_error
from app.ids import utcnow
from app.logic import actions, ec2, firewall, instances, secgroups, servers
from app.logic import errors as e
from app.logic import events as logged
from app.models import Server

#: Attributes DescribeInstanceAttribute answers, as the wire names them.
_FIXED: dict[str, Any] = {
    "instanceInitiatedShutdownBehavior": {"value": "stop"},
    "rootDeviceName": {"value": "/dev/vda"},
    "sourceDestCheck": {"value": True},
    "ebsOptimized": {"value": False},
    "enaSupport": {"value": False},
    "blockDeviceMapping": [],
    "productCodes": [],
    "kernel": {},
    "ramdisk": {},
    "sriovNetSupport": {},
}
#: ``<Attr>.Value`` parameters and their ``Attribute=`` names.
_MODIFIABLE = {
    "InstanceType": "instanceType",
    "UserData": "userData",
    "DisableApiTermination": "disableApiTermination",
    "DisableApiStop": "disableApiStop",
    "InstanceInitiatedShutdownBehavior": "instanceInitiatedShutdownBehavior",
    "SourceDestCheck": "sourceDestCheck",
    "EbsOptimized": "ebsOptimized",
    "EnaSupport": "enaSupport",
    "SriovNetSupport": "sriovNetSupport",
    "Kernel": "kernel",
    "Ramdisk": "ramdisk",
}


async def _one(ctx: Ctx) -> Server:
    instance = ctx.params.require("InstanceId")
    if not ec2.well_formed(instance, "i"):
        raise Ec2Error("InvalidInstanceID.Malformed", f'Invalid id: "{instance}"')
    (server,) = await find(ctx, [instance])
    return server


def _change(p: Params) -> tuple[str, str | list[str]]:
    """Exactly one change: ``Attribute``+``Value``, ``<Attr>.Value``, or ``GroupId.N``."""
    changes: list[tuple[str, str | list[str]]] = []
    if p.get("Attribute") is not None:
        changes.append((p.require("Attribute"), p.get("Value") or ""))
    changes += [(wire, value) for param, wire in _MODIFIABLE.items() if (value := p.get(f"{param}.Value")) is not None]
    if groups := p.many("GroupId"):
        changes.append(("groupSet", groups))
    if not changes:
        raise missing("Attribute")
    if len(changes) > 1:
        raise Ec2Error("InvalidParameterCombination", "Exactly one attribute may be modified at a time")
    return changes[0]


def _boolean(name: str, value: str | list[str]) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise invalid(name, value, "Expected true or false.")


async def _stopped(ctx: Ctx, server: Server, what: str) -> None:
    if ec2.state_of(server.operstate, server.task) != "stopped":
        raise Ec2Error(
            "IncorrectInstanceState",
            f"The instance '{server.ec2_id}' is not in the 'stopped' state; its {what} can only "
            f"be changed when it is stopped.",
        )


@action("ModifyInstanceAttribute")
async def modify_instance_attribute(ctx: Ctx) -> dict[str, Any]:
    server = await _one(ctx)
    name, value = _change(ctx.params)
    if name == "instanceType":
        assert isinstance(value, str)
        flavor = await instances.flavor_id(ctx.session, value)
        if flavor != server.flavor_id:
            await _stopped(ctx, server, "instance type")
            try:
                await actions.resize(ctx.session, ctx.outbox, actor=ctx.actor, server_id=server.id, flavor_id=flavor)
            except (e.TaskPending, e.InvalidState, e.HostDown):
                raise Ec2Error(
                    "IncorrectInstanceState",
                    f"The instance '{server.ec2_id}' is not in a state from which it can be modified",
                ) from None
            except (e.OverLimit, e.NoCapacity) as exc:
                raise ec2_error(exc) from None
    elif name == "userData":
        assert isinstance(value, str)
        await _stopped(ctx, server, "user data")
        try:
            data = base64.b64decode(value, validate=True).decode("utf-8", errors="replace")
        except (binascii.Error, ValueError):
            raise invalid("UserData", "...", "UserData must be base64.") from None
        await servers.set_attributes(ctx.session, actor=ctx.actor, server_id=server.id, user_data=data)
    elif name == "disableApiTermination":
        await servers.set_attributes(
            ctx.session, actor=ctx.actor, server_id=server.id, disable_api_termination=_boolean(name, value)
        )
    elif name == "disableApiStop":
        await servers.set_attributes(
            ctx.session, actor=ctx.actor, server_id=server.id, disable_api_stop=_boolean(name, value)
        )
    elif name == "groupSet":
        assert isinstance(value, list)
        groups = await find_groups(ctx, value, [])
        await servers.lock(ctx.session, actor=ctx.actor, server_id=server.id)
        await secgroups.set_members(ctx.session, [server.id], groups)
        await firewall.resync(ctx.session, ctx.outbox, server_ids=[server.id])
    elif name == "instanceInitiatedShutdownBehavior" and value == "stop":
        pass  # the only behaviour Nephos has: a guest that shuts down is stopped
    elif name in _FIXED or name in _MODIFIABLE.values():
        raise invalid(name, value, f"The attribute {name} cannot be changed on this cloud.")
    else:
        raise invalid("Attribute", name, "Unknown attribute.")
    return {"return": True}


@action("DescribeInstanceAttribute")
async def describe_instance_attribute(ctx: Ctx) -> dict[str, Any]:
    server = await _one(ctx)
    name = ctx.params.require("Attribute")
    answer: Any
    if name == "instanceType":
        answer = {"value": await instances.flavor_name(ctx.session, server)}
    elif name == "userData":
        answer = {"value": base64.b64encode(server.user_data.encode()).decode() if server.user_data else None}
    elif name == "disableApiTermination":
        answer = {"value": server.disable_api_termination}
    elif name == "disableApiStop":
        answer = {"value": server.disable_api_stop}
    elif name == "groupSet":
        groups = (await secgroups.groups_of(ctx.session, [server.id]))[server.id]
        answer = [{"groupId": gid, "groupName": gname} for gid, gname in groups]
    elif name in _FIXED:
        answer = _FIXED[name]
    else:
        raise invalid("Attribute", name, "Unknown attribute.")
    return {"instanceId": server.ec2_id, name: answer}


@action("GetConsoleOutput")
async def get_console_output(ctx: Ctx) -> dict[str, Any]:
    server = await _one(ctx)
    events = await logged.history(ctx.session, server.id)
    lines = []
    for ev in events:
        if ev.operstate_to:
            change = f" {ev.operstate_from} -> {ev.operstate_to}" if ev.operstate_from else f" -> {ev.operstate_to}"
        else:
            change = f" (from {ev.operstate_from})" if ev.operstate_from else ""
        what = " ".join(filter(None, [ev.kind, ev.action])) + change
        lines.append(
            f"[{ev.created_at:%Y-%m-%d %H:%M:%S}] {server.ec2_id}: {what}" + (f": {ev.message}" if ev.message else "")
        )
    text = "\n".join(lines) + "\n" if lines else ""
    return {
        "instanceId": server.ec2_id,
        "timestamp": events[-1].created_at if events else utcnow(),
        "output": base64.b64encode(text.encode()).decode(),
    }


# -- DescribeInstanceStatus --------------------------------------------------------------------


def _status(status: str) -> dict[str, Any]:
    detail = {"ok": "passed", "impaired": "failed"}.get(status)
    return {"status": status, "details": [{"name": "reachability", "status": detail}] if detail else []}


@action("DescribeInstanceStatus")
async def describe_instance_status(ctx: Ctx) -> dict[str, Any]:
    rows, more = await instances.statuses(
        ctx.session, project_id=ctx.project_id, listing=listing(ctx), include_all=ctx.params.flag("IncludeAllInstances")
    )
    return {
        "instanceStatusSet": [
            {
                "instanceId": s.ec2_id,
                "availabilityZone": s.zone or "",
                "instanceState": state_item(state),
                "systemStatus": _status(status),
                "instanceStatus": _status(status),
                "eventsSet": [],
            }
            for s, state, status in rows
        ],
        "nextToken": next_token(ctx, more),
    }
