"""Score the mesh's models for a classified request.

Inputs are model facts from metadata (context length, parameter count, capability tags from
the GGUF ``general.tags``, tool support from the chat template), what this node observed
(tokens per second) and current load. Never model-name patterns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mesh402.routing.classify import Classification

# which metadata tags speak for which request category
CATEGORY_TAGS: dict[str, frozenset[str]] = {
    "code": frozenset({"code", "coder", "coding", "programming", "software"}),
    "reasoning": frozenset({"reasoning", "math", "logic", "thinking"}),
    "creative": frozenset({"creative", "writing", "roleplay", "storytelling"}),
    "tool_call": frozenset({"tools", "function-calling", "agent", "tool-use"}),
    "info": frozenset({"instruct", "chat", "general", "knowledge"}),
    "chat": frozenset({"chat", "instruct", "conversational", "general"}),
}


@dataclass(frozen=True)
class ModelFacts:
    """What metadata says about a model (same for every replica)."""

    model_id: str
    context_length: int = 0
    n_params: int = 0
    tags: frozenset[str] = frozenset()
    tools: bool = False  # the chat template renders tool definitions

    @property
    def tier(self) -> int:
        """Quality tier from size: 0 < 1B <= 1 < 8B <= 2 < 30B <= 3."""
        p = self.n_params
        return 0 if p < 1e9 else 1 if p < 8e9 else 2 if p < 30e9 else 3


@dataclass(frozen=True)
class Candidate:
    facts: ModelFacts
    node: str  # where it is served (node id hex, or "local")
    tok_s: float | None = None  # observed decode speed, None when unmeasured
    inflight: int = 0  # requests this node has in flight to it now


@dataclass(frozen=True)
class ModelScore:
    score: float
    candidate: Candidate
    why: tuple[str, ...] = field(default=())


def score_model(c: Candidate, cls: Classification, prompt_tokens: int = 0) -> ModelScore | None:
    """None when the model cannot take the request (no tool support for a tool call, context too small)."""
    f = c.facts
    why: list[str] = []
    if cls.needs_tools and not f.tools:
        return None
    if f.context_length and prompt_tokens and prompt_tokens >= f.context_length:
        return None
    s = 0.0
    hit = sorted(CATEGORY_TAGS.get(cls.category, frozenset()) & f.tags)
    if hit:
        s += 0.5 if cls.category in ("chat", "info") else 4.0  # a specialist matters; "chat" tags barely
        why.append(f"tags fit {cls.category} ({','.join(hit)})")
    elif cls.category != "chat" and any(f.tags & t for k, t in CATEGORY_TAGS.items()
                                        if k not in (cls.category, "chat", "info")):
        s -= 1.0  # a specialist for something else
        why.append("specialist elsewhere")
    if cls.needs_tools:
        s += 1.0
        why.append("tools ok")
    # size / quality: deep work wants the big tier, quick work the fast one
    weight = {"deep": 1.5, "moderate": 0.75, "quick": -0.25}[cls.complexity]
    s += weight * f.tier + 0.1 * weight * math.log10(max(f.n_params, 1e6) / 1e6)
    why.append(f"tier {f.tier}")
    if f.context_length:
        s += 0.2 * min(math.log2(max(f.context_length, 1024) / 1024), 5) / 5
    speed = 25.0 if c.tok_s is None else min(max(c.tok_s, 1.0), 200.0)
    s += (1.0 if cls.complexity == "quick" else 0.5) * math.log10(speed) / 2
    why.append(f"{speed:.0f} tok/s{'?' if c.tok_s is None else ''}")
    if c.inflight:
        s -= 0.5 * c.inflight
        why.append(f"load {c.inflight}")
    return ModelScore(round(s, 3), c, tuple(why))


def rank_models(cands: list[Candidate], cls: Classification, prompt_tokens: int = 0) -> list[ModelScore]:
    """Best first; ties: fewer in flight, then model id, then node id (deterministic)."""
    scored = [s for c in cands if (s := score_model(c, cls, prompt_tokens)) is not None]
    if not scored and cls.needs_tools:  # nobody renders tools: fall back to any model
        scored = [s for c in cands if (s := score_model(c, Classification(cls.category, cls.complexity, False,
                                                                          cls.prompt_chars), prompt_tokens))]
    return sorted(scored, key=lambda s: (-s.score, s.candidate.inflight, s.candidate.facts.model_id, s.candidate.node))
