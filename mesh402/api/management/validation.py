"""Management API for spot-check verification (docs/verification.md):

- ``POST /api/epochs/{epoch}/validate``: run the entry's validation round for an epoch: each paid stage
  node requests ERC-8004 validation of its work, the mesh's validator re-executes its spot checks and
  answers on chain. Returns per node the request hash and the verdict (or why there is none).
- ``GET /api/epochs/{epoch}/validations``: what is on record for the epoch.
`mesh402 payout` calls the first before it pays."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from mesh402.serving.distributed import DistributedRuntime
    from mesh402.work.store import ReceiptStore


def install(app: FastAPI, runtime: Callable[[], "DistributedRuntime | None"]) -> None:
    """`runtime()`: the node's DistributedRuntime (None on a node without one)."""

    def store_of() -> "tuple[DistributedRuntime | None, ReceiptStore | None]":
        dist = runtime()
        return dist, (dist.receipts.store if dist is not None and dist.receipts is not None else None)

    @app.post("/api/epochs/{epoch}/validate")
    async def validate(epoch: int) -> JSONResponse:
        dist, store = store_of()
        if dist is None or store is None:
            return JSONResponse({"error": "this node keeps no receipts (it is not a paid entry node)"}, status_code=409)
        return JSONResponse({"epoch": epoch, "nodes": await dist.trust.run_round(store, epoch)})

    @app.get("/api/epochs/{epoch}/validations")
    async def validations(epoch: int) -> JSONResponse:
        _, store = store_of()
        if store is None:
            return JSONResponse({"epoch": epoch, "nodes": {}})
        rows = store.validations(epoch)
        return JSONResponse({"epoch": epoch, "spot_checks": len(store.spot_checks(epoch)), "nodes": {
            n: {**{k: v for k, v in r.items() if k != "verdict"}, "verdict": json.loads(r["verdict"]) if r["verdict"] else None}
            for n, r in rows.items()}})
