"""The dashboard: ``/`` serves its page, ``/ui/`` its script and style (``app/api/dashboard/``).

It is a static page over the REST API and the event stream: no rule lives in it, no asset comes
from elsewhere (no CDN), and nothing needs building. The token a person signs in with stays in
the tab's ``sessionStorage`` and goes only in ``Authorization`` headers, never in a URL.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).parent / "dashboard"
router = APIRouter(include_in_schema=False)
assets = StaticFiles(directory=ASSETS)


@router.get("/")
async def dashboard() -> FileResponse:
    return FileResponse(ASSETS / "index.html", headers={"Cache-Control": "no-cache"})
