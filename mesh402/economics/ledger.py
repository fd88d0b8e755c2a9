"""The seller's ledger in SQLite: payments by authorization, prepaid credit, holds, stored responses.

Every state change is one transaction (WAL, synchronous=FULL), so a crash or restart loses nothing:
- a payment row records each authorization (payer + nonce) from `verified` through `settling` to
  `settled` (or `released` when the work failed, `failed` when settlement did);
- credit balances move only through `credit_events` rows (top-up, usage, hold, release);
- holds reserve credit for requests in flight; on start-up leftover holds are returned to their accounts
  (the buyer never pays for work that did not finish), and in-flight payments are released;
- stored responses let a retried request (same Idempotency-Key or same authorization) be answered again
  without paying or generating twice.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
  auth_id TEXT PRIMARY KEY, payer TEXT NOT NULL, amount INTEGER NOT NULL, network TEXT, asset TEXT,
  pay_to TEXT, kind TEXT NOT NULL, state TEXT NOT NULL, request_id TEXT, tx TEXT, reason TEXT,
  settle_json TEXT, payload_json TEXT, requirements_json TEXT, created REAL, updated REAL);
CREATE TABLE IF NOT EXISTS accounts (payer TEXT PRIMARY KEY, balance INTEGER NOT NULL DEFAULT 0, updated REAL);
CREATE TABLE IF NOT EXISTS credit_tokens (token_hash TEXT PRIMARY KEY, payer TEXT NOT NULL, created REAL);
CREATE TABLE IF NOT EXISTS credit_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, payer TEXT NOT NULL, delta INTEGER NOT NULL, kind TEXT NOT NULL,
  ref TEXT, ts REAL);
CREATE TABLE IF NOT EXISTS holds (hold_id TEXT PRIMARY KEY, payer TEXT NOT NULL, amount INTEGER NOT NULL,
  request_id TEXT, created REAL);
CREATE TABLE IF NOT EXISTS responses (
  key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, payer TEXT, state TEXT NOT NULL, status INTEGER,
  headers_json TEXT, body BLOB, created REAL);
"""

IN_FLIGHT = ("verified", "settling")


@dataclass
class PaymentRow:
    auth_id: str
    payer: str
    amount: int
    kind: str
    state: str
    request_id: str | None
    tx: str | None
    reason: str | None
    settle_json: str | None
    payload_json: str | None
    requirements_json: str | None


@dataclass
class StoredResponse:
    key: str
    fingerprint: str
    payer: str | None
    state: str  # running | done
    status: int | None
    headers: dict[str, str]
    body: bytes | None


def auth_id_for(network: str, asset: str, payer: str, nonce: str) -> str:
    raw = f"{network}|{asset.lower()}|{payer.lower()}|{nonce.lower()}"
    return hashlib.sha256(raw.encode()).hexdigest()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> "_Tx":
        return _Tx(self)

    # ---- recovery -------------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """After a crash or restart: return held credit, drop half-written responses, and list
        payments whose settlement was in flight (the caller re-settles those: the work was done)."""
        now = time.time()
        with self._tx() as db:
            holds = db.execute("SELECT hold_id, payer, amount FROM holds").fetchall()
            for hold_id, payer, amount in holds:
                self._credit(db, payer, amount, "hold_released", hold_id, now)
            db.execute("DELETE FROM holds")
            dropped = db.execute("DELETE FROM responses WHERE state = 'running'").rowcount
            released = db.execute(
                "UPDATE payments SET state='released', reason='node restarted before the work finished', "
                "updated=? WHERE state='verified'", (now,)).rowcount
        return {"holds_returned": len(holds), "responses_dropped": dropped, "payments_released": released}

    def settling(self) -> list[PaymentRow]:
        rows = self._db.execute(f"SELECT {_PCOLS} FROM payments WHERE state='settling'").fetchall()
        return [PaymentRow(*r) for r in rows]

    # ---- payments -------------------------------------------------------------------------------

    def payment(self, auth_id: str) -> PaymentRow | None:
        with self._lock:
            r = self._db.execute(f"SELECT {_PCOLS} FROM payments WHERE auth_id=?", (auth_id,)).fetchone()
        return PaymentRow(*r) if r else None

    def claim_payment(self, auth_id: str, *, payer: str, amount: int, network: str, asset: str, pay_to: str,
                      kind: str, request_id: str, payload_json: str, requirements_json: str) -> bool:
        """Record a verified authorization as in flight; False if it is already in flight or spent."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM payments WHERE auth_id=?", (auth_id,)).fetchone()
            if row is not None and row[0] != "released":
                return False
            db.execute(
                "INSERT OR REPLACE INTO payments (auth_id, payer, amount, network, asset, pay_to, kind, state, "
                "request_id, payload_json, requirements_json, created, updated) "
                "VALUES (?,?,?,?,?,?,?,'verified',?,?,?,?,?)",
                (auth_id, payer.lower(), amount, network, asset.lower(), pay_to.lower(), kind, request_id,
                 payload_json, requirements_json, now, now))
        return True

    def mark_settling(self, auth_id: str) -> None:
        self._set_state(auth_id, "settling")

    def mark_released(self, auth_id: str, reason: str) -> None:
        self._set_state(auth_id, "released", reason=reason)

    def mark_settled(self, auth_id: str, tx: str, settle_json: str) -> None:
        self._set_state(auth_id, "settled", tx=tx, settle_json=settle_json)

    def mark_pending(self, auth_id: str, tx: str, settle_json: str) -> None:
        """Broadcast, no receipt yet: stays `settling` (re-settled on the next start) with its tx hash."""
        self._set_state(auth_id, "settling", tx=tx, settle_json=settle_json)

    def mark_failed(self, auth_id: str, reason: str, settle_json: str | None) -> None:
        self._set_state(auth_id, "failed", reason=reason, settle_json=settle_json)

    def _set_state(self, auth_id: str, state: str, **fields: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE payments SET state=?, updated=?{', ' + sets if sets else ''} WHERE auth_id=?",
                       (state, time.time(), *fields.values(), auth_id))

    # ---- credit ---------------------------------------------------------------------------------

    def balance(self, payer: str) -> int:
        with self._lock:
            r = self._db.execute("SELECT balance FROM accounts WHERE payer=?", (payer.lower(),)).fetchone()
        return int(r[0]) if r else 0

    def held(self, payer: str) -> int:
        with self._lock:
            r = self._db.execute("SELECT COALESCE(SUM(amount),0) FROM holds WHERE payer=?", (payer.lower(),)).fetchone()
        return int(r[0])

    def issue_token(self, payer: str) -> str:
        token = "m402c_" + secrets.token_urlsafe(24)
        with self._tx() as db:
            db.execute("INSERT INTO credit_tokens VALUES (?,?,?)", (token_hash(token), payer.lower(), time.time()))
        return token

    def account_for_token(self, token: str) -> str | None:
        with self._lock:
            r = self._db.execute("SELECT payer FROM credit_tokens WHERE token_hash=?", (token_hash(token),)).fetchone()
        return r[0] if r else None

    def topup(self, payer: str, amount: int, ref: str, *, into_hold: str | None = None) -> int:
        """Add bought credit; with `into_hold`, straight into that request's hold. -> balance after."""
        payer = payer.lower()
        now = time.time()
        with self._tx() as db:
            self._credit(db, payer, amount, "topup", ref, now)
            if into_hold is not None:
                self._credit(db, payer, -amount, "hold", into_hold, now)
                db.execute("UPDATE holds SET amount = amount + ? WHERE hold_id=?", (amount, into_hold))
            return int(db.execute("SELECT balance FROM accounts WHERE payer=?", (payer,)).fetchone()[0])

    def hold(self, payer: str, amount: int, request_id: str, *, minimum: int = 0) -> tuple[str, int] | None:
        """Move up to `amount` of the balance into a hold; None if less than `minimum` is available."""
        payer = payer.lower()
        with self._tx() as db:
            r = db.execute("SELECT balance FROM accounts WHERE payer=?", (payer,)).fetchone()
            bal = int(r[0]) if r else 0
            take = min(bal, amount)
            if take < minimum:
                return None
            hold_id = "h_" + secrets.token_hex(8)
            now = time.time()
            if take:
                self._credit(db, payer, -take, "hold", hold_id, now)
            db.execute("INSERT INTO holds VALUES (?,?,?,?,?)", (hold_id, payer, take, request_id, now))
            return hold_id, take

    def close_hold(self, hold_id: str, charge: int, ref: str) -> tuple[int, int]:
        """Charge `charge` (capped at the hold) and return the rest; -> (charged, balance after)."""
        with self._tx() as db:
            r = db.execute("SELECT payer, amount FROM holds WHERE hold_id=?", (hold_id,)).fetchone()
            if r is None:
                raise KeyError(f"no hold {hold_id}")
            payer, amount = r[0], int(r[1])
            charged = max(0, min(charge, amount))
            now = time.time()
            db.execute("DELETE FROM holds WHERE hold_id=?", (hold_id,))
            if amount:
                self._credit(db, payer, amount, "hold_released", hold_id, now)
            if charged:
                self._credit(db, payer, -charged, "usage", ref, now)
            bal = int(db.execute("SELECT balance FROM accounts WHERE payer=?", (payer,)).fetchone()[0])
            return charged, bal

    @staticmethod
    def _credit(db: sqlite3.Connection, payer: str, delta: int, kind: str, ref: str | None, now: float) -> None:
        db.execute("INSERT INTO accounts (payer, balance, updated) VALUES (?,?,?) "
                   "ON CONFLICT(payer) DO UPDATE SET balance = balance + excluded.balance, updated = excluded.updated",
                   (payer, delta, now))
        db.execute("INSERT INTO credit_events (payer, delta, kind, ref, ts) VALUES (?,?,?,?,?)",
                   (payer, delta, kind, ref, now))

    # ---- stored responses (idempotency) ---------------------------------------------------------

    def response(self, key: str) -> StoredResponse | None:
        with self._lock:
            r = self._db.execute("SELECT key, fingerprint, payer, state, status, headers_json, body FROM responses "
                                 "WHERE key=?", (key,)).fetchone()
        if r is None:
            return None
        return StoredResponse(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"), r[6])

    def begin_response(self, keys: list[str], fingerprint: str, payer: str | None) -> StoredResponse | None:
        """Reserve keys for a new request; returns the existing entry instead if one of them is taken."""
        with self._tx() as db:
            for k in keys:
                r = db.execute("SELECT key FROM responses WHERE key=?", (k,)).fetchone()
                if r is not None:
                    break
            else:
                for k in keys:
                    db.execute("INSERT INTO responses (key, fingerprint, payer, state, created) VALUES (?,?,?,?,?)",
                               (k, fingerprint, payer, "running", time.time()))
                return None
        return self.response(k)

    def finish_response(self, keys: list[str], status: int, headers: dict[str, str], body: bytes) -> None:
        with self._tx() as db:
            for k in keys:
                db.execute("UPDATE responses SET state='done', status=?, headers_json=?, body=? WHERE key=?",
                           (status, json.dumps(headers), body, k))

    def drop_responses(self, keys: list[str]) -> None:
        with self._tx() as db:
            for k in keys:
                db.execute("DELETE FROM responses WHERE key=? AND state='running'", (k,))

    # ---- reporting ------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        with self._lock:
            db = self._db
            settled = db.execute("SELECT COUNT(*), COALESCE(SUM(amount),0) FROM payments WHERE state='settled'").fetchone()
            by_kind = dict(db.execute("SELECT kind, COALESCE(SUM(amount),0) FROM payments WHERE state='settled' "
                                      "GROUP BY kind").fetchall())
            usage = db.execute("SELECT COALESCE(-SUM(delta),0) FROM credit_events WHERE kind='usage'").fetchone()[0]
            outstanding = db.execute("SELECT COALESCE(SUM(balance),0) FROM accounts").fetchone()[0]
            held = db.execute("SELECT COALESCE(SUM(amount),0) FROM holds").fetchone()[0]
            failed = db.execute("SELECT COUNT(*) FROM payments WHERE state='failed'").fetchone()[0]
            inflight = db.execute("SELECT COUNT(*) FROM payments WHERE state IN ('verified','settling')").fetchone()[0]
        return {"settled_payments": int(settled[0]), "revenue": int(settled[1]),
                "revenue_per_request": int(by_kind.get("request", 0)), "credit_sold": int(by_kind.get("credit", 0)),
                "credit_used": int(usage), "credit_outstanding": int(outstanding) + int(held),
                "failed_settlements": int(failed), "in_flight": int(inflight)}


    def recent_payments(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest payments (newest first), for the console: who paid what, its state and tx hash."""
        with self._lock:
            rows = self._db.execute("SELECT auth_id, payer, amount, kind, state, tx, reason, updated FROM payments "
                                    "ORDER BY updated DESC LIMIT ?", (int(limit),)).fetchall()
        return [{"auth_id": a, "payer": p, "amount": int(m), "kind": k, "state": st, "tx": tx, "reason": r, "updated": u}
                for a, p, m, k, st, tx, r, u in rows]

    def accounts(self, limit: int = 50) -> list[dict[str, Any]]:
        """Prepaid credit accounts (largest balance first), with what each has held for requests in flight."""
        with self._lock:
            rows = self._db.execute(
                "SELECT a.payer, a.balance, COALESCE((SELECT SUM(h.amount) FROM holds h WHERE h.payer = a.payer), 0), "
                "a.updated FROM accounts a ORDER BY a.balance DESC LIMIT ?", (int(limit),)).fetchall()
        return [{"payer": p, "balance": int(b), "held": int(h), "updated": u} for p, b, h, u in rows]


_PCOLS = ("auth_id, payer, amount, kind, state, request_id, tx, reason, settle_json, payload_json, "
          "requirements_json")


class _Tx:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def __enter__(self) -> sqlite3.Connection:
        self.ledger._lock.acquire()
        self.ledger._db.execute("BEGIN IMMEDIATE")
        return self.ledger._db

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            self.ledger._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.ledger._lock.release()
