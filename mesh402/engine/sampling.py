"""Token sampling: penalties, temperature, top-k, top-p, min-p, and a position-keyed draw.

The random variate for the token at `position` depends only on (seed, position). Any peer that
resumes a generation (failover replay) therefore draws exactly the token the first one would
have, given the same logits. All math after the logits runs on CPU in float64 with no
order-dependent parallel reductions, so results do not depend on the thread count.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_SORT_WINDOW = 1024  # top-p first looks for its nucleus among this many best tokens


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/llama.cpp style, 1 = off
    frequency_penalty: float = 0.0  # OpenAI style, subtracted per occurrence
    presence_penalty: float = 0.0  # OpenAI style, subtracted once
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "a finite number")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits: torch.Tensor, history: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """Penalized copy of 1-D `logits` for tokens seen in `history` (prompt + generated ids)."""
    out = logits.detach().to("cpu", torch.float64, copy=True).reshape(-1)
    rep, freq, pres = params.repetition_penalty, params.frequency_penalty, params.presence_penalty
    if not history or (rep == 1 and freq == 0 and pres == 0):
        return out
    ids = torch.as_tensor(list(history), dtype=torch.long)
    if ids.min() < 0 or ids.max() >= out.numel():
        raise ValueError(f"history has token ids outside [0, {out.numel()})")
    seen, counts = torch.unique(ids, return_counts=True)
    vals = out[seen]
    if rep != 1:  # shrink toward zero: divide positive logits, multiply negative ones
        vals = torch.where(vals > 0, vals / rep, vals * rep)
    out[seen] = vals - counts.to(torch.float64) * freq - pres
    return out


def _total(weights: torch.Tensor) -> float:
    # A sequential scan, unlike sum(), whose parallel chunking (and rounding) varies with threads.
    return float(torch.cumsum(weights, 0)[-1])


def _greedy(logits: torch.Tensor) -> int:
    best = logits.max()
    return int(torch.nonzero(logits == best)[0, 0])  # lowest id among ties


def _by_rank(ids: torch.Tensor, vals: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `limit` best (ids, vals) ordered by value desc then id asc; `ids` must be ascending.

    Only tokens tied with or above the limit-th value get sorted, which keeps big vocabularies cheap.
    """
    if limit < vals.numel():
        keep = vals >= torch.topk(vals, limit, sorted=False).values.min()
        ids, vals = ids[keep], vals[keep]
    order = torch.sort(vals, descending=True, stable=True).indices[:limit]
    return ids[order], vals[order]


class Sampler:
    """Draws one token per call. Stateless apart from `seed`, so calls may come in any order."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)

    def uniform(self, position: int) -> float:
        """U[0, 1) for `position`, from a fresh generator keyed by hash(seed, position)."""
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"position must be an integer >= 0, got {position!r}")
        digest = hashlib.blake2b(f"{self.seed}:{position}".encode(), digest_size=8).digest()
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)
        return float(torch.rand((), generator=gen, dtype=torch.float64))

    def candidates(self, logits: torch.Tensor, history: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, probabilities) the draw chooses from, after penalties and all filters."""
        p = self.params
        x = apply_penalties(logits, history, p)
        if torch.isnan(x).any():
            raise ValueError("logits contain NaN")
        if p.greedy:
            return torch.tensor([_greedy(x)]), torch.ones(1, dtype=torch.float64)
        x = x / p.temperature
        ids = torch.arange(x.numel())
        if p.top_k:
            ids, x = _by_rank(ids, x, p.top_k)
        top = x.max()
        if not math.isfinite(float(top)):
            raise ValueError("no token has a finite logit")
        if p.top_p < 1:
            ids, x = self._nucleus(ids, x, top, ranked=p.top_k > 0)
        if p.min_p > 0:  # p_i >= min_p * p_max, compared in log space
            keep = x >= top + math.log(p.min_p)
            ids, x = ids[keep], x[keep]
        probs = torch.exp(x - top)
        return ids, probs / _total(probs)

    def _nucleus(self, ids: torch.Tensor, x: torch.Tensor, top: torch.Tensor, ranked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest best-first prefix whose probability reaches top_p."""
        total = _total(torch.exp(x - top))
        window = x.numel() if ranked else min(x.numel(), _SORT_WINDOW)
        while True:
            r_ids, r_x = (ids, x) if ranked else _by_rank(ids, x, window)
            w = torch.exp(r_x - top) / total
            before = torch.cumsum(w, 0) - w  # mass strictly ahead of each token
            n = max(1, int((before < self.params.top_p).sum()))
            if n < r_x.numel() or window >= x.numel():
                return r_ids[:n], r_x[:n]
            window = x.numel()  # nucleus did not fit in the window: rank everything

    def sample(self, logits: torch.Tensor, history: Sequence[int], position: int) -> int:
        """Token id for `position`; `history` is every id before it (prompt + generated)."""
        u = self.uniform(position)  # also validates position
        ids, probs = self.candidates(logits, history)
        if ids.numel() == 1:
            return int(ids[0])
        cum = torch.cumsum(probs, 0)
        i = int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])], dtype=torch.float64), right=True)[0])
        return int(ids[min(i, ids.numel() - 1)])
