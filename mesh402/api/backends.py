"""`serve --backend URL`: the operator's own OpenAI-compatible servers, answered through this node's API.

The pool probes each backend (GET /models, with a deadline) every `PROBE_S`; its models appear in
GET /v1/models with `owned_by: "backend"`, `verified: false` (nobody can spot-check them) and `state`
`ready` or `unavailable`. A chat completion for a backend model goes to the first healthy backend listing
it: a plain answer is validated and passed on, a stream is parsed event by event and re-framed by this
edge (never raw bytes). A backend that is down, or one that breaks the client's rules (api/backend.py),
gets the client a clean 503. Only this node calls the URL.

A node that charges sells backend models like routed ones: the payment is verified before the backend is
called and settled on the backend's `usage` once the answer is complete (api/x402/proxy.py; a stream asks
the backend for `include_usage`); a backend that sends no usage is counted by this node (api/token_count.py,
marked as an estimate), and a paid request's credit hold is sized on its count of the prompt.

The node announces its backend models (`model:<id>` labels with `backend: true`, node/mesh_runtime.py), so
peers list them and route requests naming them here through the tunnel (serving/distributed.py
`backend_routes`); the tunnel dispatches in process to this app, which answers them here. `model: "auto"`
picks a backend model (another node's, or this node's own for a chat completion) only when the client
(`x-mesh402-auto-backends: true`) or the operator (`serve --auto-backends`) opts in (api/selection.py).
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
from mesh402.api.selection import OWN_BACKEND, Selection, backends_allowed, route_auto
from mesh402.api.token_count import USAGE_HEADER, Count, TokenCounter, answer_text
from mesh402.serving.registry import ModelEntry, ModelRegistry

if TYPE_CHECKING:
    from mesh402.api.context import EdgeContext

log = logging.getLogger(__name__)

PROBE_S = 5.0
ROUTE_HEADER = "x-mesh402-route"


@dataclass
class BackendPool:
    backends: list[Backend]
    retry_after: int = 5
    counter: TokenCounter = field(default_factory=TokenCounter)  # tokens of answers that carry no usage
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _preload: asyncio.Task[Any] | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- health
    async def probe_all(self) -> None:
        await asyncio.gather(*(b.probe() for b in self.backends))

    def start(self, preload: ModelRegistry | None = None) -> None:
        """Probe every PROBE_S; `preload`: load the tokenizer that counts usage now, in the background (a node
        that charges counts every prompt, so its first buyer should not wait for the load)."""
        async def loop() -> None:
            while True:
                await self.probe_all()
                await asyncio.sleep(PROBE_S)

        self._task = asyncio.create_task(loop())
        if preload is not None:
            self._preload = asyncio.create_task(asyncio.to_thread(self.counter.tokenizer, preload))

    async def stop(self) -> None:
        if self._preload is not None:
            self._preload.cancel()  # a load under way finishes in its thread; nobody waits for it
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def status(self) -> list[dict[str, Any]]:
        return [{"url": b.url, "healthy": b.healthy, "error": b.last_error, "checked_at": b.checked_at,
                 "models": [m.id for m in b.models], "answers": b.answers, "usage_estimated": b.usage_estimated,
                 "usage_count_ms": round(b.usage_count_s * 1000, 1)} for b in self.backends]

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

    def ready_models(self, taken: set[str]) -> list[dict[str, Any]]:
        """The listing's entries whose backend is up (candidates for `model: "auto"` here)."""
        return [m for m in self.listing(taken) if m["state"] == "ready"]

    # ---------------------------------------------------------------- answering
    async def answer(self, ctx: "EdgeContext", request: Request, served_here: set[str]) -> Response | None:
        """The response for a chat completion of a backend model, or None when the model is not one. It goes
        through the node's payment policy like a routed request: a node that charges verifies the payment
        first and settles on the backend's `usage` (or this node's count of the tokens) after the answer
        (api/x402/proxy.py). `model: "auto"` with the opt-in (api/selection.backends_allowed) is routed here
        first, so it may pick this node's own backend models like any other node's."""
        max_bytes = ctx.config.limits.max_request_bytes
        raw = await request.body()
        if len(raw) > max_bytes:
            return None  # the edge answers 413 itself
        try:
            peek = json.loads(raw)
        except ValueError:
            return None
        model = peek.get("model") if isinstance(peek, dict) else None
        sel: Selection | None = None
        req: ChatCompletionRequest | None = None
        if model in (None, "", "auto") and ctx.mesh_peer(request) is None and backends_allowed(ctx, request):
            req = await read_json(request, ChatCompletionRequest, max_bytes, fields.CHAT, "chat completions")
            sel = Selection()
            picked = route_auto(ctx, sel, req, backends=True, own_backends=self.ready_models(served_here))
            if picked is None or isinstance(picked, ModelEntry) or picked.host != OWN_BACKEND:
                request.state.auto_pick = (sel, picked)  # pick_model uses this choice instead of deciding again
                return None
            model = picked.model_id
        if not isinstance(model, str) or model in served_here:
            return None
        backend = self.owner(model)
        if backend is None:
            return None
        if req is None:
            req = await read_json(request, ChatCompletionRequest, max_bytes, fields.CHAT, "chat completions")
        asked = req

        async def forward(body: bytes) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
            return await self._forward(ctx, backend, model, asked, json.loads(body))

        # a node that charges holds the buyer's credit for the prompt as this node counts it
        prompt = await self.counter.prompt(ctx.registry, req) if ctx.payments.charges else None
        resp = await ctx.payments.routed(request, raw, model, req, ctx.config.limits.default_max_tokens, forward,
                                         prompt_tokens=prompt)
        why = f"; {sel.route.header()}" if sel is not None and sel.route is not None else ""
        resp.headers[ROUTE_HEADER] = f"model={model}; via=backend; verified=false{why}"
        return resp

    async def _count(self, ctx: "EdgeContext", backend: Backend, req: ChatCompletionRequest,
                     texts: list[str]) -> Count:
        count = await self.counter.count(ctx.registry, req, texts,
                                         req.requested_max_tokens() or ctx.config.limits.default_max_tokens)
        backend.usage_estimated += 1
        backend.usage_count_s += count.seconds
        return count

    async def _forward(self, ctx: "EdgeContext", backend: Backend, model: str, req: ChatCompletionRequest,
                       body: dict[str, Any]) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
        """The backend's answer as this edge frames it: (status, headers, body chunks). An answer without
        `usage` gets this node's count (api/token_count.py), plain or (when usage was asked) streamed."""
        body = {**body, "model": model}  # `auto` resolved here
        if body.get("stream") is not True:
            try:
                data = await backend.chat(body)
            except BackendError as e:
                raise self._error(e) from None
            backend.answers += 1
            headers = {"content-type": "application/json"}
            if "usage" not in data:
                texts = [answer_text(c.get("message") or {}) for c in data["choices"] if isinstance(c, dict)]
                count = await self._count(ctx, backend, req, texts)
                data["usage"] = count.usage()
                headers[USAGE_HEADER] = count.header()
            return 200, headers, _once(json.dumps({**data, "model": model}).encode())
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = backend.stream_chat(body)
        try:
            first = await events.__anext__()  # errors before the first event are a clean status
        except StopAsyncIteration:
            first = None
        except BackendError as e:
            raise self._error(e) from None
        backend.answers += 1
        cap = self.counter.max_text_bytes  # what is kept of a stream to count (count_sync cuts it further)

        async def frames() -> AsyncIterator[bytes]:
            texts: dict[int, list[str]] = {}  # per choice index, what the backend generated (for a count)
            kept = 0
            usage_seen = False
            last: dict[str, Any] = {}
            try:
                pending = [first] if first is not None else []
                while True:
                    for ev in pending:
                        usage_seen = usage_seen or isinstance(ev.get("usage"), dict)
                        if include_usage and not usage_seen and kept < cap:
                            for ch in ev.get("choices") or []:
                                if isinstance(ch, dict) and isinstance(ch.get("delta"), dict):
                                    t = answer_text(ch["delta"])
                                    kept += len(t)
                                    idx = ch.get("index")
                                    texts.setdefault(idx if isinstance(idx, int) else 0, []).append(t)
                        if not include_usage:  # asked for our counting only when the client asked too
                            ev.pop("usage", None)
                            if not ev.get("choices"):
                                continue
                        if ev.get("choices"):
                            last = ev
                        yield sse({**ev, "model": model})
                    try:
                        pending = [await events.__anext__()]
                    except StopAsyncIteration:
                        break
            except BackendError as e:  # mid-stream: an error event, then [DONE]
                yield sse({"error": {"message": str(e), "type": "server_error", "code": e.code}})
                yield b"data: [DONE]\n\n"
                return
            if include_usage and not usage_seen:  # the backend sent none: this node's count, as a usage chunk
                count = await self._count(ctx, backend, req, ["".join(t) for t in texts.values()])
                yield sse({"id": last.get("id", ""), "object": "chat.completion.chunk",
                           "created": last.get("created", 0), "model": model, "choices": [],
                           "usage": count.usage()})
            yield b"data: [DONE]\n\n"

        return 200, {"content-type": "text/event-stream", "cache-control": "no-cache"}, frames()

    def _error(self, e: BackendError) -> APIError:
        if e.status in (400, 404, 422):
            return bad_request(f"the backend refused the request: {e}")
        return unavailable(str(e), self.retry_after, code=e.code)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
