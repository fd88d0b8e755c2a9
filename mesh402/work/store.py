"""The entry's receipt store (SQLite): every stage's signed receipt per paid request, the revenue it
served, its spot checks, validations and payouts per epoch; `EntryReceipts` is the sink a paid entry's
models hand their receipts to."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterable

from mesh402.work.evidence import NO_REVEAL, SpotCheck, spot_checks
from mesh402.work.receipts import (
    AnyReceipt,
    ExpertReceipt,
    receipt_errors,
    receipt_from_json,
)


def epoch_of(ts: float, epoch_seconds: int) -> int:
    return int(ts) // int(epoch_seconds)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, revenue INTEGER NOT NULL, model_hash TEXT NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (
    request_id TEXT NOT NULL, stage INTEGER NOT NULL, node_id TEXT NOT NULL, digest TEXT NOT NULL,
    body TEXT NOT NULL, units INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (request_id, stage));
CREATE INDEX IF NOT EXISTS requests_epoch ON requests(epoch);
CREATE TABLE IF NOT EXISTS payouts (
    epoch INTEGER NOT NULL, node_id TEXT NOT NULL, units INTEGER NOT NULL, amount INTEGER NOT NULL,
    account TEXT, PRIMARY KEY (epoch, node_id));
CREATE TABLE IF NOT EXISTS epochs (
    epoch INTEGER PRIMARY KEY, revenue INTEGER NOT NULL, epoch_id TEXT, root TEXT, tx TEXT, closed_at REAL);
CREATE TABLE IF NOT EXISTS spot_checks (
    request_id TEXT NOT NULL, stage INTEGER NOT NULL, node_id TEXT NOT NULL, digest TEXT NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY (request_id, stage));
CREATE TABLE IF NOT EXISTS validations (
    epoch INTEGER NOT NULL, node_id TEXT NOT NULL, request_hash TEXT NOT NULL, validator TEXT NOT NULL,
    agent_id INTEGER, statement TEXT NOT NULL, verdict TEXT, PRIMARY KEY (epoch, node_id));
"""


class ReceiptStore:
    """The entry node's receipts and per-request revenue (`<home>/receipts.sqlite`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def record(self, receipts: list[AnyReceipt], *, revenue: int, epoch: int, n_layers: int | None = None,
               flops: Any = None, checks: Iterable[Any] = (), unpaid: Iterable[int] = (),
               expert_flops: Any = None) -> None:
        """Store one request's receipts (a pipeline/solo chain, or an MoE request's expert receipts), its
        revenue and its spot checks (work.evidence) atomically; refuses receipts that do not verify.
        With `flops(model_hash, start, end)` (stage receipts) and `expert_flops(model_hash)` -> MoEFlops
        (expert receipts), each receipt's work units are computed and stored now. Stages in `unpaid` (they
        did not reveal an audited step) earn 0 units."""
        errs = receipt_errors(receipts, n_layers)
        if errs:
            raise ValueError("receipt chain rejected: " + "; ".join(errs))
        rid, model = receipts[0].request_id, receipts[0].model_hash
        unpaid = set(unpaid)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO requests VALUES (?,?,?,?,?)", (rid, int(epoch), int(revenue), model, time.time()))
                self._db.executemany("INSERT INTO receipts VALUES (?,?,?,?,?,?)", [
                    (r.request_id, r.stage, r.node_id, r.digest, json.dumps(r.to_json()),
                     0 if r.stage in unpaid else receipt_units(r, flops, expert_flops))
                    for r in receipts])
                self._db.executemany("INSERT INTO spot_checks VALUES (?,?,?,?,?)", [
                    (c.request_id, c.stage, c.node_id, c.digest, zlib.compress(c.body())) for c in checks])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def receipts(self, request_id: str) -> list[AnyReceipt]:
        rows = self._db.execute("SELECT body FROM receipts WHERE request_id=? ORDER BY stage", (request_id,)).fetchall()
        return [receipt_from_json(json.loads(b)) for (b,) in rows]

    def count(self, epoch: int | None = None) -> int:
        if epoch is None:
            return int(self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM receipts JOIN requests USING (request_id) WHERE epoch=?",
                                    (int(epoch),)).fetchone()[0])

    def revenue(self, epoch: int) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(revenue),0) FROM requests WHERE epoch=?", (int(epoch),)).fetchone()[0])

    def epoch_receipts(self, epoch: int) -> Iterable[AnyReceipt]:
        for (b,) in self._db.execute("SELECT r.body FROM receipts r JOIN requests q USING (request_id) WHERE q.epoch=? "
                                     "ORDER BY r.request_id, r.stage", (int(epoch),)):
            yield receipt_from_json(json.loads(b))

    def work_units(self, epoch: int, flops: Any = None, expert_flops: Any = None) -> dict[str, int]:
        """Work units per node in an epoch: Σ over its receipts of flops(model, layers) · tokens, or for
        expert receipts expert_flops(model).units(...) (without `flops`, or for expert receipts without
        `expert_flops`: the units stored when the receipts were recorded)."""
        units: dict[str, int] = {}
        if flops is None:
            for node, u in self._db.execute("SELECT r.node_id, SUM(r.units) FROM receipts r JOIN requests q "
                                            "USING (request_id) WHERE q.epoch=? GROUP BY r.node_id", (int(epoch),)):
                units[node] = int(u)
            return units
        for b, stored in self._db.execute("SELECT r.body, r.units FROM receipts r JOIN requests q USING (request_id) "
                                          "WHERE q.epoch=? ORDER BY r.request_id, r.stage", (int(epoch),)):
            r = receipt_from_json(json.loads(b))
            u = stored if isinstance(r, ExpertReceipt) and expert_flops is None else receipt_units(r, flops, expert_flops)
            units[r.node_id] = units.get(r.node_id, 0) + int(u)
        return units

    def unpaid_epochs(self) -> list[int]:
        """Epochs with receipts and no payout on record (the `epochs` table), oldest first."""
        return [int(e) for (e,) in self._db.execute(
            "SELECT DISTINCT epoch FROM requests WHERE epoch NOT IN (SELECT epoch FROM epochs) ORDER BY epoch")]

    def payout_recorded(self, epoch: int) -> bool:
        return self._db.execute("SELECT 1 FROM epochs WHERE epoch=?", (int(epoch),)).fetchone() is not None

    def save_payout(self, epoch: int, revenue: int, rows: dict[str, tuple[int, int, str | None]], *,
                    epoch_id: str | None = None, root: str | None = None, tx: str | None = None) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO epochs VALUES (?,?,?,?,?,?)",
                                 (int(epoch), int(revenue), epoch_id, root, tx, time.time()))
                self._db.execute("DELETE FROM payouts WHERE epoch=?", (int(epoch),))
                self._db.executemany("INSERT INTO payouts VALUES (?,?,?,?,?)",
                                     [(int(epoch), n, int(u), int(a), acct) for n, (u, a, acct) in rows.items()])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def spot_checks(self, epoch: int, node_id: str | None = None) -> list[Any]:
        """The spot checks of an epoch's audited requests (of one node), in request order."""
        q = ("SELECT c.body FROM spot_checks c JOIN requests q USING (request_id) WHERE q.epoch=?"
             + (" AND c.node_id=?" if node_id else "") + " ORDER BY q.created_at, c.request_id, c.stage")
        args = (int(epoch), node_id) if node_id else (int(epoch),)
        return [SpotCheck.from_json(json.loads(zlib.decompress(b))) for (b,) in self._db.execute(q, args)]

    def save_validation(self, epoch: int, node_id: str, request_hash: str, validator: str, agent_id: int | None,
                        statement: str, verdict: str | None = None) -> None:
        """The validation request made for a node's work in an epoch (hex keccak hash; verdict JSON once known)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO validations VALUES (?,?,?,?,?,?,?)",
                             (int(epoch), node_id, request_hash, validator, agent_id, statement, verdict))

    def validations(self, epoch: int) -> dict[str, dict[str, Any]]:
        """node id -> {request_hash, validator, agent_id, statement, verdict} for an epoch."""
        rows = self._db.execute("SELECT node_id, request_hash, validator, agent_id, statement, verdict FROM validations "
                                "WHERE epoch=?", (int(epoch),)).fetchall()
        return {n: {"request_hash": h, "validator": v, "agent_id": a, "statement": s, "verdict": d}
                for n, h, v, a, s, d in rows}

    def earnings(self) -> list[dict[str, Any]]:
        """Per node and epoch: work units, amount paid, payout account (for status and the management API)."""
        rows = self._db.execute("SELECT p.epoch, p.node_id, p.units, p.amount, p.account, e.tx FROM payouts p "
                                "LEFT JOIN epochs e USING (epoch) ORDER BY p.epoch, p.node_id").fetchall()
        return [{"epoch": e, "node_id": n, "units": u, "amount": a, "account": acct, "tx": tx}
                for e, n, u, a, acct, tx in rows]


def receipt_units(r: AnyReceipt, flops: Any, expert_flops: Any) -> int:
    """A receipt's work units (0 without the FLOPs table its kind needs)."""
    if isinstance(r, ExpertReceipt):
        return expert_flops(r.model_hash).units(r.trunk_tokens, r.rows) if expert_flops else 0
    return flops(r.model_hash, r.layer_start, r.layer_end) * r.tokens if flops else 0


class EntryReceipts:
    """The entry node's receipt sink: each request's verified chain goes to <home>/receipts.sqlite in the
    epoch of its arrival (epoch length `epoch_s`), written off the event loop. The serving code waits for
    the write (`kept`) before the answer's last byte goes out, so a kill -9 after an answer loses no
    receipt of it."""

    def __init__(self, home: Path, epoch_s: int = 3600) -> None:
        self.store = ReceiptStore(Path(home) / "receipts.sqlite")
        self.epoch_s = int(epoch_s)
        self.kept = 0
        self.rejected = 0
        self.audited = 0
        self._models: dict[str, Any] = {}  # model hash -> GGUF path, or its FLOPs table once read
        self._flops: dict[tuple[str, int, int], int] = {}
        self._moe: dict[str, Any] = {}

    def add_model(self, model_hash: str, path: Any) -> None:
        """Where a model's GGUF file is, so receipts for it get work units from its tensor table."""
        self._models.setdefault(model_hash, path)

    def _meta(self, model_hash: str) -> Any:
        src = self._models.get(model_hash)
        if src is None:
            raise KeyError(f"no model file known for {model_hash[:16]}")
        if not hasattr(src, "n_layers"):
            from mesh402.models.gguf_meta import read_gguf_meta  # lazy: loads gguf, numpy only when needed
            src = self._models[model_hash] = read_gguf_meta(src)
        return src

    def flops(self, model_hash: str, start: int, end: int) -> int:
        key = (model_hash, start, end)
        if key not in self._flops:
            from mesh402.work.units import flops_per_token  # lazy: kept off this module's import path
            self._flops[key] = flops_per_token(self._meta(model_hash), start, end)
        return self._flops[key]

    def expert_flops(self, model_hash: str) -> Any:
        """workunits.MoEFlops of a model (for expert receipts), memoised."""
        if model_hash not in self._moe:
            from mesh402.work.units import moe_flops  # lazy: kept off this module's import path
            self._moe[model_hash] = moe_flops(self._meta(model_hash))
        return self._moe[model_hash]

    def _record(self, receipts: list[AnyReceipt], evidence: list[Any] | None = None) -> None:
        import logging

        try:
            known = bool(receipts) and receipts[0].model_hash in self._models
            if evidence and all(isinstance(e, SpotCheck) for e in evidence):  # built by the host (expert runs)
                checks = list(evidence) if not receipt_errors(receipts) else []
            else:
                checks = spot_checks(receipts, evidence) if evidence is not None and not receipt_errors(receipts) else []
            silent = [c.stage for c in checks if c.fault == NO_REVEAL]  # audited, revealed nothing: not paid for it
            self.store.record(receipts, revenue=0, epoch=epoch_of(time.time(), self.epoch_s),
                              flops=self.flops if known else None, expert_flops=self.expert_flops if known else None,
                              checks=[c for c in checks if c.fault != NO_REVEAL], unpaid=silent)
            self.kept += 1
            self.audited += bool(checks)
        except Exception as e:
            self.rejected += 1
            logging.getLogger(__name__).warning("receipts for %s not kept: %s",
                                                receipts[0].request_id if receipts else "?", e)

    def __call__(self, receipts: list[AnyReceipt], evidence: list[Any] | None = None) -> Any:
        """Start writing a request's receipts off the event loop; the future returned is done once they are
        committed (await it through `kept` before the answer's end goes out). Without a loop: written now."""
        try:
            return asyncio.get_running_loop().run_in_executor(None, self._record, list(receipts), evidence)
        except RuntimeError:  # no loop: write now
            self._record(list(receipts), evidence)
            return None


async def kept(pending: Any) -> None:
    """Wait for what a receipt sink returned (a future or awaitable of the write, or None when it wrote at
    once). Shielded: a caller cancelled now (a client gone) does not cut the write off."""
    if isinstance(pending, concurrent.futures.Future):
        pending = asyncio.wrap_future(pending)
    if inspect.isawaitable(pending):
        await asyncio.shield(pending)
