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
console token; when a token is configured every request must carry
``Authorization: Bearer <token>``.

A web page the user visits must not be able to use it (DNS rebinding, cross-site requests): on loopback
only loopback ``Host`` names are served, and a request with an ``Origin`` is served only when that origin
is the console itself. The node always has a console token (the operator's, or one it writes to
``<home>/console.token`` at start, mode 0600, which the CLI reads): without it a request sees no secret
(the invite token is left out of the status) and can change nothing (every POST needs it).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mesh402.api.bodies import sse
from mesh402.mesh.invite import InviteError, parse_duration
from mesh402.mesh.service import MeshService

KEEPALIVE_S = 15.0
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
SECRET_FIELDS = ("invite_token",)  # left out of the status unless the console token is presented


def host_name(value: str) -> str:
    """The host part of a Host header or an origin's netloc, lower-cased, without port or IPv6 brackets."""
    try:
        return (urlsplit("//" + value.strip()).hostname or "").lower()
    except ValueError:
        return ""


def origin_allowed(origin: str, host: str) -> bool:
    """A browser's Origin is served only when it is the console's own (same host and port as the request)."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host.strip().lower()


def _sse(event: dict) -> bytes:
    return sse(event, event=str(event.get("type", "message")))


def create_management_app(
    mesh: MeshService,
    *,
    node_info: Optional[Callable[[], dict[str, Any]]] = None,
    token: Optional[str] = None,
    require_token: Optional[bool] = None,
    allowed_hosts: Optional[frozenset[str]] = LOOPBACK_NAMES,
    keepalive_s: float = KEEPALIVE_S,
) -> FastAPI:
    """`token`: the console token; `require_token` (default: whenever there is a token) makes every request
    present it, otherwise reads are served without it but without secrets; `allowed_hosts`: the Host names
    served (None: any, for a console listening on all interfaces, where the token is required)."""
    app = FastAPI(title="mesh402 management", docs_url=None, redoc_url=None, openapi_url=None)
    must = token is not None if require_token is None else require_token

    def presented(request: Request) -> bool:
        got = request.headers.get("authorization", "")
        return token is not None and hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if allowed_hosts is not None and host_name(host) not in allowed_hosts:
            return JSONResponse({"error": "this console answers only on its own address (Host not allowed)"},
                                status_code=403)
        origin = request.headers.get("origin")
        if origin is not None and not origin_allowed(origin, host):
            return JSONResponse({"error": "cross-origin requests are not served"}, status_code=403)
        trusted = presented(request)
        if (must or request.method not in ("GET", "HEAD")) and not trusted:
            return JSONResponse({"error": "console token required (Authorization: Bearer ...; the CLI reads it "
                                          "from <home>/console.token)"}, status_code=401)
        request.state.trusted = trusted
        return await call_next(request)

    def status(trusted: bool) -> dict[str, Any]:
        out = mesh.status()
        if not trusted:
            for k in SECRET_FIELDS:
                out.pop(k, None)
        if node_info is not None:
            try:
                out["node"] = node_info()
            except Exception as e:  # never let node bookkeeping break the console
                out["node"] = {"error": f"{type(e).__name__}: {e}"}
        return out

    @app.get("/api/status")
    async def get_status(request: Request) -> JSONResponse:
        return JSONResponse(status(request.state.trusted))

    @app.get("/api/events")
    async def get_events(request: Request) -> StreamingResponse:
        q = mesh.subscribe()

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield _sse({"type": "snapshot", "ts": time.time(), "status": status(request.state.trusted)})
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
