"""The smart router at the API edge (`model: "auto"` or no model): gathers the mesh's models
(local ones and routes from gossip, with metadata the hosts announce), asks the pure policy in
mesh402.routing, and remembers observed speed and load. The answer carries `x-mesh402-route`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

from mesh402 import labels as L
from mesh402.routing.affinity import ReplicaPicker, prefix_key
from mesh402.routing.classify import Classification, classify
from mesh402.routing.models import Candidate, ModelFacts, ModelScore, rank_models

MODEL_LABEL = L.MODEL_LABEL  # announcement label: model:<id> -> {"ctx","params","tags","tools","tok_s"}


def facts_from_label(model_id: str, raw: Optional[str]) -> ModelFacts:
    """A host's `model:*` label, parsed by its schema (a malformed one says nothing)."""
    f = L.model_facts(raw)
    return ModelFacts(model_id, f.ctx, f.params, frozenset(f.tags), f.tools)


@dataclass
class RouteDecision:
    model_id: str
    node: str  # "local" or a node id hex
    cls: Classification
    ranked: list[ModelScore]
    decide_us: float

    def header(self) -> str:
        best = self.ranked[0]
        alt = f"; next={self.ranked[1].candidate.facts.model_id}:{self.ranked[1].score:g}" if len(self.ranked) > 1 else ""
        return (f"class={self.cls.label()}; score={best.score:g}; why={', '.join(best.why)}{alt}")


class Router:
    def __init__(self) -> None:
        self.inflight: Counter = Counter()  # (model, node) -> requests in flight from this node
        self.speed: dict[str, float] = {}  # model -> EMA of tokens/s measured where it ran (here)
        self.picker = ReplicaPicker()
        self.decisions = 0
        self.decide_us_total = 0.0

    # ------------------------------------------------------------ observations

    def observe(self, model_id: str, tokens: int, seconds: float) -> None:
        if tokens < 2 or seconds <= 0:
            return
        v = tokens / seconds
        old = self.speed.get(model_id)
        self.speed[model_id] = v if old is None else 0.7 * old + 0.3 * v

    def label_for(self, model_id: str, profile: dict[str, Any]) -> str:
        d = dict(profile)
        if model_id in self.speed:
            d["tok_s"] = round(self.speed[model_id], 1)
        return json.dumps(d, separators=(",", ":"), sort_keys=True)

    # ------------------------------------------------------------ decision

    def candidates(self, local: list[tuple[str, dict[str, Any]]], remote: list[tuple[str, str, Optional[str]]]
                   ) -> list[Candidate]:
        """local: (model id, profile); remote: (model id, host node id, announced label JSON)."""
        out = []
        seen = set()
        for model_id, prof in local:
            f = ModelFacts(model_id, int(prof.get("ctx", 0)), int(prof.get("params", 0)),
                           frozenset(prof.get("tags", [])), bool(prof.get("tools")))
            out.append(Candidate(f, "local", self.speed.get(model_id), self.inflight[(model_id, "local")]))
            seen.add(model_id)
        for model_id, host, raw in remote:
            if model_id in seen:
                continue
            out.append(Candidate(facts_from_label(model_id, raw), host, L.model_facts(raw).tok_s,
                                 self.inflight[(model_id, host)]))
        return out

    def decide(self, messages: list[dict[str, Any]], tools: Any, cands: list[Candidate],
               prompt_tokens: int = 0) -> Optional[RouteDecision]:
        t0 = time.perf_counter()
        cls = classify(messages, tools)
        ranked = rank_models(cands, cls, prompt_tokens or cls.prompt_chars // 4)
        us = (time.perf_counter() - t0) * 1e6
        self.decisions += 1
        self.decide_us_total += us
        if not ranked:
            return None
        best = ranked[0].candidate
        return RouteDecision(best.facts.model_id, best.node, cls, ranked, us)

    @staticmethod
    def prefix(model_id: str, messages: list[dict[str, Any]], tools: Any) -> str:
        return prefix_key(model_id, messages, tools)

    def status(self) -> dict[str, Any]:
        return {"decisions": self.decisions,
                "decide_us_mean": (self.decide_us_total / self.decisions) if self.decisions else None,
                "speed_tok_s": {k: round(v, 1) for k, v in self.speed.items()},
                "affinity_entries": len(self.picker.table), "affinity_hits": self.picker.table.hits}
