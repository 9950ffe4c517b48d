"""Instances' tags: CreateTags, DeleteTags, DescribeTags (paged like DescribeInstances)."""

from __future__ import annotations

from typing import Any

from app.api.ec2.instances import find, page_size, page_token, page_token_after
from app.api.ec2.protocol import Ec2Error, missing
from app.api.ec2.router import Ctx, action
from app.logic import ec2, ec2_tags

# -- tags ---------------------------------------------------------------------------------------


async def _taggable(ctx: Ctx) -> list[str]:
    ids = ctx.params.many("ResourceId")
    if not ids:
        raise missing("ResourceId.1")
    for i in ids:
        if not ec2.well_formed(i, "i"):
            raise Ec2Error("InvalidID", f'The ID "{i}" is not valid (only instances are tagged here)')
    await find(ctx, ids)
    return ids


@action("CreateTags")
async def create_tags(ctx: Ctx) -> dict[str, Any]:
    ids = await _taggable(ctx)
    tags = [(t.require("Key"), t.get("Value") or "") for t in ctx.params.structs("Tag")]
    if not tags:
        raise missing("Tag.1.Key")
    await ec2_tags.set_tags(ctx.session, ctx.project_id, ids, tags)
    return {"return": True}


@action("DeleteTags")
async def delete_tags(ctx: Ctx) -> dict[str, Any]:
    ids = await _taggable(ctx)
    tags = [(t.require("Key"), t.get("Value")) for t in ctx.params.structs("Tag")]
    await ec2_tags.delete_tags(ctx.session, ctx.project_id, ids, tags)
    return {"return": True}


@action("DescribeTags")
async def describe_tags(ctx: Ctx) -> dict[str, Any]:
    token = page_token(ctx, "tags")
    resource, _, key = (token or "").partition("\x00")
    rows, more = await ec2_tags.describe_tags(
        ctx.session,
        ctx.project_id,
        filters=ctx.params.filters(),
        after=(resource, key) if token is not None else None,
        size=page_size(ctx.params),
    )
    return {
        "tagSet": [{"resourceId": r, "resourceType": "instance", "key": k, "value": v} for r, k, v in rows],
        "nextToken": None if more is None else page_token_after(ctx, "tags", f"{more[0]}\x00{more[1]}"),
    }
