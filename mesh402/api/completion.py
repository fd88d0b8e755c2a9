"""One completion served here: admit (payment first on a node that charges, then the KV session),
generate, and shape the answer as an OpenAI body or an SSE stream. The endpoints only build the
prompt and say how one choice looks."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from mesh402.api.context import EdgeContext
from mesh402.api.errors import bad_request, unavailable
from mesh402.api.payment_policy import usage
from mesh402.api.schemas import SamplingFields
from mesh402.api.selection import Selection, local_route
from mesh402.api.x402.gate import Charge
from mesh402.serving.generation import (
    Delta,
    Finished,
    GenerationRequest,
    Stepper,
    generate,
)
from mesh402.serving.registry import ModelEntry
from mesh402.serving.stage_link import StageError

log = logging.getLogger(__name__)

# Defaults for fields a request leaves out; low temperature keeps small models on topic.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9

# choice(text, finish_reason, first, final): the endpoint's OpenAI choice for a stream chunk
# (final=False) or the whole answer (final=True).
Choice = Callable[[str | None, str | None, bool, bool], dict[str, Any]]


@dataclass
class Prepared:
    entry: ModelEntry
    prompt_ids: list[int]
    gen: GenerationRequest
    stepper: Stepper


async def prepare(ctx: EdgeContext, req: SamplingFields, entry: ModelEntry, prompt_ids: list[int]) -> Prepared:
    """Check the prompt against the context window, fix the sampling and open the KV session."""
    from mesh402.engine import ContextTooLong, EngineFull  # lazy: loads gguf, numpy, torch only when needed
    from mesh402.engine.sampling import SamplingParams  # lazy: loads gguf, numpy, torch only when needed

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
    max_tokens = want if want is not None else min(room, ctx.config.limits.default_max_tokens)
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
        raise unavailable(f"node is at capacity: {e}", ctx.retry_after, code="overloaded") from None
    except ContextTooLong as e:
        raise bad_request(str(e), code="context_length_exceeded") from None
    except StageError as e:  # a split model whose stages cannot take the session right now
        raise unavailable(f"the stages of {entry.model_id} cannot take the request: {e}",
                          ctx.retry_after, code=e.code) from None
    gen = GenerationRequest(prompt_ids, max_tokens, sampling, req.stop_list(), uuid.uuid4().hex)
    return Prepared(entry, prompt_ids, gen, stepper)


async def run_stream(ctx: EdgeContext, p: Prepared) -> AsyncIterator[Delta | Finished]:
    """The generation's events; a finished one feeds the router's observed speed (streamed or not)."""
    local = p.entry.local
    assert local is not None
    t0 = time.perf_counter()
    async with contextlib.aclosing(generate(p.gen, p.stepper, local.tokenizer, local.eos_ids)) as events:
        async for ev in events:
            if isinstance(ev, Finished):
                ctx.router.observe(p.entry.model_id, ev.completion_tokens, time.perf_counter() - t0)
            yield ev


async def collect(ctx: EdgeContext, p: Prepared, charge: Charge | None = None) -> tuple[str, Finished]:
    """The whole answer; a failed generation releases the charge (nothing is settled)."""
    text: list[str] = []
    fin: Finished | None = None
    try:
        async for ev in run_stream(ctx, p):
            if isinstance(ev, Delta):
                text.append(ev.text)
            else:
                fin = ev
    except BaseException as e:
        await ctx.payments.release(charge, f"generation failed: {type(e).__name__}")
        raise
    assert fin is not None
    return "".join(text), fin


async def admit(ctx: EdgeContext, request: Request, req: SamplingFields, entry: ModelEntry,
                prompt_ids: list[int]) -> tuple[Charge | None, Prepared | Response]:
    """Payment first (verified before any work, on a node that charges), then prepare()."""
    assert entry.local is not None
    room = entry.local.n_ctx - len(prompt_ids)
    want = req.requested_max_tokens()
    max_tokens = want if want and want > 0 else min(max(room, 1), ctx.config.limits.default_max_tokens)
    charge = await ctx.payments.admit(request, entry.model_id, len(prompt_ids), max_tokens, bool(req.stream))
    if charge is not None and charge.replay is not None:
        return charge, charge.replay
    try:
        return charge, await prepare(ctx, req, entry, prompt_ids)
    except BaseException:
        await ctx.payments.release(charge, "request rejected before generation")
        raise


async def answer(ctx: EdgeContext, sel: Selection, request: Request, req: SamplingFields, entry: ModelEntry,
                 prompt_ids: list[int], *, prefix: str, objects: tuple[str, str], choice: Choice) -> Response:
    """Admit (and charge), generate and shape one completion. `choice(text, finish, first, final)`
    gives the endpoint's OpenAI choice for a stream chunk (final=False) or the whole answer."""
    charge, p = await admit(ctx, request, req, entry, prompt_ids)
    if not isinstance(p, Prepared):
        return p  # a retried paid request, answered from the payment ledger
    cid, created = f"{prefix}-{p.gen.request_id}", int(time.time())
    headers = {"x-request-id": p.gen.request_id, **(charge.headers if charge else {}),
               **local_route(ctx, sel, entry)}
    stream_object, object_ = objects
    if req.stream:
        def chunk(delta: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            return {"id": cid, "object": stream_object, "created": created, "model": entry.model_id,
                    "choices": [choice(delta, finish, first, False)]}
        include = bool(req.stream_options and req.stream_options.include_usage)
        body = ctx.payments.sse(charge, run_stream(ctx, p), chunk, include, len(p.prompt_ids))
        return StreamingResponse(body, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"},
                                 background=BackgroundTask(p.stepper.release))
    out, fin = await collect(ctx, p, charge)
    body_json = {"id": cid, "object": object_, "created": created, "model": entry.model_id,
                 "choices": [choice(out, fin.reason, False, True)], "usage": usage(fin)}
    return await ctx.payments.respond(charge, fin, body_json, headers)
