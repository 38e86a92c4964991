"""The dashboard: one static page (``/``) and its script, which call the JSON API with the
user's key. No build step, no CDN: the files under ``api/static/`` are what the browser gets."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
# Scripts, styles and requests from this origin only: the page holds an API key.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

router = APIRouter(include_in_schema=False)
static_files = StaticFiles(directory=STATIC)


@router.get("/")
def dashboard() -> FileResponse:
    return FileResponse(
        STATIC / "index.html",
        headers={
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
        },
    )
