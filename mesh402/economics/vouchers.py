"""Cumulative escrow vouchers as the nodes keep them (contracts/MeshEscrow.sol, economics/escrow.py).

An entry pays each worker it uses (a stage, an expert node, a routed host) with EIP-712 vouchers "worker W may
redeem up to T from entry E's escrow", raising T as the work is done. Both sides keep their vouchers in one
SQLite file in the node's home (`vouchers.sqlite`), written before a voucher leaves or counts:

- `VoucherIssuer` (entry): the cumulative amount signed per worker; a new voucher is stored before it is sent,
  so a restart never signs less than a worker already holds.
- `VoucherWallet` (worker): per entry, the best voucher held and the work it is owed (atomic units, from the
  rate the entry's signed grant names); `behind(entry)` is what it has worked for and not been vouchered,
  which the worker keeps under a small window (it pauses an entry that falls behind). The best vouchers are
  what it redeems.

Nothing here trusts the other side: a voucher counts only when its signature recovers to the entry it
names, it names this worker, it raises the amount held, and (checked by the caller, on chain) the entry's
channel covers it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mesh402.economics.escrow import Voucher, sign_voucher, voucher_signer

VOUCHER_FILE = "vouchers.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued (worker TEXT PRIMARY KEY, cumulative INTEGER NOT NULL, signature BLOB NOT NULL,
                                   updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS held (entry TEXT PRIMARY KEY, worker TEXT NOT NULL, cumulative INTEGER NOT NULL,
                                 signature BLOB NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS owed (entry TEXT PRIMARY KEY, amount INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS redeemed (entry TEXT NOT NULL, cumulative INTEGER NOT NULL, tx TEXT NOT NULL,
                                     at REAL NOT NULL);
"""


@dataclass(frozen=True)
class EscrowRef:
    """Which escrow contract vouchers are bound to (its EIP-712 domain)."""

    chain_id: int
    address: str


class VoucherBook:
    """The node's voucher file: one connection, serialized (the event loop and chain threads share it)."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / VOUCHER_FILE
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a voucher counts once it is on disk
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def _one(self, sql: str, *args: object) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _exec(self, sql: str, *args: object) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class VoucherIssuer:
    """The entry's side: signs ever-higher cumulative vouchers per worker, stored before they are sent."""

    def __init__(self, book: VoucherBook, entry_key: str, escrow: EscrowRef) -> None:
        from eth_account import Account  # lazy: loads eth_account only on a node that pays workers

        self.book = book
        self.key = entry_key
        self.escrow = escrow
        self.address: str = Account.from_key(entry_key).address

    def issued(self, worker: str) -> int:
        row = self.book._one("SELECT cumulative FROM issued WHERE worker=?", worker.lower())
        return int(row[0]) if row else 0

    def pay(self, worker: str, amount: int) -> Voucher:
        """A voucher raising what `worker` may redeem by `amount` (durable before it is returned)."""
        if amount < 0:
            raise ValueError("a voucher never lowers what a worker may redeem")
        with self.book._lock:  # read, sign and store as one step: two requests never sign the same total
            row = self.book._db.execute("SELECT cumulative FROM issued WHERE worker=?", (worker.lower(),)).fetchone()
            total = (int(row[0]) if row else 0) + int(amount)
            v = sign_voucher(self.key, self.escrow.chain_id, self.escrow.address, worker, total)
            self.book._db.execute("INSERT INTO issued VALUES (?,?,?,?) ON CONFLICT(worker) DO UPDATE SET "
                                  "cumulative=excluded.cumulative, signature=excluded.signature, "
                                  "updated=excluded.updated", (worker.lower(), total, v.signature, time.time()))
        return v

    def totals(self) -> dict[str, int]:
        with self.book._lock:
            return {w: int(c) for w, c in self.book._db.execute("SELECT worker, cumulative FROM issued")}


class VoucherWallet:
    """The worker's side: the best voucher per entry, and the work each entry owes it."""

    def __init__(self, book: VoucherBook, worker: str, escrow: EscrowRef) -> None:
        self.book = book
        self.worker = worker
        self.escrow = escrow

    def held(self, entry: str) -> Voucher | None:
        row = self.book._one("SELECT worker, cumulative, signature FROM held WHERE entry=?", entry.lower())
        if row is None:
            return None
        from eth_utils import to_checksum_address  # lazy: with eth_account, only on a node that is paid
        return Voucher(to_checksum_address(entry), to_checksum_address(row[0]), int(row[1]), bytes(row[2]))

    def owed(self, entry: str) -> int:
        row = self.book._one("SELECT amount FROM owed WHERE entry=?", entry.lower())
        return int(row[0]) if row else 0

    def behind(self, entry: str) -> int:
        """Work done for `entry` that no voucher covers yet (atomic units; negative: paid ahead)."""
        v = self.held(entry)
        return self.owed(entry) - (v.cumulative if v is not None else 0)

    def work(self, entry: str, amount: int) -> None:
        """Record `amount` of work done for `entry` (the grant's rate times the tokens processed)."""
        if amount <= 0:
            return
        self.book._exec("INSERT INTO owed VALUES (?, ?) ON CONFLICT(entry) DO UPDATE SET amount = amount + ?",
                        entry.lower(), int(amount), int(amount))

    def check(self, v: Voucher, entry: str) -> str | None:
        """Why `v` is not a voucher this worker can hold from `entry` (None: it is; coverage is checked on
        chain by the caller)."""
        if v.entry.lower() != entry.lower():
            return f"the voucher names entry {v.entry}, not {entry}"
        if v.worker.lower() != self.worker.lower():
            return f"the voucher pays {v.worker}, not this worker {self.worker}"
        signer = voucher_signer(v, self.escrow.chain_id, self.escrow.address)
        if signer is None or signer.lower() != entry.lower():
            return "the voucher's signature is not the entry's"
        return None

    def keep(self, v: Voucher) -> bool:
        """Hold `v` if it raises the amount held from its entry (a checked voucher); True if it did."""
        with self.book._lock:
            row = self.book._db.execute("SELECT cumulative FROM held WHERE entry=?", (v.entry.lower(),)).fetchone()
            if row is not None and int(row[0]) >= v.cumulative:
                return False
            self.book._db.execute("INSERT INTO held VALUES (?,?,?,?,?) ON CONFLICT(entry) DO UPDATE SET "
                                  "worker=excluded.worker, cumulative=excluded.cumulative, "
                                  "signature=excluded.signature, updated=excluded.updated",
                                  (v.entry.lower(), v.worker.lower(), v.cumulative, v.signature, time.time()))
        return True

    def best(self) -> list[Voucher]:
        """The best voucher held from every entry (what a redemption submits)."""
        with self.book._lock:
            entries = [r[0] for r in self.book._db.execute("SELECT entry FROM held")]
        return [v for e in entries if (v := self.held(e)) is not None]

    def note_redeemed(self, v: Voucher, tx: str) -> None:
        self.book._exec("INSERT INTO redeemed VALUES (?,?,?,?)", v.entry.lower(), v.cumulative, tx, time.time())

    def summary(self) -> dict[str, dict[str, int]]:
        """Per entry: work owed, vouchered (best voucher held)."""
        with self.book._lock:
            owed = {e: int(a) for e, a in self.book._db.execute("SELECT entry, amount FROM owed")}
            held = {e: int(c) for e, c in self.book._db.execute("SELECT entry, cumulative FROM held")}
        return {e: {"owed": owed.get(e, 0), "vouchered": held.get(e, 0)} for e in sorted(set(owed) | set(held))}
