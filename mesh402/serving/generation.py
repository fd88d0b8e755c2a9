"""One request's generation loop, independent of where the model's layers run.

A `Stepper` feeds tokens and returns the next sampled token: `LocalStepper` runs the whole model in
this process; the pipeline stepper (serving/pipeline.py) drives stages on other nodes, where the
last stage samples. The loop here owns what the client sees: stop tokens, stop strings,
max_tokens, incremental text, usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from mesh402.serving.scheduler import StepScheduler
from mesh402.serving.speculative import DraftPolicy
from mesh402.serving.stops import StopMatcher
from mesh402.work.store import kept

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Constraints:
    """What a request asks of the draw beyond its SamplingParams. `grammar` (an engine.grammar.Grammar) masks
    every draw; `top_logprobs` asks for each token's logprob and that many alternatives (None: no logprobs)."""

    grammar: Any = None
    top_logprobs: int | None = None

    def sampling_json(self, sampling: Any) -> str:
        """The session's decoding as the last stage of a split gets it (in the OPEN grant) and as it goes into
        the sampling evidence (engine.sampling.decoding_json)."""
        from mesh402.engine.sampling import decoding_json  # lazy: loads gguf, numpy, torch only when needed

        spec = self.grammar.spec if self.grammar is not None else ""
        return json.dumps(decoding_json(sampling, spec, self.top_logprobs), separators=(",", ":"), sort_keys=True)


NO_CONSTRAINTS = Constraints()


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Any  # mesh402.engine.sampling.SamplingParams with a concrete seed
    stop: list[str] = field(default_factory=list)
    request_id: str = ""
    constraints: Constraints = NO_CONSTRAINTS


@dataclass
class Delta:
    """Text of the answer as it grows. `tokens`: generated tokens since the previous Delta (what metering
    counts, tool-call tokens and tokens that decode to no text yet included); `logprobs`: their
    engine.sampling.TokenLogprob when the request asked for them."""

    text: str
    token_id: int | None = None
    tokens: int = 1
    logprobs: list[Any] = field(default_factory=list)
    index: int = 0  # the choice it belongs to (a request with n > 1)
    finish: str | None = None  # set on a choice's last Delta: why it ended


@dataclass
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0


class Stepper(Protocol):
    cached_tokens: int
    # engine.sampling.TokenLogprob of the token prefill/decode returned last, when the request asked for
    # logprobs (None otherwise)
    logprob: Any

    async def prefill(self, ids: list[int]) -> int:
        """Feed the prompt; return the first sampled token."""

    async def decode(self, token: int) -> int:
        """Feed one sampled token; return the next."""

    async def finish(self) -> None:
        """The answer is complete: free the KV state and wait until the request's work receipts are
        committed (a paid entry), so the answer's end never goes out before its accounting."""

    def release(self) -> None:
        """Free the KV state; safe to call more than once and from any context."""


async def generate(req: GenerationRequest, stepper: Stepper, tokenizer: Any,
                   eos_ids: list[int]) -> AsyncGenerator[Delta | Finished, None]:
    """The answer's events. With a grammar the stepper draws under its mask, so EOS comes only where the
    grammar may end; an answer cut short (max_tokens, or a stop string inside constrained output) ends
    with reason "length", never "stop": a client never gets truncated JSON labelled complete."""
    eos = set(eos_ids)
    decoder = tokenizer.incremental_decoder()
    stops = StopMatcher(req.stop)
    t0 = time.perf_counter()
    ttft = 0.0
    produced = 0
    reason = "length"
    pending, lps = 0, []  # tokens (and their logprobs) not yet carried by a Delta
    shown: list[str] = []
    try:
        token = await stepper.prefill(req.prompt_ids)
        ttft = time.perf_counter() - t0
        while True:
            produced += 1
            pending += 1
            if token in eos:
                reason = "stop"
                break
            if req.constraints.top_logprobs is not None and stepper.logprob is not None:
                lps.append(stepper.logprob)
            text = stops.push(decoder.push(token))
            if text:
                shown.append(text)
                yield Delta(text, token, pending, lps)
                pending, lps = 0, []
            if stops.stopped:
                reason = "stop"
                break
            if produced >= req.max_tokens:
                break
            token = await stepper.decode(token)
        tail = stops.push(decoder.flush()) + stops.flush()
        if tail or pending:
            shown.append(tail)
            yield Delta(tail, None, pending, lps)
        if reason == "stop" and stops.stopped and not complete(req.constraints.grammar, "".join(shown), tokenizer):
            reason = "length"  # a stop string cut constrained output short
        await stepper.finish()  # receipts durable before the caller sends the answer's end
        yield Finished(reason, len(req.prompt_ids), produced, stepper.cached_tokens, ttft,
                       time.perf_counter() - t0)
    except GeneratorExit:  # the caller stopped reading first (prepaid credit ran out): the same order
        await stepper.finish()
        raise
    finally:
        stepper.release()


def complete(grammar: Any, text: str, tokenizer: Any) -> bool:
    """Whether `text` is a whole sentence of `grammar` (True without one)."""
    if grammar is None:
        return True
    m = grammar.matcher()
    return all(m.accept(t) for t in tokenizer.encode(text, add_special=False, parse_special=False)) and m.can_end


class LocalModel:
    """A whole model loaded in this process, driven by the node's single engine thread."""

    def __init__(self, engine: Any, executor: ThreadPoolExecutor, prefix_cache: Any = "default",
                 receipts: Any = None, step_hook: Callable[[str], None] | None = None,
                 max_batch: int = 8, step_tokens: int = 128, speculative_k: int = 0,
                 draft_row_cost: float | None = None) -> None:
        """`receipts`: work.receipts.SoloReceipts (or serving.expert_receipts.ExpertHostReceipts) on a
        paid entry (signed receipts per request). `step_hook(request_id)`: called on the engine thread
        before each step, so work done elsewhere for the step (MoE experts) is attributed to its request.
        `max_batch` > 1: requests' steps are batched (serving.scheduler; a `step_hook` needs steps one
        request at a time, so it turns batching off); `step_tokens`: prefill tokens per batched step.
        `speculative_k` > 0: up to that many prompt-lookup drafts verified per step (serving/speculative.py),
        as many as pay for their rows (`draft_row_cost`: a verify row's cost in 1-row steps; default by device
        and mode)."""
        self.speculative_k = speculative_k
        self.draft_row_cost = draft_row_cost
        self.engine = engine
        self.executor = executor
        self.scheduler: StepScheduler | None = None
        if max_batch > 1 and step_hook is None and hasattr(engine, "decode_batch"):
            self.scheduler = StepScheduler(engine, executor, max_batch=max_batch, step_tokens=step_tokens)
        self.receipts = receipts
        self.step_hook = step_hook
        if prefix_cache == "default":  # KV prefix reuse (mesh402.engine.prefix); None turns it off
            from mesh402.engine.prefix import (
                PrefixCache,  # the engine is loaded: torch is already in
            )  # lazy: loads gguf, numpy, torch only when needed

            prefix_cache = PrefixCache(int(getattr(engine, "prefill_chunk", 32)))
        self.prefix_cache = prefix_cache

    @property
    def n_ctx(self) -> int:
        return int(self.engine.info.n_ctx)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def eos_ids(self) -> list[int]:
        return list(self.engine.eos_token_ids)

    async def open(self, max_len: int, sampling: Any, constraints: Constraints = NO_CONSTRAINTS) -> "LocalStepper":
        """Reserve a KV session up front so capacity errors surface before any response is sent."""
        session = await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.new_session, max_len)
        stepper = LocalStepper(session, sampling, self.executor, self.prefix_cache, constraints)
        stepper.request_id, stepper.step_hook = uuid.uuid4().hex, self.step_hook
        stepper.scheduler = self.scheduler
        if self.speculative_k > 0:
            stepper.drafts = DraftPolicy.for_engine(self.speculative_k, self.engine, self.draft_row_cost)
        if self.receipts is not None:
            stepper.receipts, stepper.tally = self.receipts, self.receipts.tally(stepper.request_id)
        return stepper


class LocalStepper:
    def __init__(self, session: Any, sampling: Any, executor: ThreadPoolExecutor, prefix_cache: Any = None,
                 constraints: Constraints = NO_CONSTRAINTS) -> None:
        from mesh402.engine.sampling import (
            Sampler,  # lazy: the API process path imports no torch
        )  # lazy: loads gguf, numpy, torch only when needed

        self.session = session
        self.sampler = Sampler(sampling)
        self.matcher = constraints.grammar.matcher() if constraints.grammar is not None else None
        self.top_logprobs = constraints.top_logprobs
        self.logprob: Any = None
        self.history: list[int] = []
        self.cached_tokens = 0
        self._executor = executor
        self._released = False
        self.prefix_cache = prefix_cache
        self.receipts: Any = None  # work.receipts.SoloReceipts and this request's StageTally, when paid
        self.tally: Any = None
        self.request_id = ""
        self.step_hook: Callable[[str], None] | None = None  # LocalModel.step_hook
        self._pending: Any = None  # the receipt write release() started
        self.scheduler: StepScheduler | None = None  # LocalModel.scheduler: steps batched with other requests'
        self.drafts: DraftPolicy | None = None  # speculation on: how many drafts pay (LocalModel.open sets it)
        self.drafted = 0  # drafts proposed / accepted so far (benchmarks)
        self.accepted = 0
        self._ahead: list[tuple[int, int, Any]] = []  # (token sampled, token after it, its logprob) verified ahead

    def _tally(self, ids: list[int], token: int) -> int:
        if self.tally is not None:
            from mesh402.work.receipts import token_step_hash  # lazy: kept off this module's import path
            self.tally.step(len(ids), token_step_hash(ids), token_step_hash([token]))
        return token

    async def _run(self, fn: Any, *args: Any) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _begin(self) -> None:
        if self.step_hook is not None:
            self.step_hook(self.request_id)

    def prefill_begin(self, ids: list[int]) -> list[int]:
        """Engine thread: restore a cached prefix of the prompt; the ids still to prefill."""
        self._begin()
        cache = self.prefix_cache
        n = cache.restore(self.session, ids) if cache is not None and not self.history else 0
        self.cached_tokens += n
        return ids[n:]

    def prefill_end(self, ids: list[int], logits: Any) -> int:
        """Engine thread: the prompt is in (`logits` of its last token); sample the first token."""
        if self.prefix_cache is not None and not self.history:
            self.prefix_cache.store(self.session, len(ids))
        self.history.extend(ids)
        return self._tally(ids, self._draw(logits))

    def decode_end(self, rows: list[int], logits: Any) -> int:
        """Engine thread: `rows` (the last sampled token, then any drafts) are in, `logits[i]` after row i;
        sample each position as plain decoding would, accept drafts while the draws equal them, roll the KV
        back past the first that differs (serving/speculative.py); the first sampled token."""
        start = len(self.session) - len(rows)
        out: list[int] = []
        lps: list[Any] = []
        for i, fed in enumerate(rows):  # every draw here is a token of the answer (the grammar takes each)
            self.history.append(fed)
            out.append(self._tally([fed], self._draw(logits[i])))
            lps.append(self.logprob)
            # a draw that ends the grammar ends the step: plain decoding draws nothing after it
            if i + 1 == len(rows) or out[-1] != rows[i + 1] or (self.matcher is not None and self.matcher.ended):
                break
        if len(out) < len(rows):
            self.session.truncate(start + len(out))
        self.drafted += len(rows) - 1
        self.accepted += len(out) - 1
        if self.drafts is not None:
            self.drafts.settle(len(rows) - 1, len(out) - 1, out[0])
        self._ahead = [(out[j], out[j + 1], lps[j + 1]) for j in range(len(out) - 1)]
        self.logprob = lps[0]
        return out[0]

    def _rows(self, token: int) -> list[int]:
        """The token to feed and, with speculation on, drafts of the tokens after it (as many as pay and fit)."""
        if self.drafts is None:
            return [token]
        room = self.session.max_len - len(self.session) - 2  # plain decoding never feeds the last token
        return [token] + self.drafts.propose(self.history + [token], room)

    def _prefill(self, ids: list[int]) -> int:
        return self.prefill_end(ids, self.session.prefill(self.prefill_begin(ids)))

    def _decode(self, rows: list[int]) -> int:
        self._begin()
        s = self.session
        logits = s.decode(rows[0])[None] if len(rows) == 1 else s.engine.decode_batch([s] * len(rows), rows)
        return self.decode_end(rows, logits)

    def _draw(self, logits: Any) -> int:
        """The next token, under the grammar's mask when there is one (the matcher then takes it)."""
        allowed = self.matcher.allowed() if self.matcher is not None else None
        token = self.sampler.sample(logits, self.history, len(self.history), allowed=allowed)
        if self.matcher is not None and not self.matcher.accept(token):
            raise RuntimeError(f"token {token} was drawn under the grammar's mask but the grammar refuses it")
        if self.top_logprobs is not None:
            from mesh402.engine.sampling import token_logprobs  # lazy: loads gguf, numpy, torch only when needed

            self.logprob = token_logprobs(logits, token, self.top_logprobs)
        return token

    async def prefill(self, ids: list[int]) -> int:
        if self.scheduler is not None:  # continuous batching: chunks interleaved with others' decode steps
            return await self.scheduler.prefill(self, ids)
        return await self._run(self._prefill, ids)

    async def decode(self, token: int) -> int:
        if self._ahead:  # verified by an earlier speculative step: the token's KV row is already in
            fed, nxt, self.logprob = self._ahead.pop(0)
            if fed != token:
                raise ValueError("decode of a token other than the one sampled")
            return nxt
        rows = self._rows(token)
        if self.scheduler is not None:  # rows of the model's next batched step
            return await self.scheduler.decode(self, rows)
        return await self._run(self._decode, rows)

    async def finish(self) -> None:

        try:
            await kept(self.release())
        except Exception as e:  # accounting must never fail an answer
            log.warning("receipt not kept: %s", e)

    def release(self) -> Any:
        """Free the session and hand the request's receipt on; the write it started (see receipts.kept)."""
        if not self._released:
            self._released = True
            if self.scheduler is not None:
                self.scheduler.leave(self)
            # Not awaited: this must also run when the client went away and the task is cancelled.
            self._executor.submit(self.session.close)
            if self.tally is not None:
                try:
                    self._pending = self.receipts.finish(self.tally)
                except Exception as e:  # accounting must never fail a release
                    log.warning("receipt not kept: %s", e)
        return self._pending
