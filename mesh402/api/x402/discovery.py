"""GET /.well-known/x402: what this node sells, so a buying agent picks a seller without trial and error.

The shape follows x402's discovery list (the Bazaar `discovery/resources` answer): `x402Version`, `items`
(one per paid resource: `resource` URL, `type: "http"`, `accepts` with the same `PaymentRequirements` a
402 from that resource carries, `lastUpdated`, `metadata`). mesh402 puts the per-model price table in each
item's `metadata.models`: id, state, `pricePerRequest` and `pricePer1kTokens` (atomic units of the asset),
the node that generates, and whether the mesh can spot-check it (`verified`). A model routed to a host that
charges costs this node's price plus the host's announced offer (what the entry passes on, at most).

`accepts[0].amount` is what the first 402 asks: the per-request price, or on a metered node the smallest
credit purchase. Public like /health (a price list is no secret); a node that does not charge answers 404.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mesh402.api.errors import APIError
from mesh402.api.forwarding import host_offer

if TYPE_CHECKING:
    from mesh402.api.context import EdgeContext
    from mesh402.api.x402.gate import PaymentGate

DISCOVERY_PATH = "/.well-known/x402"
RESOURCES = (("/v1/chat/completions", "OpenAI-compatible chat completions (streaming with stream: true)"),
             ("/v1/completions", "OpenAI-compatible text completions"))


def model_prices(ctx: "EdgeContext", gate: "PaymentGate", models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    own = gate.offer()
    me = ctx.distributed.mesh.node_id.hex() if ctx.distributed is not None else None
    rows = []
    for m in models:
        per_request, per_1k = own.per_request, own.per_1k
        host = m.get("host") if m.get("host") != me else None  # this node's own hosting: its price alone
        if host:
            offer = host_offer(ctx, str(host))
            if offer is not None and offer.charges:
                per_request, per_1k = per_request + offer.per_request, per_1k + offer.per_1k
        rows.append({"id": m["id"], "state": m.get("state", ""), "pricePerRequest": str(per_request),
                     "pricePer1kTokens": str(per_1k), "host": host or "self",
                     "verified": m.get("verified", True),  # a --backend model: nobody can spot-check it
                     **({"contextLength": m["context_length"]} if "context_length" in m else {})})
    return rows


def document(ctx: "EdgeContext", gate: "PaymentGate", models: list[dict[str, Any]], base_url: str) -> dict[str, Any]:
    metered = gate.metered
    amount = gate.cfg.credit_topup if metered else gate.cfg.price_per_request
    req = gate.requirements(amount, gate.cfg.window_base_s).model_dump(by_alias=True, exclude_none=True)
    table = model_prices(ctx, gate, models)
    now = int(time.time())
    a = gate.asset
    meta = {"billing": "metered" if metered else "per_request", "network": a.network, "asset": a.address,
            "assetName": a.name, "assetVersion": a.version, "decimals": a.decimals, "payTo": gate.cfg.pay_to,
            "scheme": "exact", "models": table}
    return {
        "x402Version": 2,
        "items": [{"resource": base_url.rstrip("/") + path, "type": "http", "x402Version": 2, "accepts": [req],
                   "lastUpdated": now, "metadata": {"description": desc, "method": "POST", **meta}}
                  for path, desc in RESOURCES],
        "pagination": {"limit": len(RESOURCES), "offset": 0, "total": len(RESOURCES)},
    }


def install(app: FastAPI, ctx: "EdgeContext", gate: "PaymentGate | None",
            models: Callable[[], list[dict[str, Any]]]) -> None:
    """`models()`: what GET /v1/models lists (this node's models, then the mesh's)."""

    @app.get(DISCOVERY_PATH, include_in_schema=False)
    async def x402_discovery(request: Request) -> JSONResponse:
        if gate is None:
            raise APIError(404, "this node does not charge: its models are free (no x402)", type="not_found_error")
        return JSONResponse(document(ctx, gate, models(), str(request.base_url)),
                            headers={"Cache-Control": "max-age=30"})
