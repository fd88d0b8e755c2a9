"""Management API (default 127.0.0.1:3131): mesh status, an SSE stream of changes, invites.

- ``GET /api/status``: node id, mesh id, invite token, peers with their
  announcements, liveness state and RTT, this node's models and roles,
  counters of dropped/rejected input.
- ``GET /api/events``: Server-Sent Events; first a ``snapshot`` event with the
  status, then one event per change (peer_up, peer_learned, peer_updated,
  peer_suspect, peer_down, peer_left, peer_pruned, self_updated), with
  ``: keepalive`` comments in between.
- ``POST /api/invite`` ``{"expires": "1h", "single_use": false}``: mint a token.
- ``POST /api/invite/revoke`` ``{"token": "m402..."}``: stop a token of this mesh
  from admitting anyone, mesh-wide (members it admitted stay).

It listens on loopback unless ``--console-listen-all``, which requires a
console token the operator gives; otherwise the node keeps a generated one in
its home. Every request must carry ``Authorization: Bearer <token>`` or the
page's session cookie, except ``GET /api/status`` from loopback, which then
leaves out the invite token; and every request passes the Host/Origin checks
(``access.py``). With a ``ticker`` the
event stream also carries what it returns every ``tick_s`` (the web console's
traffic and money figures, ``console.py``) when it changed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mesh402.api.bodies import sse
from mesh402.api.management.access import AccessGuard, ConsoleAccess, authenticated
from mesh402.mesh.invite import InviteError, parse_duration
from mesh402.mesh.service import MeshService

KEEPALIVE_S = 15.0
TICK_S = 2.0
MAX_EVENT_STREAMS = 64  # browser tabs and CLI watchers together; each holds a queue of up to 1000 events


def _sse(event: dict) -> bytes:
    return sse(event, event=str(event.get("type", "message")))


def create_management_app(
    mesh: MeshService,
    *,
    node_info: Optional[Callable[[], dict[str, Any]]] = None,
    token: str,
    keepalive_s: float = KEEPALIVE_S,
    ticker: Optional[Callable[[], dict[str, Any]]] = None,
    tick_s: float = TICK_S,
) -> FastAPI:
    app = FastAPI(title="mesh402 management", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessGuard, access=ConsoleAccess(token))

    def status() -> dict[str, Any]:
        out = mesh.status()
        if node_info is not None:
            try:
                out["node"] = node_info()
            except Exception as e:  # never let node bookkeeping break the console
                out["node"] = {"error": f"{type(e).__name__}: {e}"}
        return out

    @app.get("/api/status")
    async def get_status(request: Request) -> JSONResponse:
        out = status()
        if not authenticated(request):  # an open read (access.OPEN_READS): no secret in it
            out["invite_token"] = None
        return JSONResponse(out)

    open_streams = [0]  # event streams now open (each holds a subscription queue): capped

    @app.get("/api/events", response_model=None)
    async def get_events(request: Request) -> StreamingResponse | JSONResponse:
        if open_streams[0] >= MAX_EVENT_STREAMS:
            return JSONResponse({"error": f"{MAX_EVENT_STREAMS} event streams are open already"}, status_code=503,
                                headers={"Retry-After": "5"})

        async def stream() -> AsyncIterator[bytes]:
            q = mesh.subscribe()  # here, not before: a stream never started holds no queue
            open_streams[0] += 1
            last_tick: dict[str, Any] | None = None
            next_tick = time.monotonic() + tick_s  # ticks keep their pace however busy the mesh is
            try:
                yield _sse({"type": "snapshot", "ts": time.time(), "status": status()})
                while True:
                    wait = keepalive_s if ticker is None else max(0.0, min(keepalive_s, next_tick - time.monotonic()))
                    try:
                        ev = await asyncio.wait_for(q.get(), wait)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        next_tick = time.monotonic() + tick_s
                        tick = ticker() if ticker is not None else None
                        if tick is not None and tick != last_tick:
                            last_tick = tick
                            yield _sse({**tick, "ts": time.time()})
                        else:
                            yield b": keepalive\n\n"
                        continue
                    yield _sse(ev)
            finally:
                open_streams[0] -= 1
                mesh.unsubscribe(q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def json_body(request: Request) -> dict | None:
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    @app.post("/api/invite")
    async def post_invite(request: Request) -> JSONResponse:
        body = await json_body(request)
        if body is None:
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        try:
            seconds = parse_duration(str(body.get("expires", "24h")))
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        single_use = body.get("single_use", False)
        if not isinstance(single_use, bool):
            return JSONResponse({"error": "single_use must be true or false"}, status_code=400)
        try:
            tok = mesh.mint_invite(seconds, single_use=single_use)
        except InviteError as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        return JSONResponse({"token": tok, "expires_at": int(time.time() + seconds), "mesh_id": mesh.mesh_id,
                             "single_use": single_use})

    @app.post("/api/invite/revoke")
    async def post_revoke(request: Request) -> JSONResponse:
        body = await json_body(request)
        if body is None or not isinstance(body.get("token"), str):
            return JSONResponse({"error": 'body must be {"token": "m402..."}'}, status_code=400)
        try:
            return JSONResponse(mesh.revoke_invite(body["token"]))
        except InviteError as e:
            return JSONResponse({"error": str(e)}, status_code=400 if e.code == "garbled" else 409)

    return app
