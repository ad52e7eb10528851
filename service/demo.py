"""`GET /demo` (DEMO_PAGE=1): one static chat page for end-user tokens; no build step."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["demo"])
PAGE = Path(__file__).with_name("demo.html")
# The page's own script and style only; it may call any origin the operator's CORS allows.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src *; img-src 'self' data:; base-uri 'none'; form-action 'none'"
    ),
    "Referrer-Policy": "no-referrer",  # the token rides in the fragment; never send it on
    "Cache-Control": "no-cache",
}


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/demo", response_class=HTMLResponse, include_in_schema=False)
async def demo_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers=HEADERS)
