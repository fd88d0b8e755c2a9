"""The web console on the management port: one build-free page (`static/`: HTML, CSS and plain JavaScript,
no CDN, nothing fetched from elsewhere) and the JSON it reads besides `/api/status` and `/api/events`:

- ``GET /``: the page (strict Content-Security-Policy: only this origin's own scripts, styles, fetches);
- ``GET /api/traffic``: requests/s, tok/s, TTFT, in flight and the latest requests (`api/traffic.py`);
- ``POST /api/traffic/prompts`` ``{"show": true}``: keep prompt text in the latest requests from now on
  (off by default: nothing a client wrote is kept);
- ``GET /api/money``: the Money and trust view (`money.py`);
- the playground's ``/api/playground/*`` (`playground.py`).

`ticker` gives what the event stream pushes every few seconds (traffic and money), so the page stays live
without polling. Access (console token, Host/Origin) is `access.py`'s, for every route alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from mesh402.api.management import playground
from mesh402.api.management.playground import Playground
from mesh402.api.traffic import Traffic

STATIC = Path(__file__).with_name("static")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

Money = Callable[[], dict[str, Any]]


def ticker(traffic: Traffic, money: Money) -> Callable[[], dict[str, Any]]:
    """The event the stream sends when it changed: `{"type": "console", "traffic": ..., "money": ...}`."""
    def tick() -> dict[str, Any]:
        try:
            m = money()
        except Exception as e:  # a locked or missing database must not stop the stream
            m = {"error": f"{type(e).__name__}: {e}"}
        return {"type": "console", "traffic": traffic.view(), "money": m}
    return tick


def install(app: FastAPI, *, traffic: Traffic, money: Money, pg: Playground | None) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"content-security-policy": CSP, "cache-control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/traffic")
    async def get_traffic() -> JSONResponse:
        return JSONResponse(traffic.view())

    @app.post("/api/traffic/prompts")
    async def set_prompts(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("show"), bool):
            return JSONResponse({"error": 'body must be {"show": true|false}'}, status_code=400)
        traffic.show_prompts = body["show"]
        return JSONResponse({"show_prompts": traffic.show_prompts})

    @app.get("/api/money")
    async def get_money() -> JSONResponse:
        return JSONResponse(money())

    if pg is not None:
        playground.install(app, pg)
