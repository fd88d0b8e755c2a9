"""Text completions (`/v1/completions`): the prompt (text, token ids, fill-in-the-middle with `suffix`), `echo`,
legacy logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and `best_of`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from mesh402.api.completion import Outcome, Plan
from mesh402.api.errors import bad_request
from mesh402.api.schemas import CompletionRequest
from mesh402.serving.generation import Constraints, Delta
from mesh402.serving.registry import ModelEntry

# Fill-in-the-middle markers: (prefix, suffix, middle) token names, StarCoder/SmolLM and Qwen conventions.
FIM_MARKERS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))


@dataclass
class TextPlan:
    plan: Plan
    echo: str  # the prompt text shown before the completion ("" without echo)
    echo_logprobs: list[Any]  # TokenLogprob | None per prompt token (echo with logprobs)
    echo_ids: list[int]


def prompt_ids(req: CompletionRequest, local: Any) -> tuple[list[int], str]:
    """(prompt ids, prompt text) for a string, a one-string list or token ids, with `suffix` as FIM."""
    tok = local.engine.tokenizer
    p: Any = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], list):
        p = p[0]
    if isinstance(p, list) and (not p or isinstance(p[0], int)):
        vocab = local.engine.info.vocab_size
        if any((not isinstance(t, int)) or isinstance(t, bool) or t < 0 or t >= vocab for t in p):
            raise bad_request(f"token ids must be integers in [0, {vocab})", param="prompt")
        ids = [int(t) for t in p]
        text, body = tok.decode(ids), ids
    else:
        text = p if isinstance(p, str) else str(p[0])
        ids = tok.encode(text, add_special=True)
        body = tok.encode(text, add_special=False, parse_special=False)
    if req.suffix is None:
        return ids, text
    for names in FIM_MARKERS:
        marks = [tok.token_to_id(n) for n in names]
        if all(m is not None for m in marks):
            pre, suf, mid = marks
            return [pre, *body, suf, *tok.encode(req.suffix, add_special=False, parse_special=False), mid], text
    raise bad_request("suffix (fill-in-the-middle) needs a model whose vocabulary has FIM tokens; this one has none",
                      param="suffix")


async def plan_text(req: CompletionRequest, entry: ModelEntry, executor: Any) -> TextPlan:
    """The generation plan; prompt logprobs (echo with logprobs) are computed here on the whole model."""
    local = entry.local
    assert local is not None
    ids, text = prompt_ids(req, local)
    n, best_of = req.n or 1, req.best_of or (req.n or 1)
    if best_of < n:
        raise bad_request(f"best_of ({best_of}) must be at least n ({n})", param="best_of")
    if best_of > n and req.stream:
        raise bad_request("best_of cannot be used with stream", param="best_of")
    top = req.logprobs
    if best_of > n and top is None:
        top = 0  # choices are ranked by their tokens' logprobs
    echo_lps: list[Any] = []
    if req.echo and req.logprobs is not None:
        from mesh402.engine.errors import EngineError  # lazy: loads gguf, numpy, torch only when needed
        from mesh402.engine.scoring import prompt_logprobs  # lazy: loads gguf, numpy, torch only when needed

        try:
            echo_lps = await asyncio.get_running_loop().run_in_executor(
                executor, prompt_logprobs, local.engine, ids, req.logprobs)
        except EngineError as e:
            raise bad_request(f"echo with logprobs: {e}", param="echo") from None
    plan = Plan(ids, Constraints(None, top), best_of)
    return TextPlan(plan, text if req.echo else "", echo_lps, ids if req.echo else [])


class TextShaper:
    """Text completion choices (see api/completion.Shaper)."""

    def __init__(self, tp: TextPlan, req: CompletionRequest, tokenizer: Any) -> None:
        self.tp, self.tokenizer = tp, tokenizer
        self.n = req.n or 1
        self.logprobs = req.logprobs is not None
        self.offset = [len(tp.echo)] * tp.plan.choices  # text_offset of the next token, per choice
        self.ended = [False] * tp.plan.choices

    def _lp(self, ids: list[int], lps: list[Any], start: int) -> tuple[dict[str, Any], int]:
        """OpenAI's legacy logprobs object for these tokens, text offsets from `start`."""
        tokens, values, tops, offsets = [], [], [], []
        for tid, lp in zip(ids, lps):
            piece = self.tokenizer.token_to_piece(tid)
            tokens.append(piece)
            values.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {self.tokenizer.token_to_piece(i): v for i, v in lp.top})
            offsets.append(start)
            start += len(piece)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, start

    def _echo_lp(self) -> dict[str, Any]:
        return self._lp(self.tp.echo_ids, self.tp.echo_logprobs, 0)[0]

    def stream(self, ev: Delta | None, finish: str | None, first: bool) -> list[dict[str, Any]] | None:
        if first:
            if not self.tp.echo:
                return None
            return [{"index": i, "text": self.tp.echo, "logprobs": self._echo_lp() if self.logprobs else None,
                     "finish_reason": None} for i in range(self.n)]
        if ev is None:
            out = [{"index": i, "text": "", "logprobs": None, "finish_reason": finish or "length"}
                   for i in range(self.n) if not self.ended[i]]
            return out or None
        if ev.finish is not None:
            self.ended[ev.index] = True
            return [{"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.finish}]
        lp = None
        if self.logprobs and ev.logprobs:
            lp, self.offset[ev.index] = self._lp([x.token for x in ev.logprobs], ev.logprobs, self.offset[ev.index])
        if not ev.text and lp is None:
            return None
        return [{"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": None}]

    def whole(self, outcomes: list[Outcome]) -> list[dict[str, Any]]:
        if len(outcomes) > self.n:  # best_of: the n with the highest mean logprob per token
            def score(o: Outcome) -> float:
                return sum(x.logprob for x in o.logprobs) / max(1, len(o.logprobs))
            outcomes = sorted(outcomes, key=score, reverse=True)[: self.n]
        out = []
        for i, o in enumerate(outcomes):
            lp = None
            if self.logprobs:
                lp, _ = self._lp([x.token for x in o.logprobs], o.logprobs, len(self.tp.echo))
                if self.tp.echo:
                    head = self._echo_lp()
                    lp = {k: head[k] + lp[k] for k in lp}
            out.append({"index": i, "text": self.tp.echo + o.text, "logprobs": lp, "finish_reason": o.finish})
        return out
