"""Management API (default 127.0.0.1:3131): mesh status, an SSE stream of changes, invites.

- ``GET /api/status``: node id, mesh id, invite token, peers with their
  announcements, liveness state and RTT, this node's models and roles,
  counters of dropped/rejected input.
- ``GET /api/events``: Server-Sent Events; first a ``snapshot`` event with the
  status, then one event per change (peer_up, peer_learned, peer_updated,
  peer_suspect, peer_down, peer_left, peer_pruned, self_updated), with
  ``: keepalive`` comments in between.
- ``POST /api/invite`` ``{"expires": "1h"}``: mint a token.

It listens on loopback unless ``--console-listen-all``, which requires a
console token; when a token is configured every request must carry
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mesh402.mesh.invite import InviteError, parse_duration
from mesh402.mesh.service import MeshService

KEEPALIVE_S = 15.0


def _sse(event: dict) -> bytes:
    return f"event: {event.get('type', 'message')}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def create_management_app(
    mesh: MeshService,
    *,
    node_info: Optional[Callable[[], dict[str, Any]]] = None,
    token: Optional[str] = None,
    keepalive_s: float = KEEPALIVE_S,
) -> FastAPI:
    app = FastAPI(title="mesh402 management", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if token is not None:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"error": "console token required (Authorization: Bearer ...)"}, status_code=401)
        return await call_next(request)

    def status() -> dict[str, Any]:
        out = mesh.status()
        if node_info is not None:
            try:
                out["node"] = node_info()
            except Exception as e:  # never let node bookkeeping break the console
                out["node"] = {"error": f"{type(e).__name__}: {e}"}
        return out

    @app.get("/api/status")
    async def get_status() -> JSONResponse:
        return JSONResponse(status())

    @app.get("/api/events")
    async def get_events(request: Request) -> StreamingResponse:
        q = mesh.subscribe()

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield _sse({"type": "snapshot", "ts": time.time(), "status": status()})
                while True:
                    try:
                        ev = await asyncio.wait_for(q.get(), keepalive_s)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield b": keepalive\n\n"
                        continue
                    yield _sse(ev)
            finally:
                mesh.unsubscribe(q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/invite")
    async def post_invite(request: Request) -> JSONResponse:
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        expires = body.get("expires", "24h") if isinstance(body, dict) else "24h"
        try:
            seconds = parse_duration(str(expires))
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        try:
            tok = mesh.mint_invite(seconds)
        except InviteError as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        return JSONResponse({"token": tok, "expires_at": int(time.time() + seconds), "mesh_id": mesh.mesh_id})

    return app
