"""The OpenAI-compatible edge: /v1/models (and /v1/models/{id}), /v1/chat/completions, /v1/completions,
/v1/responses, /v1/embeddings, /health, /ready.

The pieces: `context` (what handlers share), `bodies` (bodies in, SSE out), `fields` (what each request field
does), `selection` (which model and node), `forwarding` (the tunnel to other nodes), `completion` (one
completion served here: n choices, constraints), `chat` / `text_completion` / `responses` / `embeddings`
(each endpoint's prompt and answer shape)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mesh402.api import well_known
from mesh402.api import embeddings, fields, responses
from mesh402.api.bodies import validation_message
from mesh402.api.chat import ChatShaper, plan_chat
from mesh402.api.completion import Plan, answer
from mesh402.api.context import EdgeContext
from mesh402.api.errors import APIError, bad_request, unavailable
from mesh402.api.forwarding import arrive
from mesh402.api.payment_policy import X402Policy
from mesh402.api.router import Router
from mesh402.api.schemas import ChatCompletionRequest, CompletionRequest
from mesh402.api.text_completion import TextShaper, plan_text
from mesh402.api.tunnel import MODEL_ID
from mesh402.api.x402 import discovery as x402_discovery
from mesh402.api.x402.gate import PaymentGate
from mesh402.economics.upstream import UpstreamBuyer
from mesh402.serving.registry import ModelRegistry
from mesh402.serving.stage_link import StageError
from mesh402.settings import NodeConfig

log = logging.getLogger(__name__)


def create_app(config: NodeConfig, registry: ModelRegistry, *, payment_gate: PaymentGate | None = None,
               live_listing: Callable[[], dict[str, Any] | None] = lambda: None) -> FastAPI:
    """The node's OpenAI-compatible app; its EdgeContext is `edge_of(app)`. `live_listing()`: the node's mesh
    as a discovery listing, for its ERC-8004 registration file."""
    app = FastAPI(title="mesh402", version="0.1.0", docs_url=None, redoc_url=None)
    ctx = edge_context(config, registry, payment_gate)
    app.state.edge = ctx
    app.state.payment_gate = ctx.payments.gate if isinstance(ctx.payments, X402Policy) else None
    if isinstance(ctx.payments, X402Policy):
        ctx.payments.gate.install_routes(app)
    well_known.install(app, config.home, live_listing, x402_support=ctx.payments.charges)
    x402_discovery.install(app, ctx, app.state.payment_gate, lambda: model_list(ctx))  # /.well-known/x402
    install_error_handlers(app, config)
    install_routes(app, ctx)
    return app


def edge_context(config: NodeConfig, registry: ModelRegistry, gate: PaymentGate | None = None) -> EdgeContext:
    """What the handlers share; x402 (and a wallet to pay hosts that charge) when the node sells."""
    if gate is None and config.payments.enabled:
        gate = PaymentGate(config.payments, config.home)
    if gate is None:
        return EdgeContext.free(config, registry)
    buyer = None
    if config.payments.payout_key:  # a paid entry buys from hosts that charge
        buyer = UpstreamBuyer(config.payments.payout_key, gate.asset.network, gate.asset.address)
    return EdgeContext(config, registry, Router(), X402Policy(gate), buyer)


def edge_of(app: FastAPI) -> EdgeContext:
    """The EdgeContext `create_app` built for this app."""
    ctx = app.state.edge
    assert isinstance(ctx, EdgeContext)
    return ctx


def install_error_handlers(app: FastAPI, config: NodeConfig) -> None:
    """Every error leaves in OpenAI's JSON shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return bad_request(validation_message(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(StageError)
    async def _stage_error(_: Request, exc: StageError) -> JSONResponse:
        # A split model lost a stage and no replacement exists: the model waits for capacity.
        return unavailable(f"the model's pipeline failed: {exc}", config.timers.retry_after_s,
                           code=exc.code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


def install_routes(app: FastAPI, ctx: EdgeContext) -> None:
    config, registry = ctx.config, ctx.registry

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        models = {e.model_id: e.state for e in registry.all()}
        ok = registry.all_ready()
        return JSONResponse({"ready": ok, "models": models}, status_code=200 if ok else 503,
                            headers={} if ok else {"Retry-After": str(config.timers.retry_after_s)})

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        ctx.check_auth(request)
        return {"object": "list", "data": model_list(ctx)}

    @app.get("/v1/models/{model_id}")
    async def get_model(request: Request, model_id: str) -> dict[str, Any]:
        ctx.check_auth(request)
        if not MODEL_ID.match(model_id):
            raise APIError(404, "no such model: a model id is 1-128 of a-z, A-Z, 0-9 and . _ : - @",
                           type="not_found_error", code="model_not_found", param="model")
        found = next((m for m in model_list(ctx) if m["id"] == model_id), None)
        if found is None:
            raise APIError(404, f"model {model_id!r} is not served in this mesh; see GET /v1/models",
                           type="not_found_error", code="model_not_found", param="model")
        return found

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        if ctx.backends is not None:  # a backend's model: answered by the operator's own server
            ctx.check_auth(request)
            served_here = {m["id"] for m in model_list(ctx) if m.get("owned_by") != "backend"}
            via_backend = await ctx.backends.answer(ctx, request, served_here)
            if via_backend is not None:
                return via_backend
        got = await arrive(ctx, request, ChatCompletionRequest, fields.CHAT, "chat completions")
        if isinstance(got, Response):
            return got
        req, entry, sel = got.body, got.entry, got.sel
        local = entry.local
        assert local is not None
        plan = plan_chat(req, local.engine)
        shaper = ChatShaper(plan, req.choices, local.tokenizer, bool(req.logprobs))
        return await answer(ctx, sel, request, req, entry, Plan(plan.prompt_ids, plan.constraints, req.choices),
                            prefix="chatcmpl", objects=("chat.completion.chunk", "chat.completion"), shaper=shaper)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        got = await arrive(ctx, request, CompletionRequest, fields.COMPLETIONS, "completions")
        if isinstance(got, Response):
            return got
        req, entry, sel = got.body, got.entry, got.sel
        local = entry.local
        assert local is not None
        tp = await plan_text(req, entry, local.executor)
        return await answer(ctx, sel, request, req, entry, tp.plan, prefix="cmpl",
                            objects=("text_completion", "text_completion"),
                            shaper=TextShaper(tp, req, local.tokenizer))

    responses.install(app, ctx)
    embeddings.install(app, ctx)


def model_list(ctx: EdgeContext) -> list[dict[str, Any]]:
    """GET /v1/models: this node's models with their state, then those served elsewhere in the mesh."""
    data = []
    for e in ctx.registry.all():
        item: dict[str, Any] = {"id": e.model_id, "object": "model", "created": e.created,
                                "owned_by": "mesh402", "state": e.state}
        if e.local is not None:
            item["context_length"] = e.local.n_ctx
        if e.error:
            item["error"] = e.error
        data.append(item)
    seen = {d["id"] for d in data}
    for model_id, r in sorted(ctx.routes().items()):
        if model_id in seen:
            if r.ready and not r.backend:  # served elsewhere in the mesh while this node holds it on standby
                next(d for d in data if d["id"] == model_id).update(state="ready", host=r.host)
            continue
        if r.backend:  # another node's `--backend` model: unverified, unavailable while its backend is down
            item = {"id": model_id, "object": "model", "created": 0, "owned_by": "backend",
                    "state": "ready" if r.ready else "unavailable", "host": r.host, "verified": False}
            if r.context_length:
                item["context_length"] = r.context_length
            data.append(item)
            continue
        data.append({"id": model_id, "object": "model", "created": 0, "owned_by": "mesh402",
                     "state": "ready" if r.ready else "waiting", "host": r.host})
    if ctx.backends is not None:
        data += ctx.backends.listing({d["id"] for d in data})
    return data
