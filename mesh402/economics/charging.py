"""The charging core of x402 at a node, without HTTP types: header names, the credit-claim message, and
pricing (what a request costs, how long its authorization must stay valid, what the node offers the mesh).
The HTTP edge (402 answers, verification, settlement around a request) is mesh402.api.x402.gate."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from mesh402.economics.networks import Asset
from mesh402.settings import PaymentsConfig

CREDIT_HEADER = "X-Mesh402-Credit"  # request: a credit token to spend
CREDIT_TOKEN_HEADER = "X-Mesh402-Credit-Token"  # response: token for the credit this payment bought
CREDIT_BALANCE_HEADER = "X-Mesh402-Credit-Balance"
CREDIT_CHARGED_HEADER = "X-Mesh402-Credit-Charged"
REPLAY_HEADER = "X-Mesh402-Replayed"
VOUCHER_HEADER = "X-Mesh402-Voucher"  # tunnelled request: an escrow voucher paying the host (entry and host --escrow)
VOUCHER_EARNED_HEADER = "X-Mesh402-Voucher-Earned"  # response: what the host earned from the entry's routed requests
BILLING_HEADER = "X-Mesh402-Billing"  # on 402s of a metered node: "metered" (credit can be claimed)
CLAIM_WINDOW_S = 300  # a wallet-signed credit-token claim is good for this long (and once: its nonce)
CLAIM_NONCE_RE = r"[0-9a-f]{32}"  # 16 random bytes, hex
IDEMPOTENCY_HEADER = "Idempotency-Key"

# Generation speed assumed until this node has measured its own (tokens per second, per model).
DEFAULT_DECODE_TPS = 4.0
DEFAULT_PREFILL_TPS = 40.0
WINDOW_SAFETY = 2.0  # the window allows twice the estimated generation time
MAX_WINDOW_S = 3600

OFFER_LABEL = "x402"  # announcement label of a node that sells inference: its HostOffer as JSON
MAX_PRICE = 10**18  # atomic units; a label beyond this is not a price anyone pays
# Prompt tokens are bounded by the request's bytes; the chat template adds a little.
TEMPLATE_TOKENS = 256


def credit_claim_message(pay_to: str, timestamp: int, nonce: str) -> str:
    """What a wallet signs to claim a token for its credit at the node paid through `pay_to`. The nonce
    (fresh per claim, CLAIM_NONCE_RE) makes a claim good once: a copied claim is refused, not replayed."""
    return f"mesh402 credit claim\nnode: {pay_to.lower()}\ntime: {timestamp}\nnonce: {nonce}"


def b64json(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode()


@dataclass(frozen=True)
class HostOffer:
    network: str
    asset: str
    pay_to: str
    per_request: int = 0
    per_1k: int = 0
    topup: int = 0  # metered host: the smallest credit purchase

    @property
    def charges(self) -> bool:
        return self.per_request > 0 or self.per_1k > 0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        return self.per_request + -(-(prompt_tokens + completion_tokens) * self.per_1k // 1000)

    def most(self, body_bytes: int, max_tokens: int) -> int:
        """The most one request of this size can cost at this host (what a voucher prepays)."""
        return self.cost(body_bytes + TEMPLATE_TOKENS, max_tokens)

    def cap(self, body_bytes: int, max_tokens: int) -> int:
        """The most this host can ask for one request of this size (what the entry prices in)."""
        cost = self.most(body_bytes, max_tokens)
        return max(cost, self.topup) if self.per_1k else cost

    def to_label(self) -> str:
        return json.dumps({"network": self.network, "asset": self.asset, "pay_to": self.pay_to,
                           "per_request": self.per_request, "per_1k": self.per_1k, "topup": self.topup},
                          separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_label(cls, value: str | None) -> "HostOffer | None":
        """A peer's offer label, validated (untrusted input): None when absent or malformed."""
        if not value or len(value) > 1024:
            return None
        try:
            d = json.loads(value)
            offer = cls(str(d["network"])[:64], str(d["asset"])[:64], str(d["pay_to"])[:64],
                        int(d.get("per_request", 0)), int(d.get("per_1k", 0)), int(d.get("topup", 0)))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if not all(0 <= v <= MAX_PRICE for v in (offer.per_request, offer.per_1k, offer.topup)):
            return None
        return offer


class Pricing:
    """A node's prices (atomic units of its asset) and the authorization window they imply."""

    def __init__(self, cfg: PaymentsConfig, asset: Asset) -> None:
        self.cfg = cfg
        self.asset = asset
        self.speed: dict[str, tuple[float, float]] = {}  # model -> (prefill tok/s, decode tok/s)

    @property
    def metered(self) -> bool:
        return self.cfg.price_per_1k_tokens > 0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Atomic units for one request: the per-request price plus tokens at the per-1k rate (rounded up)."""
        tokens = prompt_tokens + completion_tokens
        return self.cfg.price_per_request + -(-tokens * self.cfg.price_per_1k_tokens // 1000)

    def topup_amount(self, prompt_tokens: int, max_tokens: int, extra: int = 0) -> int:
        return max(self.cfg.credit_topup, self.cost(prompt_tokens, max_tokens) + extra)

    def offer(self) -> HostOffer:
        """What this node sells, as its announcement tells the mesh (an entry prices routed requests by it)."""
        return HostOffer(self.asset.network, self.asset.address, self.cfg.pay_to or "",
                         self.cfg.price_per_request, self.cfg.price_per_1k_tokens, self.cfg.credit_topup)

    def window_s(self, model_id: str, prompt_tokens: int, max_tokens: int) -> int:
        """Seconds the authorization must stay valid: a long answer on a slow node is still settleable."""
        prefill, decode = self.speed.get(model_id, (DEFAULT_PREFILL_TPS, DEFAULT_DECODE_TPS))
        est = prompt_tokens / prefill + max_tokens / decode
        return int(min(MAX_WINDOW_S, self.cfg.window_base_s + WINDOW_SAFETY * est))

    def observe(self, model_id: str, fin: Any) -> None:
        """Update the measured speed (EWMA) from a finished generation."""
        try:
            ttft, total = float(fin.ttft_s), float(fin.total_s)
            if fin.completion_tokens < 4 or total <= ttft or ttft <= 0:
                return
            pre = fin.prompt_tokens / ttft
            dec = (fin.completion_tokens - 1) / (total - ttft)
        except (AttributeError, TypeError, ZeroDivisionError):
            return
        old = self.speed.get(model_id)
        self.speed[model_id] = (pre, dec) if old is None else (0.7 * old[0] + 0.3 * pre, 0.7 * old[1] + 0.3 * dec)
