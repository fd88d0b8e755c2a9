"""Lossless speculative decoding: drafts verified in one batched forward, accepted while the sampler agrees.

A draft proposes the next k tokens; the model runs the last sampled token and the k drafts as k+1 rows of one
step (``Engine.decode_batch``: every row bit-identical to the 1-row decode it stands for), and each row's
logits are sampled exactly as plain decoding samples that position ((seed, position)-keyed draws over the same
history). Drafts are accepted while the draw equals them; the first draw that differs (or the draw after the
last draft) is the next token, and the KV past the accepted rows is rolled back. So the output is plain
decoding's, token for token, greedy or sampled; only the number of forwards changes.

Drafts here: prompt lookup (n-gram): the continuation of the latest earlier occurrence of the history's last
n tokens (no second model).

How many drafts to verify is adaptive (:class:`DraftPolicy`): a verify row is not free (on 2 CPU cores a
5-row step costs ~2.2 one-row steps), so drafts that are mostly refused make decoding slower than plain. Each
request estimates its own acceptance rate from the drafts it verified, and from a shadow draft checked against
the token drawn while it is not drafting, and drafts the number with the most expected tokens per unit of
step cost (zero when none pays).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DraftPolicy", "best_draft_len", "default_row_cost", "ngram_draft"]

# Extra cost of one more row in a decode step, as a fraction of a 1-row step (measured with
# benchmarks/batching.py's engine-step rows, bundled model, 2 threads): fast mode's packed kernels are
# compute-bound from ~4 rows (W=8 ~3.1x W=1); exact mode shares the dequantization that dominates its step
# (W=8 ~1.7x W=1); a GPU decode step is bound by reading the weights, so rows are nearly free.
_ROW_COST = {("cpu", "fast"): 0.3, ("cpu", "exact"): 0.1}
_ROW_COST_GPU = 0.05


def default_row_cost(device: str, mode: str) -> float:
    """The marginal cost of a verify row on this kind of device and mode (see _ROW_COST)."""
    return _ROW_COST.get((device, mode), 0.3) if device == "cpu" else _ROW_COST_GPU


def best_draft_len(acceptance: float, row_cost: float, k_max: int) -> int:
    """The draft count k in [0, k_max] with the most expected tokens per step cost: a step of k drafts yields
    1 + a + ... + a^k tokens (each draft accepted with probability a once the one before it was) and costs
    1 + row_cost * k one-row steps. 0 when no k beats plain decoding."""
    a = min(max(acceptance, 0.0), 1.0)
    best, best_rate = 0, 1.0
    for k in range(1, k_max + 1):
        tokens = float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
        rate = tokens / (1.0 + row_cost * k)
        if rate > best_rate * (1.0 + 1e-9):
            best, best_rate = k, rate
    return best


@dataclass
class DraftPolicy:
    """One request's draft length: its acceptance rate as a decaying count of draft trials (a draft is a
    trial while every draft before it in its step was accepted), the count :func:`best_draft_len` picks.
    The prior (2 accepted, 1 refused) makes a new request try drafting."""

    k_max: int
    row_cost: float
    decay: float = 0.9  # per trial: the estimate follows the last ~10 trials (text changes character)
    hits: float = 2.0
    misses: float = 1.0
    one_row_s: float | None = None  # a 1-row step's time, when steps are timed (timed)
    shadow: int | None = None  # the one-token draft of a step that sent none, checked against the draw

    @classmethod
    def for_engine(cls, k_max: int, engine: object, row_cost: float | None = None) -> "DraftPolicy":
        """A request's policy on `engine`, the row cost by its device and mode unless given."""
        device = getattr(getattr(engine, "device", None), "type", "cpu")
        cost = row_cost if row_cost is not None else default_row_cost(device, str(getattr(engine, "mode", "fast")))
        return cls(k_max, cost)

    def propose(self, history: Sequence[int], room: int) -> list[int]:
        """The drafts to send after `history` (which ends with the token to feed), at most `room`: as many as
        pay, by prompt lookup. When none pay, a one-token shadow draft is kept to learn from (settle)."""
        k = min(self.k(), room)
        if k > 0:
            self.shadow = None
            return ngram_draft(history, k)
        shadow = ngram_draft(history, 1)
        self.shadow = shadow[0] if shadow else None
        return []

    def settle(self, drafted: int, accepted: int, drawn: int) -> None:
        """A step ended: `accepted` of its `drafted` drafts kept, `drawn` the first token drawn (which a
        shadow draft is checked against)."""
        if drafted:
            self.observe(drafted, accepted)
        elif self.shadow is not None:
            self.observe(1, int(drawn == self.shadow))
        self.shadow = None

    @property
    def acceptance(self) -> float:
        return self.hits / (self.hits + self.misses)

    def observe(self, drafted: int, accepted: int) -> None:
        """`accepted` of `drafted` drafts were accepted, in order (a shadow draft: drafted = 1)."""
        if drafted <= 0 or not 0 <= accepted <= drafted:
            return
        missed = 1 if accepted < drafted else 0
        w = self.decay ** (accepted + missed)
        self.hits = self.hits * w + accepted
        self.misses = self.misses * w + missed

    def timed(self, rows: int, seconds: float) -> None:
        """A step of `rows` rows took `seconds` (a round trip through a split's stages): the row cost follows
        what the steps cost here, where a fixed network delay makes an extra row relatively cheaper."""
        if rows < 1 or not seconds > 0:
            return
        if rows == 1:
            self.one_row_s = seconds if self.one_row_s is None else 0.8 * self.one_row_s + 0.2 * seconds
        elif self.one_row_s is not None:
            cost = min(max((seconds / self.one_row_s - 1.0) / (rows - 1), 0.0), 4.0)
            self.row_cost = 0.8 * self.row_cost + 0.2 * cost

    def k(self) -> int:
        return best_draft_len(self.acceptance, self.row_cost, self.k_max) if self.k_max > 0 else 0


def ngram_draft(history: Sequence[int], k: int, max_n: int = 3, window: int = 4096) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n (max_n..1) tokens of
    ``history`` (searched over its last ``window`` tokens); [] when none."""
    if k < 1 or len(history) < 2:
        return []
    h = list(history[-window:])
    for n in range(min(max_n, len(h) - 1), 0, -1):
        tail = h[-n:]
        for i in range(len(h) - n - 1, -1, -1):  # latest earlier occurrence first
            if h[i:i + n] == tail:
                return h[i + n:i + n + k]
    return []
