"""The OpenAI-compatible edge: /v1/models, /v1/chat/completions, /v1/completions, /health, /ready."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mesh402.api.errors import APIError, bad_request, unavailable
from mesh402.api.tunnel import ROUTE_HEADER, TunnelSecret
from mesh402.api.tunnel import forward as tunnel_forward
from mesh402.mesh.framing import StreamType
from mesh402.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from mesh402.config import NodeConfig
from mesh402.serving.generation import Delta, Finished, GenerationRequest, Stepper, generate
from mesh402.serving.registry import ModelEntry, ModelRegistry
from mesh402.serving.stage_link import StageError

log = logging.getLogger(__name__)

# Defaults for fields a request leaves out; low temperature keeps small models on topic.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9


@dataclass
class Prepared:
    entry: ModelEntry
    prompt_ids: list[int]
    gen: GenerationRequest
    stepper: Stepper


def _validation_message(err: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def create_app(config: NodeConfig, registry: ModelRegistry, *, payment_gate: Any = None) -> FastAPI:
    app = FastAPI(title="mesh402", version="0.1.0", docs_url=None, redoc_url=None)
    # x402 payments (mesh402.economics): None on a free node, which then pays nothing in overhead.
    gate = payment_gate
    if gate is None and config.payments.enabled:
        from mesh402.economics.gate import PaymentGate
        gate = PaymentGate(config.payments, config.home)
    app.state.payment_gate = gate
    if gate is not None:
        gate.install_routes(app)
    from mesh402.api import registration  # ERC-8004 registration file (mesh402 register)
    registration.install(app, config.home)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return bad_request(_validation_message(exc)).response()

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

    tunnel_secret = TunnelSecret()
    app.state.tunnel_secret = tunnel_secret
    from mesh402.api.router import MODEL_LABEL, Router

    router = Router()  # model: "auto" -> a model and node (mesh402.routing)
    app.state.router = router

    def mesh_peer(request: Request) -> str | None:
        """The admitted peer a request came from through the mesh tunnel, or None for a direct client."""
        peer = tunnel_secret.verify(request.headers)
        if peer is not None:
            request.state.mesh_peer = peer
        return peer

    def check_auth(request: Request) -> None:
        # Tunnelled requests were authenticated (and paid) at the entry node.
        if mesh_peer(request) is not None or config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request, model: type[BaseModel]) -> Any:
        body = await request.body()
        if len(body) > config.limits.max_request_bytes:
            raise APIError(413, f"request body over {config.limits.max_request_bytes} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"malformed JSON body: {e}") from None
        if not isinstance(data, dict):
            raise bad_request("request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise bad_request(_validation_message(e)) from None

    def routes() -> dict[str, Any]:
        dist = getattr(app.state, "distributed", None)
        return dist.routes() if dist is not None else {}

    def model_label(host: str, model_id: str) -> str | None:
        dist = getattr(app.state, "distributed", None)
        if dist is None or dist.mesh.gossip is None:
            return None
        ann = dist.mesh.self_announcement() if host == dist.mesh.node_id.hex() else dist.mesh.gossip.get(bytes.fromhex(host))
        return ann.labels.get(MODEL_LABEL + model_id) if ann is not None else None

    def request_messages(req: Any) -> list[dict[str, Any]]:
        if isinstance(req, ChatCompletionRequest):
            messages = []
            for m in req.messages:
                try:
                    messages.append({"role": m.role, "content": m.text()})
                except ValueError:
                    messages.append({"role": m.role, "content": ""})
            return messages
        prompt = req.prompt if isinstance(req.prompt, str) else ""
        return [{"role": "user", "content": prompt}]

    def choose_replica(request: Request, req: Any, model_id: str) -> ModelEntry | Any | None:
        """Several nodes serve `model_id`: sticky key, then prefix affinity, then least loaded.
        The rest of the order is kept for retries (request.state.replicas)."""
        dist = getattr(app.state, "distributed", None)
        if dist is None or req is None or mesh_peer(request) is not None:
            return None
        from mesh402.serving.replicas import replica_routes

        me = dist.mesh.node_id.hex()
        reps: dict[str, Any] = {r.host: r for r in replica_routes(dist).get(model_id, []) if r.host != me}
        local = registry.get(model_id)
        if local is not None and local.state == "ready" and local.local is not None:
            reps[me] = local
        if not reps:
            return None
        extra = getattr(req, "model_extra", None) or {}
        sticky = str(getattr(req, "user", None) or request.headers.get("x-session-id") or extra.get("session_id")
                     or extra.get("prompt_cache_key") or "")
        prefix = router.prefix(model_id, request_messages(req), getattr(req, "tools", None))
        load = {h: (r.local.engine.n_sessions if isinstance(r, ModelEntry) else router.inflight[(model_id, h)])
                for h, r in reps.items()}
        order = router.picker.order(list(reps), load, sticky=sticky, prefix=prefix, now=time.monotonic())
        request.state.replicas = [(c.replica, reps[c.replica], c.reason) for c in order]
        request.state.prefix = prefix
        request.state.pick = order[0].reason
        return reps[order[0].replica]

    def route_auto(request: Request, req: Any) -> ModelEntry | Any | None:
        """model "auto": classify the request and score the mesh's models (x-mesh402-route says why)."""
        from mesh402.models.profile import model_profile

        local = []
        for e in registry.all():
            if e.state == "ready" and e.local is not None:
                try:
                    local.append((e.model_id, model_profile(str(e.source.path), e.source.format)))
                except Exception:
                    local.append((e.model_id, {}))
        table = {k: r for k, r in routes().items() if r.ready}
        remote = [(k, r.host, model_label(r.host, k)) for k, r in sorted(table.items())]
        messages = request_messages(req)
        d = router.decide(messages, getattr(req, "tools", None), router.candidates(local, remote))
        if d is None:
            return None
        request.state.route = d
        if d.node == "local":
            return registry.get(d.model_id)
        return table[d.model_id]

    def route_header(request: Request, model_id: str, node: str, via: str) -> dict[str, str]:
        d = getattr(request.state, "route", None)
        why = f"; {d.header()}" if d is not None else ""
        pick = getattr(request.state, "pick", None)
        if pick:
            why = f"; replica={pick}" + why
        return {ROUTE_HEADER: f"model={model_id}; node={node[:16]}; via={via}{why}"}

    def pick_model(name: str | None, request: Request, req: Any = None) -> ModelEntry | Any:
        """A local ModelEntry that can serve now, or a Route to the node that hosts the model."""
        auto = name in (None, "", "auto")
        dist = getattr(app.state, "distributed", None)
        if mesh_peer(request) is None and dist is not None:
            if not auto:
                dist.mesh.note_request(name)  # demand, counted where the request enters the mesh
        if auto and req is not None and mesh_peer(request) is None:
            picked = route_auto(request, req)
            if picked is not None:
                if dist is not None:
                    dist.mesh.note_request(picked.model_id)
                return choose_replica(request, req, picked.model_id) or picked
        if not auto:
            replica = choose_replica(request, req, name)
            if replica is not None:
                return replica
        entry = registry.default() if auto else registry.get(name)
        if entry is not None and entry.state == "ready" and entry.local is not None:
            return entry
        if mesh_peer(request) is None:  # never bounce a tunnelled request onwards
            table = routes()
            route = table.get(entry.model_id if entry else name) if not auto or entry else None
            if route is None and auto:
                route = next((r for r in table.values() if r.ready), None)
            if route is not None and route.ready:
                return route
        if entry is None and auto:
            raise unavailable("no model is served in this mesh yet", config.timers.retry_after_s, code="no_model")
        if entry is None and dist is not None and mesh_peer(request) is None:
            from mesh402.serving.replicas import on_disk_somewhere

            if on_disk_somewhere(dist, name or ""):  # a standby node has it: demand will start it
                raise unavailable(f"model {name} is on standby in the mesh; a node will start serving it",
                                  config.timers.retry_after_s, code="model_standby")
        if entry is None:
            raise APIError(404, f"model {name!r} is not served in this mesh; see GET /v1/models",
                           type="not_found_error", code="model_not_found", param="model")
        if entry.state in ("loading", "standby"):
            raise unavailable(f"model {entry.model_id} is {entry.state}", config.timers.retry_after_s)
        if entry.state == "waiting":
            raise unavailable(f"model {entry.model_id} is waiting for capacity: {entry.error}",
                              config.timers.retry_after_s, code="waiting_for_capacity")
        raise unavailable(f"model {entry.model_id} failed to load: {entry.error}", 30)

    async def open_tunnel(request: Request, route: Any, body: bytes, *, local_ok: bool = True) -> Any:
        """Tunnel to the chosen replica, else to the next ones when a connection fails before the answer
        starts. Returns (route, status, headers, chunks), or None when a local replica should serve."""
        dist = app.state.distributed
        rid = uuid.uuid4().hex
        tries = [(route.host, route)] + [(h, r) for h, r, _ in getattr(request.state, "replicas", [])
                                         if h != route.host]
        last: Exception | None = None
        for i, (host, target) in enumerate(tries):
            if isinstance(target, ModelEntry):
                if not local_ok:
                    continue
                request.state.pick = "retry"
                return None  # the caller serves it here
            try:
                router.inflight[(target.model_id, host)] += 1
                try:
                    status, headers, chunks = await tunnel_forward(
                        lambda: dist.mesh.open_stream(bytes.fromhex(host), StreamType.HTTP_TUNNEL),
                        request.method, request.url.path, dict(request.headers), body, rid)
                finally:
                    router.inflight[(target.model_id, host)] -= 1
            except Exception as e:
                log.warning("tunnel to %s failed: %s", host[:12], e)
                router.picker.table.forget_replica(host)
                last = e
                continue
            if i:
                request.state.pick = "retry"
            return target, status, headers, chunks
        raise unavailable(f"no node serving {route.model_id} answered ({type(last).__name__}); retry shortly",
                          config.timers.retry_after_s, code="host_unreachable")

    async def proxy(request: Request, route: Any, req: Any = None) -> Response | None:
        """Carry the request over the mesh to the model's host; the answer streams back as it comes."""
        if gate is not None and req is not None:  # the entry node charges for what it routes
            from mesh402.economics.proxy import paid_proxy

            served = [route]

            async def send(body: bytes) -> Any:
                target, status, headers, chunks = await open_tunnel(request, route, body, local_ok=False)
                served[0] = target
                return status, headers, chunks

            resp = await paid_proxy(gate, request, route.model_id, req, config.limits.default_max_tokens, send)
            resp.headers.update(route_header(request, served[0].model_id, served[0].host, "mesh"))
            return resp
        body = await request.body()
        if getattr(request.state, "route", None) is not None:  # the host must serve the model chosen here
            data = json.loads(body)
            data["model"] = route.model_id
            body = json.dumps(data).encode()
        opened = await open_tunnel(request, route, body)
        if opened is None:
            return None
        route, status, headers, chunks = opened
        if getattr(request.state, "prefix", None):
            router.picker.served(request.state.prefix, route.host, time.monotonic())
        headers.update(route_header(request, route.model_id, route.host, "mesh"))
        is_sse = headers.get("content-type", "").startswith("text/event-stream")

        async def body_iter() -> AsyncIterator[bytes]:
            try:
                async for c in chunks:
                    yield c
            except Exception as e:  # the host died mid-answer: end the stream cleanly
                log.warning("tunnel from %s broke mid-stream: %s", route.host[:12], e)
                if is_sse:
                    yield sse(APIError(502, f"the host of {route.model_id} stopped answering mid-stream",
                                       type="server_error", code="host_lost").body())
                    yield b"data: [DONE]\n\n"

        return StreamingResponse(body_iter(), status_code=status, headers=headers)

    def local_route(request: Request, entry: ModelEntry) -> dict[str, str]:
        st = request.state
        if getattr(st, "route", None) is None and getattr(st, "pick", None) is None:
            return {}
        dist = getattr(app.state, "distributed", None)
        me = dist.mesh.node_id.hex() if dist is not None else "local"
        if getattr(st, "prefix", None):
            router.picker.served(st.prefix, me, time.monotonic())
        return route_header(request, entry.model_id, me, "local")

    def local_fallback(request: Request) -> ModelEntry:
        entry = next(r for _, r, _ in request.state.replicas if isinstance(r, ModelEntry))
        return entry

    async def prepare(req: SamplingFields, entry: ModelEntry, prompt_ids: list[int]) -> Prepared:
        from mesh402.engine import ContextTooLong, EngineFull
        from mesh402.engine.sampling import SamplingParams

        local = entry.local
        assert local is not None
        n_ctx = local.n_ctx
        if not prompt_ids:
            raise bad_request("the prompt is empty", param="prompt")
        if len(prompt_ids) >= n_ctx:
            raise bad_request(f"prompt has {len(prompt_ids)} tokens; the context window is {n_ctx}",
                              code="context_length_exceeded")
        want = req.requested_max_tokens()
        if want is not None and want <= 0:
            raise bad_request("max_tokens must be at least 1", param="max_tokens")
        room = n_ctx - len(prompt_ids)
        if want is not None and want > room:
            raise bad_request(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({want}) exceeds the context window ({n_ctx})",
                code="context_length_exceeded", param="max_tokens")
        max_tokens = want if want is not None else min(room, config.limits.default_max_tokens)
        seed = req.seed if req.seed is not None else secrets.randbits(63)  # concrete, so any stage draws alike
        try:
            sampling = SamplingParams(
                temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
                top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                min_p=req.min_p or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                presence_penalty=req.presence_penalty or 0.0,
                seed=seed,
            )
        except ValueError as e:
            raise bad_request(str(e)) from None
        try:
            stepper = await local.open(len(prompt_ids) + max_tokens, sampling)
        except EngineFull as e:
            raise unavailable(f"node is at capacity: {e}", config.timers.retry_after_s, code="overloaded") from None
        except ContextTooLong as e:
            raise bad_request(str(e), code="context_length_exceeded") from None
        except StageError as e:  # a split model whose stages cannot take the session right now
            raise unavailable(f"the stages of {entry.model_id} cannot take the request: {e}",
                              config.timers.retry_after_s, code=e.code) from None
        gen = GenerationRequest(prompt_ids, max_tokens, sampling, req.stop_list(), uuid.uuid4().hex)
        return Prepared(entry, prompt_ids, gen, stepper)

    def usage(fin: Finished) -> dict[str, Any]:
        return {
            "prompt_tokens": fin.prompt_tokens,
            "completion_tokens": fin.completion_tokens,
            "total_tokens": fin.prompt_tokens + fin.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
        }

    async def run_stream(p: Prepared) -> AsyncIterator[Delta | Finished]:
        local = p.entry.local
        assert local is not None
        async with contextlib.aclosing(generate(p.gen, p.stepper, local.tokenizer, local.eos_ids)) as events:
            async for ev in events:
                yield ev

    async def collect(p: Prepared, charge: Any = None) -> tuple[str, Finished]:
        text: list[str] = []
        fin: Finished | None = None
        t0 = time.perf_counter()
        try:
            async for ev in run_stream(p):
                if isinstance(ev, Delta):
                    text.append(ev.text)
                else:
                    fin = ev
        except BaseException as e:
            if charge is not None:  # failed inference: nothing is settled
                await gate.release(charge, f"generation failed: {type(e).__name__}")
            raise
        assert fin is not None
        router.observe(p.entry.model_id, fin.completion_tokens, time.perf_counter() - t0)
        return "".join(text), fin

    async def admit(request: Request, req: SamplingFields, entry: ModelEntry,
                    prompt_ids: list[int]) -> tuple[Any, Prepared | Response]:
        """Payment first (verified before any work, on a node that charges), then prepare()."""
        if gate is None:
            return None, await prepare(req, entry, prompt_ids)
        assert entry.local is not None
        room = entry.local.n_ctx - len(prompt_ids)
        want = req.requested_max_tokens()
        max_tokens = want if want and want > 0 else min(max(room, 1), config.limits.default_max_tokens)
        charge = await gate.authorize(request, entry.model_id, len(prompt_ids), max_tokens, bool(req.stream))
        if charge.replay is not None:
            return charge, charge.replay
        try:
            return charge, await prepare(req, entry, prompt_ids)
        except BaseException:
            await gate.release(charge, "request rejected before generation")
            raise

    def sse(obj: Any) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    async def stream_events(p: Prepared, include_usage: bool, chunk: Any, charge: Any = None) -> AsyncIterator[bytes]:
        """SSE body; `chunk(delta_text, finish_reason, first)` shapes one OpenAI chunk."""
        if charge is not None:  # paid: metered per token, settled after the last one
            from mesh402.economics.stream import paid_sse
            async for b in paid_sse(gate, charge, run_stream(p), chunk, sse, usage, include_usage, len(p.prompt_ids)):
                yield b
            return
        try:
            yield sse(chunk(None, None, True))
            async for ev in run_stream(p):
                if isinstance(ev, Delta):
                    yield sse(chunk(ev.text, None, False))
                else:
                    yield sse(chunk(None, ev.reason, False))
                    if include_usage:
                        last = chunk(None, None, False)
                        last["choices"] = []
                        last["usage"] = usage(ev)
                        yield sse(last)
        except Exception as e:  # the status line is gone; report in-band and end cleanly
            log.exception("generation failed mid-stream")
            yield sse(APIError(500, f"generation failed: {e}", type="server_error").body())
        yield b"data: [DONE]\n\n"

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
        check_auth(request)
        data = []
        for e in registry.all():
            item: dict[str, Any] = {"id": e.model_id, "object": "model", "created": e.created,
                                    "owned_by": "mesh402", "state": e.state}
            if e.local is not None:
                item["context_length"] = e.local.n_ctx
            if e.error:
                item["error"] = e.error
            data.append(item)
        seen = {d["id"] for d in data}
        for model_id, r in sorted(routes().items()):
            if model_id in seen:
                if r.ready:  # served elsewhere in the mesh while this node holds it on standby
                    next(d for d in data if d["id"] == model_id).update(state="ready", host=r.host)
                continue
            data.append({"id": model_id, "object": "model", "created": 0, "owned_by": "mesh402",
                         "state": "ready" if r.ready else "waiting", "host": r.host})
        return {"object": "list", "data": data}

    async def target(request: Request, req: SamplingFields) -> ModelEntry | Response:
        """The local model entry that serves this request, or the response of the node that did."""
        entry = pick_model(req.model, request, req)
        if not isinstance(entry, ModelEntry):
            resp = await proxy(request, entry, req)
            if resp is not None:
                return resp
            entry = local_fallback(request)
        return entry

    async def answer(request: Request, req: SamplingFields, entry: ModelEntry, prompt_ids: list[int], *,
                     prefix: str, objects: tuple[str, str], choice: Any) -> Response:
        """Admit (and charge), generate and shape one completion. `choice(text, finish, first, final)`
        gives the endpoint's OpenAI choice for a stream chunk (final=False) or the whole answer."""
        charge, p = await admit(request, req, entry, prompt_ids)
        if not isinstance(p, Prepared):
            return p  # a retried paid request, answered from the payment ledger
        cid, created = f"{prefix}-{p.gen.request_id}", int(time.time())
        headers = {"x-request-id": p.gen.request_id, **(charge.headers if charge else {}), **local_route(request, entry)}
        stream_object, object_ = objects
        if req.stream:
            def chunk(delta: str | None, finish: str | None, first: bool) -> dict[str, Any]:
                return {"id": cid, "object": stream_object, "created": created, "model": entry.model_id,
                        "choices": [choice(delta, finish, first, False)]}
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(p, include, chunk, charge), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"},
                                     background=BackgroundTask(p.stepper.release))
        out, fin = await collect(p, charge)
        body = {"id": cid, "object": object_, "created": created, "model": entry.model_id,
                "choices": [choice(out, fin.reason, False, True)], "usage": usage(fin)}
        if charge is not None:
            return await gate.respond(charge, fin, body, headers)  # settles, adds PAYMENT-RESPONSE
        return JSONResponse(body, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_auth(request)
        req: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
        entry = await target(request, req)
        if not isinstance(entry, ModelEntry):
            return entry
        from mesh402.engine.chat_template import ChatTemplate, ChatTemplateError  # a model is loaded: torch is in

        local = entry.local
        assert local is not None
        try:
            messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None
        engine = local.engine
        try:
            template = engine.chat_template or ChatTemplate.default()
            text = template.render(messages, add_generation_prompt=True, tools=req.tools)
        except ChatTemplateError as e:
            raise bad_request(f"chat template failed: {e}", param="messages") from None
        prompt_ids = engine.tokenizer.encode(text, add_special=False)

        def choice(text: str | None, finish: str | None, first: bool, final: bool) -> dict[str, Any]:
            if final:
                return {"index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": finish, "logprobs": None}
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "finish_reason": finish}

        return await answer(request, req, entry, prompt_ids, prefix="chatcmpl",
                            objects=("chat.completion.chunk", "chat.completion"), choice=choice)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_auth(request)
        req: CompletionRequest = await read_json(request, CompletionRequest)
        entry = await target(request, req)
        if not isinstance(entry, ModelEntry):
            return entry
        local = entry.local
        assert local is not None
        prompt_text = ""
        if isinstance(req.prompt, list) and (not req.prompt or isinstance(req.prompt[0], int)):
            vocab = local.engine.info.vocab_size
            if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in req.prompt):
                raise bad_request(f"token ids must be integers in [0, {vocab})", param="prompt")
            prompt_ids = list(req.prompt)  # type: ignore[arg-type]
        else:
            prompt_text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]  # type: ignore[assignment]
            prompt_ids = local.engine.tokenizer.encode(prompt_text, add_special=True)
        echo = prompt_text if req.echo else ""

        def choice(text: str | None, finish: str | None, first: bool, final: bool) -> dict[str, Any]:
            shown = echo + (text or "") if final else (echo if first else (text or ""))
            return {"index": 0, "text": shown, "logprobs": None, "finish_reason": finish}

        return await answer(request, req, entry, prompt_ids, prefix="cmpl",
                            objects=("text_completion", "text_completion"), choice=choice)

    return app
