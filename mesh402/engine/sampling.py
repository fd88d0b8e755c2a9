"""Token sampling: penalties, logit bias, a grammar mask, temperature, top-k, top-p, min-p, and a
position-keyed draw.

The random variate for the token at `position` depends only on (seed, position). Any peer that
resumes a generation (failover replay) therefore draws exactly the token the first one would
have, given the same logits (and the same mask, which a grammar matcher rebuilds from the tokens so
far). All math after the logits runs on CPU in float64 on one row with no order-dependent parallel
reductions, so results do not depend on the thread count or on what else is in the batch.

Order of operations on one row: penalties -> logit_bias -> mask (-inf outside it) -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> draw. A request without bias and mask runs exactly the code
it ran before those features existed.

Logprobs (`token_logprobs`) describe the model's own distribution: log-softmax of the raw logits,
before penalties, bias, mask, temperature and truncation, as OpenAI reports them (they do not move
with temperature) and as vLLM does by default. They are then a pure function of the logits the last
stage commits to, so verification can recompute them.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

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
    # OpenAI logit_bias: ((token id, bias in [-100, 100]), ...) sorted by id; a dict is accepted and
    # normalised, so the params stay hashable and serialise the same way on every peer.
    logit_bias: tuple[tuple[int, float], ...] = ()

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
        object.__setattr__(self, "logit_bias", _normalise_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _normalise_bias(value: object) -> tuple[tuple[int, float], ...]:
    """((id, bias), ...) sorted by id from a mapping (JSON keys may be strings) or pairs; validated."""
    items = value.items() if isinstance(value, Mapping) else value
    if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {value!r}")
    out: dict[int, float] = {}
    for pair in items:
        try:
            key, bias = pair
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias entries must be (token id, bias) pairs, got {pair!r}") from None
        try:
            tid = int(key) if isinstance(key, (int, str)) and not isinstance(key, bool) else None
        except ValueError:
            tid = None
        if tid is None or tid < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {tid}")
        out[tid] = float(bias)
    return tuple(sorted(out.items()))


def apply_bias(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`logits` (float64, 1-D, owned by the caller) with the request's logit_bias added in place."""
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        if int(ids[-1]) >= logits.numel():
            raise ValueError(f"logit_bias has token ids outside [0, {logits.numel()})")
        logits[ids] += torch.tensor([b for _, b in params.logit_bias], dtype=torch.float64)
    return logits


def _allowed_ids(allowed: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Ascending ids of the tokens `allowed` (bool [vocab]) lets through; refuses an empty mask."""
    if allowed.dtype != torch.bool or allowed.shape != logits.shape:
        raise ValueError(f"allowed must be a bool tensor of shape {tuple(logits.shape)}")
    ids = torch.nonzero(allowed.to(logits.device)).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("the token mask allows no token")
    return ids


def _penalized(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1 or params.frequency_penalty != 0 or params.presence_penalty != 0


def apply_penalties(logits: torch.Tensor, history: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """Penalized copy of 1-D `logits` for tokens seen in `history` (prompt + generated ids)."""
    out = logits.detach().to("cpu", torch.float64, copy=True).reshape(-1)
    rep, freq, pres = params.repetition_penalty, params.frequency_penalty, params.presence_penalty
    if not history or not _penalized(params):
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
    """The best id, the lowest among ties (torch's argmax returns the first maximum); a NaN anywhere is an
    error: argmax ranks NaN above every number, so one pass finds both (~4x cheaper than a NaN scan, a max
    and a tie search, per row of a batched step)."""
    best = int(logits.argmax())
    if math.isnan(float(logits[best])):
        raise ValueError("logits contain NaN")
    return best


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

    def candidates(self, logits: torch.Tensor, history: Sequence[int] = (),
                   allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, probabilities) the draw chooses from, after penalties, bias, the mask and all filters.

        `allowed`: optional bool [vocab] (e.g. a grammar matcher's mask); tokens outside it cannot be drawn.
        """
        p = self.params
        if p.greedy and allowed is None and not p.logit_bias and not _penalized(p):
            # Plain greedy needs no float64 copy of the row (widening fp32 is exact and keeps the order):
            # the same token, ~0.2 ms less per row, which a batched step pays once per row.
            return torch.tensor([_greedy(logits.detach().reshape(-1))]), torch.ones(1, dtype=torch.float64)
        x = apply_bias(apply_penalties(logits, history, p), p)
        ids = None
        if allowed is not None:
            # Only allowed tokens stay candidates (ascending ids, as the ranking below needs): the
            # draw is the one over the -inf-masked row, without sorting tens of thousands of -infs.
            ids = _allowed_ids(allowed, x)
            x = x[ids]
        if torch.isnan(x).any():
            raise ValueError("logits contain NaN")
        if p.greedy:
            best = _greedy(x)
            return torch.tensor([best if ids is None else int(ids[best])]), torch.ones(1, dtype=torch.float64)
        x = x / p.temperature
        ids = torch.arange(x.numel()) if ids is None else ids
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

    def sample(self, logits: torch.Tensor, history: Sequence[int], position: int,
               allowed: torch.Tensor | None = None) -> int:
        """Token id for `position`; `history` is every id before it (prompt + generated); `allowed` as in
        `candidates`. The variate is the same with or without a mask, so a mask only ever narrows the draw."""
        u = self.uniform(position)  # also validates position
        ids, probs = self.candidates(logits, history, allowed)
        if ids.numel() == 1:
            return int(ids[0])
        cum = torch.cumsum(probs, 0)
        i = int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])], dtype=torch.float64), right=True)[0])
        return int(ids[min(i, ids.numel() - 1)])


@dataclass(frozen=True)
class TokenLogprob:
    """One position's logprob (OpenAI `logprobs.content[i]`): the chosen token and the `top` best."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (id, logprob) best first, ties by lower id


def token_logprobs(logits: torch.Tensor, token: int, top_n: int = 0) -> TokenLogprob:
    """Logprob of `token` and the `top_n` best under the model's raw distribution (see module doc)."""
    if not 0 <= top_n <= 20:
        raise ValueError(f"top_logprobs must be in [0, 20], got {top_n}")
    x = logits.detach().to("cpu", torch.float64).reshape(-1)
    if not 0 <= token < x.numel():
        raise ValueError(f"token {token} outside [0, {x.numel()})")
    top = x.max()
    # log-softmax with a sequential sum (thread-count independent, like _total)
    lse = float(top) + math.log(_total(torch.exp(x - top)))
    best: tuple[tuple[int, float], ...] = ()
    if top_n:
        ids, vals = _by_rank(torch.arange(x.numel()), x, top_n)
        best = tuple((int(i), float(v) - lse) for i, v in zip(ids, vals))
    return TokenLogprob(int(token), float(x[token]) - lse, best)


def choice_seeds(seed: int, n: int) -> list[int]:
    """Seeds for `n` independent choices of one request (OpenAI `n`): choice 0 keeps the request's seed,
    so n=1 and the first of n choices give the same answer; choice i > 0 gets a 63-bit seed hashed from
    (seed, i). Each choice is then its own (seed, position)-keyed stream, reproducible from the request."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    out = [seed]
    for i in range(1, n):
        digest = hashlib.blake2b(f"choice:{seed}:{i}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") >> 1)
    return out


# ---- what a sampling stage is told, and what it answers ------------------------------------------
# A session's decoding goes to the last stage of a split (in the host's signed OPEN grant) and into the
# sampling evidence as one JSON object: the SamplingParams fields, plus "grammar" (a Grammar.spec: the
# draw is masked by it) and "top_logprobs" (the stage returns logprobs) only when the request uses them,
# so an unconstrained request's evidence is what it was before either existed.
MAX_TOP_LOGPROBS = 20
MAX_GRAMMAR_SPEC = 1024 * 1024  # fits a stage's OPEN grant (2 MiB)


def decoding_json(params: SamplingParams, grammar: str = "", top_logprobs: int | None = None) -> dict[str, object]:
    """The JSON object of a session's decoding (see above)."""
    out: dict[str, object] = {**asdict(params), "logit_bias": [list(p) for p in params.logit_bias]}
    if grammar:
        out["grammar"] = grammar
    if top_logprobs is not None:
        out["top_logprobs"] = int(top_logprobs)
    return out


def parse_decoding(d: Mapping[str, object]) -> tuple[SamplingParams, str, int | None]:
    """(params, grammar spec or "", top_logprobs or None) from `decoding_json`'s object; ValueError if malformed."""
    if not isinstance(d, Mapping):
        raise ValueError("sampling must be a JSON object")
    rest = dict(d)
    grammar = rest.pop("grammar", "") or ""
    top = rest.pop("top_logprobs", None)
    if not isinstance(grammar, str) or len(grammar) > MAX_GRAMMAR_SPEC:
        raise ValueError("grammar must be a spec string of at most 1 MiB")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    try:
        params = SamplingParams(**rest)  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError(f"bad sampling parameters: {e}") from None
    return params, grammar, top



def logprob_record(lp: TokenLogprob) -> list[object]:
    """A TokenLogprob as compact JSON ([token, logprob, [[id, logprob], ...]]): what the last stage returns
    and commits to (`logprob_bytes`)."""
    return [lp.token, lp.logprob, [[i, v] for i, v in lp.top]]


def logprob_bytes(lp: TokenLogprob) -> bytes:
    """Canonical bytes of a TokenLogprob (floats as repr), for the last stage's per-step commitment."""
    return json.dumps(logprob_record(lp), separators=(",", ":")).encode()


def logprob_from_record(rec: object, vocab_size: int, top_n: int) -> TokenLogprob:
    """A TokenLogprob from a peer's `logprob_record` (untrusted: shape, ids, counts and values checked)."""
    try:
        token, value, top = rec  # type: ignore[misc]
        pairs = [(int(i), float(v)) for i, v in top]
        token, value = int(token), float(value)
    except (TypeError, ValueError):
        raise ValueError("malformed logprobs") from None
    if len(pairs) != top_n or not 0 <= token < vocab_size:
        raise ValueError(f"logprobs must name {top_n} top tokens and a token in the vocabulary")
    for i, v in [(token, value), *pairs]:
        if not 0 <= i < vocab_size or not (math.isfinite(v) or v == -math.inf) or v > 1e-6:
            raise ValueError("logprobs must be finite values <= 0 for tokens in the vocabulary")
    return TokenLogprob(token, value, tuple(pairs))
