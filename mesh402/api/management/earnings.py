"""Management API: GET /api/earnings, the epoch payouts this (entry) node made, per node and epoch (a share
with no account was not paid: withheld after a failed or missing validation, or no verified agent), and
how many work receipts it holds per epoch (from <home>/receipts.sqlite; empty on a node that keeps none)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from fastapi import FastAPI


def earnings(home: Path) -> dict[str, Any]:
    path = Path(home) / "receipts.sqlite"
    if not path.exists():
        return {"epochs": [], "payouts": []}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        receipts = db.execute("SELECT q.epoch, COUNT(DISTINCT q.request_id), COUNT(*), COALESCE(SUM(r.units),0) "
                              "FROM requests q JOIN receipts r USING (request_id) GROUP BY q.epoch ORDER BY q.epoch").fetchall()
        payouts = db.execute("SELECT p.epoch, p.node_id, p.units, p.amount, p.account, e.tx, e.revenue FROM payouts p "
                             "LEFT JOIN epochs e USING (epoch) ORDER BY p.epoch, p.node_id").fetchall()
    finally:
        db.close()
    return {"epochs": [{"epoch": e, "requests": n, "receipts": r, "units": int(u)} for e, n, r, u in receipts],
            "payouts": [{"epoch": e, "node_id": n, "units": int(u), "amount": int(a), "account": acct, "tx": tx,
                         "revenue": rev, "paid": acct is not None} for e, n, u, a, acct, tx, rev in payouts]}


def install(app: FastAPI, home: Path) -> None:
    @app.get("/api/earnings")
    async def get_earnings() -> dict[str, Any]:
        return earnings(home)
