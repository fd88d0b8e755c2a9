"""What this node's API edge served, for the console's Traffic view: requests/s, tok/s and TTFT per model
and serving node, requests in flight per model, and the latest requests.

Everything is bounded: a fixed window of per-second buckets per (model, node), a fixed number of such
pairs (the rest are summed under "(other)"), a fixed number of TTFT samples and recent requests. Prompt
text is kept only while the operator has turned it on (`show_prompts`), cut to `PROMPT_CHARS`: by
default nothing a client wrote is stored. Fed by `api/meter.py`; one event loop writes and reads it.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from mesh402.clock import Clock, SystemClock

WINDOW_S = 60  # rates are averaged over the last minute
MAX_KEYS = 256  # (model, node) pairs with their own row
MAX_MODELS = 256  # models with their own in-flight count
RECENT = 100  # latest requests listed
TTFT_SAMPLES = 256  # per (model, node) pair
PROMPT_CHARS = 200
OTHER = "(other)"
SELF = "self"  # the node whose edge this is


@dataclass
class Served:
    """One request the edge answered (or refused)."""

    request_id: str
    ts: float  # wall clock at arrival
    path: str
    requested: str  # the model the client named ("auto" included), cut short
    model: str  # the model that answered ("" when none did)
    node: str  # SELF, or the node id (prefix) that served it through the mesh
    entry: str  # "client", or the peer whose entry node tunnelled it here
    stream: bool
    status: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None  # streams: arrival to the first content chunk
    total_ms: float = 0.0
    prompt: str | None = None  # only while show_prompts is on


@dataclass
class _Series:
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    buckets: collections.deque[list[int]] = field(default_factory=lambda: collections.deque(maxlen=WINDOW_S + 1))
    ttft_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=TTFT_SAMPLES))

    def add(self, second: int, tokens: int, error: bool, ttft_ms: float | None) -> None:
        self.requests += 1
        self.errors += int(error)
        self.tokens += tokens
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += 1
            self.buckets[-1][2] += tokens
        else:
            self.buckets.append([second, 1, tokens])
        if ttft_ms is not None:
            self.ttft_ms.append(ttft_ms)

    def rates(self, now: int) -> tuple[float, float]:
        """(requests/s, tokens/s) over the last WINDOW_S seconds."""
        recent = [b for b in self.buckets if now - b[0] < WINDOW_S]
        return sum(b[1] for b in recent) / WINDOW_S, sum(b[2] for b in recent) / WINDOW_S


def _pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    if len(samples) == 1:
        return round(samples[0], 1)
    return round(statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1], 1)


class Traffic:
    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self.show_prompts = False
        self.started_at = self.clock.time()
        self.inflight: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[Served] = collections.deque(maxlen=RECENT)
        self._series: dict[tuple[str, str], _Series] = {}

    def begin(self, model: str) -> str:
        """A request for `model` arrived; returns the key to `end` it with (bounded: unknown names share one)."""
        key = model if model in self.inflight or len(self.inflight) < MAX_MODELS else OTHER
        self.inflight[key] += 1
        return key

    def end(self, key: str) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    def record(self, s: Served) -> None:
        if not self.show_prompts:
            s.prompt = None
        elif s.prompt is not None:
            s.prompt = s.prompt[:PROMPT_CHARS]
        self.recent.append(s)
        key = (s.model or OTHER, s.node)
        if key not in self._series and len(self._series) >= MAX_KEYS:
            key = (OTHER, OTHER)
        series = self._series.setdefault(key, _Series())
        series.add(int(self.clock.time()), s.completion_tokens or 0, s.status >= 400, s.ttft_ms)

    def view(self) -> dict[str, Any]:
        """The Traffic view: per (model, node) rows, per-model totals, in flight, the latest requests."""
        now = int(self.clock.time())
        rows = []
        models: dict[str, dict[str, Any]] = {}
        for (model, node), s in sorted(self._series.items()):
            rps, tps = s.rates(now)
            ttft = list(s.ttft_ms)
            rows.append({"model": model, "node": node, "requests": s.requests, "errors": s.errors, "tokens": s.tokens,
                         "rps": round(rps, 3), "tok_s": round(tps, 2), "ttft_p50_ms": _pct(ttft, 50),
                         "ttft_p95_ms": _pct(ttft, 95)})
            m = models.setdefault(model, {"model": model, "requests": 0, "errors": 0, "tokens": 0, "rps": 0.0,
                                          "tok_s": 0.0, "ttft": []})
            m["requests"] += s.requests
            m["errors"] += s.errors
            m["tokens"] += s.tokens
            m["rps"] += rps
            m["tok_s"] += tps
            m["ttft"] += ttft
        per_model = []
        for m in models.values():
            ttft = m.pop("ttft")
            per_model.append({**m, "rps": round(m["rps"], 3), "tok_s": round(m["tok_s"], 2),
                              "ttft_p50_ms": _pct(ttft, 50), "ttft_p95_ms": _pct(ttft, 95),
                              "in_flight": self.inflight.get(m["model"], 0)})
        return {"window_s": WINDOW_S, "show_prompts": self.show_prompts, "since": self.started_at,
                "in_flight": dict(self.inflight), "queue_depth": sum(self.inflight.values()),
                "models": per_model, "rows": rows, "recent": [asdict(s) for s in reversed(self.recent)]}
