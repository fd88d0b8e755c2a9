"""One completion served here: admit (payment first on a node that charges, then a KV session per choice),
generate the choices, and shape the answer as an OpenAI body or an SSE stream. The endpoints build the
prompt and the constraints (a `Plan`) and say how choices look (a `Shaper`).

Choices (`n`, completions' `best_of`) are independent sequences: each has its own KV session and its own
seed (`choice_seeds`: choice 0 keeps the request's seed), runs concurrently with the others on the node's
engine thread (or its pipeline), and streams with its `index`. Usage counts the prompt once and every
generated token of every choice."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from mesh402 import __version__
from mesh402.api.context import EdgeContext
from mesh402.api.errors import bad_request, unavailable
from mesh402.api.payment_policy import usage
from mesh402.api.schemas import SamplingFields
from mesh402.api.selection import Selection, local_route
from mesh402.api.x402.gate import Charge
from mesh402.serving.generation import (
    NO_CONSTRAINTS,
    Constraints,
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
MERGE_QUEUE = 64  # events of concurrent choices waiting for the client (each choice blocks when it is full)


@dataclass
class Plan:
    """What an endpoint decided before any work: the prompt, the constraints on every draw, how many
    sequences to generate, and the stop strings (the request's, unless the endpoint overrides them)."""

    prompt_ids: list[int]
    constraints: Constraints = NO_CONSTRAINTS
    choices: int = 1
    stop: list[str] | None = None


@dataclass
class Outcome:
    """One finished choice (non-streamed answers)."""

    index: int
    text: str = ""
    finish: str = "length"
    logprobs: list[Any] = field(default_factory=list)  # engine.sampling.TokenLogprob per token
    tokens: int = 0


class Shaper(Protocol):
    """How an endpoint's choices look. `stream(ev, finish, first)`: the choices of one SSE chunk for a Delta
    (`ev`), the role chunk (`first`), or the end of the answer (`finish`: choices still open end with it);
    None when there is nothing to send. `whole(outcomes)`: the choices of the whole answer."""

    def stream(self, ev: Delta | None, finish: str | None, first: bool) -> list[dict[str, Any]] | None: ...

    def whole(self, outcomes: list[Outcome]) -> list[dict[str, Any]]: ...


def system_fingerprint(entry: ModelEntry) -> str:
    """OpenAI `system_fingerprint`: changes when what computes the answers does (mesh402's version, the
    model's file, the engine mode)."""
    local = entry.local
    assert local is not None
    info, mode = local.engine.info, getattr(local.engine, "mode", "")
    key = f"{__version__}|{entry.model_id}|{info.n_params}|{info.file_bytes}|{mode}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class Prepared:
    entry: ModelEntry
    prompt_ids: list[int]
    gens: list[GenerationRequest]
    steppers: list[Stepper]

    @property
    def gen(self) -> GenerationRequest:
        return self.gens[0]

    def release(self) -> None:
        for s in self.steppers:
            s.release()


def sampling_of(req: SamplingFields, seed: int) -> Any:
    """The request's SamplingParams (engine.sampling) with a concrete seed; 400 when a value is out of range."""
    from mesh402.engine.sampling import SamplingParams  # lazy: loads gguf, numpy, torch only when needed

    try:
        return SamplingParams(
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            seed=seed,
            logit_bias=tuple((int(k), float(b)) for k, b in (req.logit_bias or {}).items()),
        )
    except ValueError as e:
        raise bad_request(str(e)) from None


async def prepare(ctx: EdgeContext, req: SamplingFields, entry: ModelEntry, plan: Plan) -> Prepared:
    """Check the prompt against the context window, fix the sampling and open one KV session per choice."""
    from mesh402.engine import ContextTooLong, EngineFull  # lazy: loads gguf, numpy, torch only when needed
    from mesh402.engine.sampling import choice_seeds  # lazy: loads gguf, numpy, torch only when needed

    local = entry.local
    assert local is not None
    n_ctx, prompt_ids = local.n_ctx, plan.prompt_ids
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
    vocab = int(local.engine.info.vocab_size)
    if any(int(k) >= vocab for k in (req.logit_bias or {})):
        raise bad_request(f"logit_bias names token ids outside [0, {vocab})", param="logit_bias")
    max_tokens = want if want is not None else min(room, ctx.config.limits.default_max_tokens)
    seed = req.seed if req.seed is not None else secrets.randbits(63)  # concrete, so any stage draws alike
    stop = req.stop_list() if plan.stop is None else plan.stop
    gens = [GenerationRequest(prompt_ids, max_tokens, sampling_of(req, s), stop, uuid.uuid4().hex, plan.constraints)
            for s in choice_seeds(seed, plan.choices)]
    steppers: list[Stepper] = []
    try:
        for g in gens:
            steppers.append(await local.open(len(prompt_ids) + max_tokens, g.sampling, constraints=plan.constraints))
    except BaseException as e:
        for s in steppers:
            s.release()
        if isinstance(e, EngineFull):
            raise unavailable(f"node is at capacity: {e}", ctx.retry_after, code="overloaded") from None
        if isinstance(e, ContextTooLong):
            raise bad_request(str(e), code="context_length_exceeded") from None
        if isinstance(e, StageError):  # a split model whose stages cannot take the session right now
            raise unavailable(f"the stages of {entry.model_id} cannot take the request: {e}",
                              ctx.retry_after, code=e.code) from None
        raise
    return Prepared(entry, prompt_ids, gens, steppers)


async def _choice(ctx: EdgeContext, p: Prepared, i: int) -> AsyncGenerator[Delta | Finished, None]:
    """Choice i's events, Deltas tagged with its index, ending with a Delta that carries its finish."""
    local = p.entry.local
    assert local is not None
    async with contextlib.aclosing(generate(p.gens[i], p.steppers[i], local.tokenizer, local.eos_ids)) as events:
        async for ev in events:
            if isinstance(ev, Delta):
                ev.index = i
                yield ev
            else:
                yield Delta("", None, 0, [], index=i, finish=ev.reason)
                yield ev


async def run_stream(ctx: EdgeContext, p: Prepared) -> AsyncIterator[Delta | Finished]:
    """Every choice's events (interleaved as they come), then one Finished for the whole answer; it feeds
    the router's observed speed (streamed or not)."""
    t0 = time.perf_counter()
    done: list[Finished] = []
    if len(p.steppers) == 1:
        async with contextlib.aclosing(_choice(ctx, p, 0)) as events:
            async for ev in events:
                if isinstance(ev, Finished):
                    done.append(ev)
                else:
                    yield ev
    else:
        async for ev in _merged(ctx, p, done):
            yield ev
    fin = _total(done, len(p.prompt_ids))
    ctx.router.observe(p.entry.model_id, fin.completion_tokens, time.perf_counter() - t0)
    yield fin


async def _merged(ctx: EdgeContext, p: Prepared, done: list[Finished]) -> AsyncIterator[Delta]:
    queue: asyncio.Queue[Delta | Finished | BaseException | None] = asyncio.Queue(MERGE_QUEUE)

    async def pump(i: int) -> None:
        try:
            async with contextlib.aclosing(_choice(ctx, p, i)) as events:
                async for ev in events:
                    await queue.put(ev)
            await queue.put(None)
        except Exception as e:  # the consumer re-raises it (and cancels the other choices)
            await queue.put(e)

    tasks = [asyncio.create_task(pump(i)) for i in range(len(p.steppers))]
    try:
        open_ = len(tasks)
        while open_:
            ev = await queue.get()
            if ev is None:
                open_ -= 1
            elif isinstance(ev, BaseException):
                raise ev
            elif isinstance(ev, Finished):
                done.append(ev)
            else:
                yield ev
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


def _total(done: list[Finished], prompt_tokens: int) -> Finished:
    """One Finished for all choices: the prompt once, every generated token of every choice."""
    if not done:
        return Finished("length", prompt_tokens, 0)
    first = done[0]
    reason = "length" if any(f.reason == "length" for f in done) else first.reason
    return Finished(reason, prompt_tokens, sum(f.completion_tokens for f in done), first.cached_tokens,
                    min(f.ttft_s for f in done), max(f.total_s for f in done))


async def collect(ctx: EdgeContext, p: Prepared, charge: Charge | None = None) -> tuple[list[Outcome], Finished]:
    """The whole answer, per choice; a failed generation releases the charge (nothing is settled)."""
    outs = [Outcome(i) for i in range(len(p.steppers))]
    parts: list[list[str]] = [[] for _ in outs]
    fin: Finished | None = None
    try:
        async for ev in run_stream(ctx, p):
            if isinstance(ev, Finished):
                fin = ev
                continue
            o = outs[ev.index]
            parts[ev.index].append(ev.text)
            o.logprobs.extend(ev.logprobs)
            o.tokens += ev.tokens
            if ev.finish is not None:
                o.finish = ev.finish
    except BaseException as e:
        await ctx.payments.release(charge, f"generation failed: {type(e).__name__}")
        raise
    assert fin is not None
    for o, texts in zip(outs, parts):
        o.text = "".join(texts)
    return outs, fin


async def admit(ctx: EdgeContext, request: Request, req: SamplingFields, entry: ModelEntry,
                plan: Plan) -> tuple[Charge | None, Prepared | Response]:
    """Payment first (verified before any work, on a node that charges), then prepare()."""
    assert entry.local is not None
    room = entry.local.n_ctx - len(plan.prompt_ids)
    want = req.requested_max_tokens()
    max_tokens = want if want and want > 0 else min(max(room, 1), ctx.config.limits.default_max_tokens)
    charge = await ctx.payments.admit(request, entry.model_id, len(plan.prompt_ids), max_tokens * plan.choices,
                                      bool(req.stream))
    if charge is not None and charge.replay is not None:
        return charge, charge.replay
    try:
        return charge, await prepare(ctx, req, entry, plan)
    except BaseException:
        await ctx.payments.release(charge, "request rejected before generation")
        raise


def _obfuscate(chunk: dict[str, Any]) -> dict[str, Any]:
    """`stream_options.include_obfuscation`: random padding, so chunk sizes do not tell the tokens."""
    chunk["obfuscation"] = secrets.token_urlsafe(secrets.randbelow(16) + 1)
    return chunk


async def answer(ctx: EdgeContext, sel: Selection, request: Request, req: SamplingFields, entry: ModelEntry,
                 plan: Plan, *, prefix: str, objects: tuple[str, str], shaper: Shaper) -> Response:
    """Admit (and charge), generate and shape one completion (see Shaper)."""
    charge, p = await admit(ctx, request, req, entry, plan)
    if not isinstance(p, Prepared):
        return p  # a retried paid request, answered from the payment ledger
    cid, created = f"{prefix}-{p.gen.request_id}", int(time.time())
    fingerprint = system_fingerprint(entry)
    headers = {"x-request-id": p.gen.request_id, **(charge.headers if charge else {}),
               **local_route(ctx, sel, entry)}
    stream_object, object_ = objects
    opts = req.stream_options
    if req.stream:
        def chunk(ev: Delta | None, finish: str | None, first: bool) -> dict[str, Any] | None:
            base = ev is None and finish is None and not first  # the usage / x402 record's frame
            choices = [] if base else shaper.stream(ev, finish, first)
            if choices is None:
                return None
            out = {"id": cid, "object": stream_object, "created": created, "model": entry.model_id,
                   "system_fingerprint": fingerprint, "choices": choices}
            return _obfuscate(out) if opts and opts.include_obfuscation and not base else out
        include = bool(opts and opts.include_usage)
        body = ctx.payments.sse(charge, run_stream(ctx, p), chunk, include, len(p.prompt_ids))
        return StreamingResponse(body, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"},
                                 background=BackgroundTask(p.release))
    outs, fin = await collect(ctx, p, charge)
    body_json = {"id": cid, "object": object_, "created": created, "model": entry.model_id,
                 "system_fingerprint": fingerprint, "choices": shaper.whole(outs), "usage": usage(fin)}
    if req.service_tier is not None:
        body_json["service_tier"] = "default"
    return await ctx.payments.respond(charge, fin, body_json, headers)
