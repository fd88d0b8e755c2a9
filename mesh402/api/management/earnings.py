"""Management API: GET /api/earnings, the epoch payouts this (entry) node made, per node and epoch (a share
with no account was not paid: withheld after a failed or missing validation, or no verified agent), how
many work receipts it holds per epoch, and the spot checks per epoch and node with the validator's verdict
(from <home>/receipts.sqlite; empty on a node that keeps none)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from fastapi import FastAPI


def earnings(home: Path) -> dict[str, Any]:
    path = Path(home) / "receipts.sqlite"
    if not path.exists():
        return {"epochs": [], "payouts": [], "spot_checks": []}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        receipts = db.execute("SELECT q.epoch, COUNT(DISTINCT q.request_id), COUNT(*), COALESCE(SUM(r.units),0) "
                              "FROM requests q JOIN receipts r USING (request_id) GROUP BY q.epoch ORDER BY q.epoch").fetchall()
        payouts = db.execute("SELECT p.epoch, p.node_id, p.units, p.amount, p.account, e.tx, e.revenue FROM payouts p "
                             "LEFT JOIN epochs e USING (epoch) ORDER BY p.epoch, p.node_id").fetchall()
        checks = db.execute("SELECT q.epoch, c.node_id, COUNT(*) FROM spot_checks c JOIN requests q USING (request_id) "
                            "GROUP BY q.epoch, c.node_id").fetchall()
        verdicts = {(e, n): (h, v, d) for e, n, h, v, d in db.execute(
            "SELECT epoch, node_id, request_hash, validator, verdict FROM validations").fetchall()}
    finally:
        db.close()
    return {"epochs": [{"epoch": e, "requests": n, "receipts": r, "units": int(u)} for e, n, r, u in receipts],
            "payouts": [{"epoch": e, "node_id": n, "units": int(u), "amount": int(a), "account": acct, "tx": tx,
                         "revenue": rev, "paid": acct is not None} for e, n, u, a, acct, tx, rev in payouts],
            "spot_checks": [{"epoch": e, "node_id": n, "checks": c, **_verdict(*verdicts.get((e, n), (None, None, None)))}
                            for e, n, c in sorted(checks, key=lambda r: (r[0], r[1]))]}


def _verdict(request_hash: str | None, validator: str | None, verdict: str | None) -> dict[str, Any]:
    """A validation on record: its request hash, the validator, and the outcome (None: no verdict yet)."""
    out: dict[str, Any] = {"request_hash": request_hash, "validator": validator, "score": None, "checked": None,
                           "failed": None}
    try:
        d = json.loads(verdict) if verdict else None
    except ValueError:
        d = None
    if isinstance(d, dict):
        results = d.get("results")
        rows: list[Any] = results if isinstance(results, list) else []
        failed = sum(1 for r in rows if isinstance(r, dict) and not r.get("ok") and not r.get("skipped"))
        out.update(score=d.get("score"), checked=d.get("checked"), failed=failed)
    return out


def install(app: FastAPI, home: Path) -> None:
    @app.get("/api/earnings")
    async def get_earnings() -> dict[str, Any]:
        return earnings(home)
