"""Constrained decoding: grammars compiled by llguidance, and per-session matchers.

Why llguidance (measured in benchmarks/grammar.py, reasoning in docs/structured-output.md): the lowest
per-token mask cost of the three candidates on this CPU, the widest JSON-schema coverage, Lark grammars
with inline JSON schemas and lazy "trigger" lexemes (what tool calls in running text need), rollback, and
a wheel with no dependencies (xgrammar declares torch + triton; outlines-core is regex-only).

A `Grammar` is immutable and shared by every request that uses it; its `spec` (library, version,
vocabulary fingerprint and the llguidance grammar text) is what goes into the sampling evidence, and
`GrammarCompiler.from_spec` rebuilds the same grammar from it. A `Matcher` is one sequence's parse state:
`allowed()` is the mask for the next token (EOS ids only while the grammar may end), `accept()` advances,
`rollback(k)` undoes, and `Grammar.matcher(tokens)` reconstructs the state after any prefix, so failover
replay and verification re-draw each token under exactly the mask the first run used.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import llguidance

    from .tokenizer import Tokenizer

LIBRARY = "llguidance"

# Whitespace a JSON grammar allows between tokens: at most one space or newline. Unbounded whitespace lets
# a small model loop on newlines until max_tokens, and even 0-8 characters let SmolLM2 spend a third of a
# tool call's tokens on blank lines (63 tokens for a call that takes 40 compact); a client pays per token
# and parses JSON whatever its layout, so answers are compact (json.dumps' layout fits).
JSON_WHITESPACE = r"[\x20\x0A]{0,1}"


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled (the API maps it to HTTP 400)."""


def library_version() -> str:
    import llguidance

    return llguidance.__version__


def llg_tokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    """An llguidance tokenizer over our own byte table, so masks use exactly the ids our engine samples.

    Special tokens (control/unknown) are flagged, so grammar text can never be spelled with them; the
    EOS ids are the tokens the mask allows when the grammar may end.
    """
    import llguidance as llg

    class _Wrap:  # the duck type llguidance.TokenizerWrapper reads
        def __init__(self) -> None:
            self.eos_token_id = tok.eos_ids[0] if tok.eos_ids else None
            self.bos_token_id = tok.bos_id
            self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
            self.special_token_ids = [i for i in range(tok.vocab_size) if tok.is_special(i)]

        def __call__(self, text: bytes | str) -> list[int]:
            s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            return tok.encode(s, add_special=False, parse_special=False)

    if not tok.eos_ids:
        raise GrammarError("the tokenizer has no EOS token; a constrained answer could never end")
    return llg.LLTokenizer(llg.TokenizerWrapper(_Wrap()), eos_token=list(tok.eos_ids))


def vocab_fingerprint(tok: Tokenizer) -> str:
    """Short hash of the token byte table, specials and EOS ids: a spec only replays on the same vocabulary."""
    h = hashlib.sha256()
    for i in range(tok.vocab_size):
        piece = tok.token_bytes(i)
        h.update(len(piece).to_bytes(4, "little") + piece + (b"\x01" if tok.is_special(i) else b"\x00"))
    h.update(json.dumps(list(tok.eos_ids)).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar for one vocabulary. Thread-safe; make one `Matcher` per sequence."""

    kind: str  # json_object | json_schema | lark | regex | tool_calls
    text: str  # the llguidance grammar (JSON text), deterministic for a given request
    spec: str  # canonical JSON: library, version, vocabulary fingerprint, kind, grammar text
    digest: str  # sha256 of spec, for logs and evidence
    vocab_size: int
    eos_ids: tuple[int, ...]
    _lt: Any = field(compare=False, repr=False)  # llguidance.LLTokenizer

    def matcher(self, tokens: Sequence[int] = ()) -> Matcher:
        """A fresh matcher, advanced through `tokens` (generated ids so far); refuses a prefix the grammar forbids."""
        m = Matcher(self)
        for i, t in enumerate(tokens):
            if not m.accept(int(t)):
                raise GrammarError(f"token {int(t)} at generated position {i} is not allowed by the grammar")
        return m


class Matcher:
    """One sequence's position in a grammar."""

    def __init__(self, grammar: Grammar) -> None:
        import llguidance as llg

        self.grammar = grammar
        self._m = llg.LLMatcher(grammar._lt, grammar.text, log_level=0)
        if self._m.is_error():
            raise GrammarError(self._m.get_error())
        self.tokens: list[int] = []
        self._ended = False  # EOS accepted
        self._words = (grammar.vocab_size + 31) // 32

    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the next-token mask into `out` (int32 [ceil(V/32)], bit i%32 of word i//32 = token i allowed)."""
        if out.dtype != torch.int32 or out.numel() != self._words or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"bitmask must be a contiguous CPU int32 tensor of {self._words} words")
        if self._ended:
            out.zero_()
            return
        self._m.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)
        if self._m.is_error():
            raise GrammarError(self._m.get_error())

    def bitmask(self) -> torch.Tensor:
        out = torch.empty(self._words, dtype=torch.int32)
        self.fill_bitmask(out)
        return out

    def allowed(self) -> torch.Tensor:
        """Bool [vocab]: tokens the grammar allows next (EOS ids only when the grammar may end here)."""
        # numpy's unpackbits: ~40 µs for 49k tokens, where shifting int32 words in torch takes ~100x longer
        bits = np.unpackbits(self.bitmask().numpy().view(np.uint8), bitorder="little")[: self.grammar.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def is_allowed(self, token: int) -> bool:
        """Whether `token` may come next; does not change the state."""
        token = int(token)
        if self._ended:
            return False
        if token in self.grammar.eos_ids:  # llguidance's validate_tokens never counts EOS
            return self._m.is_accepting()
        return self._m.validate_tokens([token]) == 1

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (state unchanged) if the grammar forbids it. EOS is accepted only
        where the grammar may end, and ends the sequence (it is kept out of llguidance's own state, so
        rolling it back is exact)."""
        token = int(token)
        if not self.is_allowed(token):
            return False
        if token in self.grammar.eos_ids:
            self._ended = True
        elif not self._m.consume_token(token):
            return False
        self.tokens.append(token)
        return True

    def rollback(self, k: int) -> None:
        """Undo the last `k` accepted tokens (speculative drafts, replay from an earlier position)."""
        if not 0 <= k <= len(self.tokens):
            raise ValueError(f"cannot roll back {k} of {len(self.tokens)} tokens")
        n = k - int(self._ended and k > 0)
        if n and not self._m.rollback(n):
            raise GrammarError(self._m.get_error() or "rollback failed")
        if k:
            self._ended = False
        del self.tokens[len(self.tokens) - k:]

    @property
    def can_end(self) -> bool:
        """The text so far is a complete sentence of the grammar: EOS (or a stop) is allowed now."""
        return self._ended or self._m.is_accepting()

    @property
    def ended(self) -> bool:
        """EOS was accepted: nothing may follow."""
        return self._ended

    @property
    def finished(self) -> bool:
        """Nothing but EOS may follow (e.g. the JSON object is closed), or EOS was accepted."""
        return self._ended or self._m.is_stopped()

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next whatever the model says (may be empty)."""
        return list(self._m.compute_ff_tokens())


def _json_options(strict: bool) -> dict[str, Any]:
    # strict: every keyword must be enforced (unsupported ones are an error, as OpenAI's strict mode
    # refuses schemas it cannot guarantee); otherwise unknown keywords are ignored (best effort).
    return {"whitespace_pattern": JSON_WHITESPACE, "lenient": not strict}


class GrammarCompiler:
    """Compiles grammars for one tokenizer. Holds the llguidance tokenizer (~0.3 s to build) and an LRU
    of compiled grammars (agents repeat the same schemas); one per loaded model."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self._lt = llg_tokenizer(tokenizer)
        self.vocab = vocab_fingerprint(tokenizer)
        self.version = library_version()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size

    # ---- builders ------------------------------------------------------------------------------
    def json_object(self) -> Grammar:
        """Any JSON object (OpenAI `response_format: {"type": "json_object"}`)."""
        return self.json_schema({"type": "object"}, strict=True, kind="json_object")

    def json_schema(self, schema: dict[str, Any] | str, *, strict: bool = True, kind: str = "json_schema") -> Grammar:
        import llguidance as llg

        try:
            text = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_json_options(strict))
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from exc
        return self._build(kind, text)

    def lark(self, source: str) -> Grammar:
        import llguidance as llg

        return self._build("lark", llg.LLMatcher.grammar_from_lark(source))

    def regex(self, pattern: str) -> Grammar:
        import llguidance as llg

        return self._build("regex", llg.LLMatcher.grammar_from_regex(pattern))

    def tool_calls(self, lark_source: str) -> Grammar:
        """A tool-call grammar (built by mesh402.engine.tools) in llguidance's Lark dialect."""
        import llguidance as llg

        return self._build("tool_calls", llg.LLMatcher.grammar_from_lark(lark_source))

    def response_format(self, response_format: dict[str, Any] | None) -> Grammar | None:
        """The grammar for an OpenAI `response_format` (chat) or Responses `text.format`; None for text.

        {"type": "text"} -> None; {"type": "json_object"} -> any object; {"type": "json_schema",
        "json_schema": {"name", "schema", "strict"}} (Responses API: the same fields at the top level).
        Non-strict schemas are still enforced; keywords llguidance cannot enforce are then ignored
        instead of refused."""
        if not response_format:
            return None
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return self.json_object()
        if kind == "json_schema":
            spec = response_format.get("json_schema", response_format)
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None:
                schema = {"type": "object"}
            if not isinstance(schema, dict):
                raise GrammarError("json_schema.schema must be an object")
            return self.json_schema(schema, strict=bool(spec.get("strict", False)))
        raise GrammarError(f"unsupported response_format type {kind!r}")

    def from_spec(self, spec: str) -> Grammar:
        """The grammar a `Grammar.spec` describes (verification and failover replay)."""
        try:
            d = json.loads(spec)
            lib, version, vocab, kind, text = d["library"], d["version"], d["vocab"], d["kind"], d["grammar"]
        except (ValueError, KeyError, TypeError) as exc:
            raise GrammarError(f"malformed grammar spec: {exc}") from exc
        if lib != LIBRARY or version != self.version:
            # Masks of another library version may differ; replaying under ours could blame an honest stage.
            raise GrammarError(f"grammar spec is for {lib} {version}; this node runs {LIBRARY} {self.version}")
        if vocab != self.vocab:
            raise GrammarError("grammar spec was compiled for another vocabulary")
        return self._build(kind, text)

    # ---- internals -----------------------------------------------------------------------------
    def _build(self, kind: str, text: str) -> Grammar:
        import llguidance as llg

        spec = json.dumps({"library": LIBRARY, "version": self.version, "vocab": self.vocab, "kind": kind,
                           "grammar": text}, sort_keys=True, separators=(",", ":"))
        hit = self._cache.get(spec)
        if hit is not None:
            self._cache.move_to_end(spec)
            return hit
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, self._lt)
        if is_error:
            raise GrammarError(messages[0] if messages else "invalid grammar")
        tok = self.tokenizer
        g = Grammar(kind=kind, text=text, spec=spec, digest=hashlib.sha256(spec.encode()).hexdigest(),
                    vocab_size=tok.vocab_size, eos_ids=tuple(tok.eos_ids), _lt=self._lt)
        Matcher(g)  # surfaces errors llguidance only reports when a matcher starts
        self._cache[spec] = g
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return g
