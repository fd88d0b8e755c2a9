"""Run one request's generation loop against a local engine.

All engine calls for a node go through one worker thread: torch runs single-threaded per node,
and concurrent requests interleave step by step, each in its own KV session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mesh402.serving.stops import StopMatcher

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Any  # mesh402.engine.sampling.SamplingParams (engine types stay opaque here)
    stop: list[str] = field(default_factory=list)
    request_id: str = ""


@dataclass
class Delta:
    text: str
    token_id: int | None = None


@dataclass
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0


class LocalModel:
    """A loaded engine plus the single worker thread that drives it."""

    def __init__(self, engine: Any, executor: ThreadPoolExecutor) -> None:
        self.engine = engine
        self._executor = executor
        self.active = 0

    @property
    def n_ctx(self) -> int:
        return int(self.engine.info.n_ctx)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self, max_len: int) -> "Lease":
        """Reserve a KV session up front so capacity errors surface before any response is sent."""
        return Lease(await self._run(self.engine.new_session, max_len), self._executor)

    async def generate(self, req: GenerationRequest, lease: "Lease") -> AsyncIterator[Delta | Finished]:
        from mesh402.engine.sampling import Sampler  # engine import stays lazy: the API imports no torch

        engine = self.engine
        session = lease.session
        sampler = Sampler(req.sampling)
        eos = set(engine.eos_token_ids)
        decoder = engine.tokenizer.incremental_decoder()
        stops = StopMatcher(req.stop)
        history = list(req.prompt_ids)
        t0 = time.perf_counter()
        ttft = 0.0
        produced = 0
        reason = "length"
        self.active += 1
        try:
            logits = await self._run(session.prefill, req.prompt_ids)
            while produced < req.max_tokens:
                token = await self._run(sampler.sample, logits, history, len(history))
                if produced == 0:
                    ttft = time.perf_counter() - t0
                produced += 1
                if token in eos:
                    reason = "stop"
                    break
                history.append(token)
                text = stops.push(decoder.push(token))
                if text:
                    yield Delta(text, token)
                if stops.stopped:
                    reason = "stop"
                    break
                if produced < req.max_tokens:
                    logits = await self._run(session.decode, token)
            tail = stops.push(decoder.flush()) + stops.flush()
            if tail:
                yield Delta(tail)
            yield Finished(reason, len(req.prompt_ids), produced, 0, ttft, time.perf_counter() - t0)
        finally:
            self.active -= 1
            lease.release()


class Lease:
    """A KV session held for one request; released exactly once, from any context."""

    def __init__(self, session: Any, executor: ThreadPoolExecutor) -> None:
        self.session = session
        self._executor = executor
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            # Not awaited: this must also run when the client went away and the task is cancelled.
            self._executor.submit(self.session.close)
