"""`serve --backend URL`: the operator's own OpenAI-compatible servers, answered through this node's API.

The pool probes each backend (GET /models, with a deadline) every `PROBE_S`; its models appear in
GET /v1/models with `owned_by: "backend"`, `verified: false` (nobody can spot-check them) and `state`
`ready` or `unavailable`. A chat completion for a backend model goes to the first healthy backend listing
it: a plain answer is validated and passed on, a stream is parsed event by event and re-framed by this
edge (never raw bytes). A backend that is down, or one that breaks the client's rules (api/backend.py),
gets the client a clean 503. Only this node calls the URL.

A node that charges sells backend models like routed ones: the payment is verified before the backend is
called and settled on the backend's `usage` once the answer is complete (api/x402/proxy.py; a stream asks
the backend for `include_usage`); a backend that sends no usage is settled as zero tokens (the per-request
price still applies).

The node announces its backend models (`model:<id>` labels with `backend: true`, node/mesh_runtime.py), so
peers list them and route requests naming them here through the tunnel (serving/distributed.py
`backend_routes`); the tunnel dispatches in process to this app, which answers them here. `model: "auto"`
picks another node's backend model only when the client (`x-mesh402-auto-backends: true`) or the operator
(`serve --auto-backends`) opts in (api/selection.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response

from mesh402.api.backend import Backend, BackendError
from mesh402.api import fields
from mesh402.api.bodies import read_json, sse
from mesh402.api.errors import APIError, bad_request, unavailable
from mesh402.api.schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from mesh402.api.context import EdgeContext

log = logging.getLogger(__name__)

PROBE_S = 5.0
ROUTE_HEADER = "x-mesh402-route"


@dataclass
class BackendPool:
    backends: list[Backend]
    retry_after: int = 5
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- health
    async def probe_all(self) -> None:
        await asyncio.gather(*(b.probe() for b in self.backends))

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await self.probe_all()
                await asyncio.sleep(PROBE_S)

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def status(self) -> list[dict[str, Any]]:
        return [{"url": b.url, "healthy": b.healthy, "error": b.last_error, "checked_at": b.checked_at,
                 "models": [m.id for m in b.models]} for b in self.backends]

    # ---------------------------------------------------------------- models
    def listing(self, taken: set[str]) -> list[dict[str, Any]]:
        """GET /v1/models entries for backend models (a model this node or the mesh serves itself wins)."""
        out: dict[str, dict[str, Any]] = {}
        for b in self.backends:
            for m in b.models:
                if m.id in taken or (m.id in out and out[m.id]["state"] == "ready"):
                    continue
                item: dict[str, Any] = {"id": m.id, "object": "model", "created": 0, "owned_by": "backend",
                                        "state": "ready" if b.healthy else "unavailable", "verified": False}
                if m.context_length:
                    item["context_length"] = m.context_length
                out[m.id] = item
        return list(out.values())

    def owner(self, model_id: str) -> Backend | None:
        """The first healthy backend listing the model; raises a 503 when only unhealthy ones list it."""
        known = [b for b in self.backends if any(m.id == model_id for m in b.models)]
        for b in known:
            if b.healthy:
                return b
        if known:
            raise unavailable(f"the backend serving {model_id} is unavailable: {known[0].last_error}",
                              self.retry_after, code="backend_unavailable")
        return None

    # ---------------------------------------------------------------- answering
    async def answer(self, ctx: "EdgeContext", request: Request, served_here: set[str]) -> Response | None:
        """The response for a chat completion of a backend model, or None when the model is not one. It goes
        through the node's payment policy like a routed request: a node that charges verifies the payment
        first and settles on the backend's `usage` after the answer (api/x402/proxy.py)."""
        max_bytes = ctx.config.limits.max_request_bytes
        raw = await request.body()
        if len(raw) > max_bytes:
            return None  # the edge answers 413 itself
        try:
            peek = json.loads(raw)
        except ValueError:
            return None
        model = peek.get("model") if isinstance(peek, dict) else None
        if not isinstance(model, str) or model in served_here:
            return None
        backend = self.owner(model)
        if backend is None:
            return None
        req = await read_json(request, ChatCompletionRequest, max_bytes, fields.CHAT, "chat completions")

        async def forward(body: bytes) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
            return await self._forward(backend, model, json.loads(body))

        resp = await ctx.payments.routed(request, raw, model, req, ctx.config.limits.default_max_tokens, forward)
        resp.headers[ROUTE_HEADER] = f"model={model}; via=backend; verified=false"
        return resp

    async def _forward(self, backend: Backend, model: str,
                       body: dict[str, Any]) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
        """The backend's answer as this edge frames it: (status, headers, body chunks)."""
        if body.get("stream") is not True:
            try:
                data = await backend.chat(body)
            except BackendError as e:
                raise self._error(e) from None
            return 200, {"content-type": "application/json"}, _once(json.dumps({**data, "model": model}).encode())
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = backend.stream_chat(body)
        try:
            first = await events.__anext__()  # errors before the first event are a clean status
        except StopAsyncIteration:
            first = None
        except BackendError as e:
            raise self._error(e) from None

        async def frames() -> AsyncIterator[bytes]:
            try:
                pending = [first] if first is not None else []
                while True:
                    for ev in pending:
                        if not include_usage:  # asked for our counting only when the client asked too
                            ev.pop("usage", None)
                            if not ev.get("choices"):
                                continue
                        yield sse({**ev, "model": model})
                    try:
                        pending = [await events.__anext__()]
                    except StopAsyncIteration:
                        break
            except BackendError as e:  # mid-stream: an error event, then [DONE]
                yield sse({"error": {"message": str(e), "type": "server_error", "code": e.code}})
            yield b"data: [DONE]\n\n"

        return 200, {"content-type": "text/event-stream", "cache-control": "no-cache"}, frames()

    def _error(self, e: BackendError) -> APIError:
        if e.status in (400, 404, 422):
            return bad_request(f"the backend refused the request: {e}")
        return unavailable(str(e), self.retry_after, code=e.code)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
