"""GET /api/money: the console's Money and trust view, from what this node already records.

- what it sells (mode and prices, the asset and where payments go) and the chain's block explorer;
- the seller's ledger (`economics/ledger.py`): revenue, credit, recent settlements with their tx hashes,
  credit accounts;
- a paid entry's receipts per epoch, payouts and spot-check outcomes (`earnings.py`).

Escrow vouchers, stake and slashes are not recorded by this version: the page shows them from
`/api/status` (`node.economics`), where null means "not reported" (docs/console.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mesh402.api.management.earnings import earnings
from mesh402.api.payment_policy import PaymentPolicy, X402Policy
from mesh402.economics.networks import explorer_for

RECENT = 50  # settlements and accounts listed


def money_view(payments: PaymentPolicy, home: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": getattr(payments, "mode", "free"), "charges": payments.charges, "offer": None,
                           "asset": None, "explorer": "", "ledger": None, "settlements": [], "accounts": []}
    if isinstance(payments, X402Policy):
        gate = payments.gate
        offer = gate.offer()
        asset = gate.asset
        out.update(offer={"per_request": offer.per_request, "per_1k_tokens": offer.per_1k, "topup": offer.topup,
                          "pay_to": offer.pay_to},
                   asset={"network": asset.network, "address": asset.address, "symbol": asset.symbol,
                          "decimals": asset.decimals},
                   explorer=explorer_for(asset.network), ledger=gate.ledger.summary(),
                   settlements=gate.ledger.recent_payments(RECENT), accounts=gate.ledger.accounts(RECENT))
    out.update(earnings(home))
    return out
