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

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh402.economics.escrow import Voucher, checksum_address, sign_voucher, voucher_signer

VOUCHER_FILE = "vouchers.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued (worker TEXT PRIMARY KEY, cumulative INTEGER NOT NULL, signature BLOB NOT NULL,
                                   updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS held (entry TEXT PRIMARY KEY, worker TEXT NOT NULL, cumulative INTEGER NOT NULL,
                                 signature BLOB NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS owed (entry TEXT PRIMARY KEY, amount INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS redeemed (entry TEXT NOT NULL, cumulative INTEGER NOT NULL, tx TEXT NOT NULL,
                                     at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS session_paid (worker TEXT NOT NULL, key TEXT NOT NULL, amount INTEGER NOT NULL,
                                         updated REAL NOT NULL, PRIMARY KEY (worker, key));
CREATE TABLE IF NOT EXISTS routed (worker TEXT PRIMARY KEY, confirmed INTEGER NOT NULL, high INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS routed_owed (entry TEXT PRIMARY KEY, amount INTEGER NOT NULL);
"""
MAX_COVERAGE_CACHED = 4096  # entries whose coverage a worker keeps in memory (oldest read dropped first)
SESSION_ROWS_KEPT_S = 86400.0  # per-session running totals older than this are pruned (sessions end long before)


@dataclass(frozen=True)
class EscrowRef:
    """Which escrow contract vouchers are bound to (its EIP-712 domain)."""

    chain_id: int
    address: str


class VoucherBook:
    """The node's voucher file: one connection, serialized (the event loop and chain threads share it)."""

    def __init__(self, home: Path) -> None:
        Path(home).mkdir(parents=True, exist_ok=True)
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

    def pay_to_total(self, worker: str, key: str, micro: int) -> Voucher:
        """Raise `worker`'s cumulative voucher so that session `key` has paid ceil(micro / 1e6) in total (the
        session's running total; serving.work_pay). Stored before it is returned."""
        want = -(-int(micro) // 1_000_000)
        w = worker.lower()
        with self.book._lock:
            row = self.book._db.execute("SELECT amount FROM session_paid WHERE worker=? AND key=?", (w, key)).fetchone()
            paid = int(row[0]) if row else 0
            cur = self.book._db.execute("SELECT cumulative, signature FROM issued WHERE worker=?", (w,)).fetchone()
            total = int(cur[0]) if cur else 0
            now = time.time()
            if want <= paid and cur is not None:  # nothing new: the voucher already held covers it
                return Voucher(self.address, checksum_address(worker), total, bytes(cur[1]))
            return self._raise_locked(worker, total + max(0, want - paid), [
                ("INSERT INTO session_paid VALUES (?,?,?,?) ON CONFLICT(worker, key) DO UPDATE SET "
                 "amount=excluded.amount, updated=excluded.updated", (w, key, max(paid, want), now)),
                ("DELETE FROM session_paid WHERE updated < ?", (now - SESSION_ROWS_KEPT_S,))])

    def _raise_locked(self, worker: str, total: int, also: list[tuple[str, tuple]]) -> Voucher:
        """Sign `worker`'s cumulative voucher at `total` and store it with the `also` rows in one transaction (the
        book's lock held by the caller): a voucher counts only once it is on disk with what it accounts for."""
        v = sign_voucher(self.key, self.escrow.chain_id, self.escrow.address, worker, total)
        self.book._db.execute("BEGIN")
        self.book._db.execute("INSERT INTO issued VALUES (?,?,?,?) ON CONFLICT(worker) DO UPDATE SET "
                              "cumulative=excluded.cumulative, signature=excluded.signature, "
                              "updated=excluded.updated", (worker.lower(), total, v.signature, time.time()))
        for sql, args in also:
            self.book._db.execute(sql, args)
        self.book._db.execute("COMMIT")
        return v

    def totals(self) -> dict[str, int]:
        with self.book._lock:
            return {w: int(c) for w, c in self.book._db.execute("SELECT worker, cumulative FROM issued")}

    # ---- routed requests: a host paid up front, netted against what it reports it earned ----------------

    def routed(self, worker: str, cap: int) -> Voucher:
        """The voucher a routed request to host `worker` carries: it covers everything the host confirmed it
        earned from this entry plus `cap`, the most this request can cost (the host's offer; what this entry
        charged its own client for the host's part). Only the part above the previous high-water mark is new
        money, so a host is prepaid at most about one request's `cap` beyond what it earned. Durable first."""
        if cap < 0:
            raise ValueError("a request's cost is never negative")
        w = worker.lower()
        with self.book._lock:
            row = self.book._db.execute("SELECT confirmed, high FROM routed WHERE worker=?", (w,)).fetchone()
            confirmed, high = (int(row[0]), int(row[1])) if row else (0, 0)
            cur = self.book._db.execute("SELECT cumulative, signature FROM issued WHERE worker=?", (w,)).fetchone()
            total = int(cur[0]) if cur else 0
            want = confirmed + int(cap)
            if want <= high and cur is not None:
                return Voucher(self.address, checksum_address(worker), total, bytes(cur[1]))
            return self._raise_locked(worker, total + max(0, want - high), [
                ("INSERT INTO routed VALUES (?,?,?) ON CONFLICT(worker) DO UPDATE SET high=excluded.high",
                 (w, confirmed, max(high, want)))])

    def routed_earned(self, worker: str, reported: int) -> int:
        """The host says it earned `reported` in total from this entry's routed requests: netted into the next
        voucher, never above what this entry already vouchered it (a host that overstates gains nothing beyond
        the caps it was prepaid) and never lowered. -> what counts as confirmed now."""
        w = worker.lower()
        with self.book._lock:
            row = self.book._db.execute("SELECT confirmed, high FROM routed WHERE worker=?", (w,)).fetchone()
            if row is None:
                return 0
            confirmed = max(int(row[0]), min(int(reported), int(row[1])))
            self.book._db.execute("UPDATE routed SET confirmed=? WHERE worker=?", (confirmed, w))
        return confirmed


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

    def routed_work(self, entry: str, amount: int) -> None:
        """Record a routed request served for `entry` (its cost): owed like any work, and counted on its own as
        what this host reports it earned from the entry's routed requests (the entry nets its prepayment by it)."""
        if amount <= 0:
            return
        with self.book._lock:
            self.book._db.execute("BEGIN")
            for table in ("owed", "routed_owed"):
                self.book._db.execute(f"INSERT INTO {table} VALUES (?, ?) ON CONFLICT(entry) DO UPDATE SET "
                                      "amount = amount + ?", (entry.lower(), int(amount), int(amount)))
            self.book._db.execute("COMMIT")

    def routed_owed(self, entry: str) -> int:
        row = self.book._one("SELECT amount FROM routed_owed WHERE entry=?", entry.lower())
        return int(row[0]) if row else 0

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
        """Hold `v` if it raises the amount held from its entry (a checked voucher); True if it did. A voucher for
        another worker is never held, whoever skipped `check` (a redemption would pay that worker, not this one)."""
        if v.worker.lower() != self.worker.lower():
            return False
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


class WorkerLedger:
    """A worker's book as serving sees it (serving.work_pay.WorkerBook): its wallet's vouchers, and whether
    the escrow on chain covers them. Chain reads run in a thread and are cached for `coverage_ttl_s`
    (coverage only drops after an unlock request's delay, which the redeemer watches)."""

    def __init__(self, wallet: VoucherWallet, escrow: Any, *, coverage_ttl_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.vouchers = wallet
        self.escrow = escrow  # economics.escrow.Escrow
        self.coverage_ttl_s = coverage_ttl_s
        self.clock = clock
        self._coverage: dict[str, tuple[int, float]] = {}  # entry -> (coverage, read at)

    @property
    def wallet(self) -> str:
        return self.vouchers.worker

    def held(self, entry: str) -> int:
        v = self.vouchers.held(entry)
        return v.cumulative if v is not None else 0

    def owed(self, entry: str) -> int:
        return self.vouchers.owed(entry)

    def add_owed(self, entry: str, amount: int) -> None:
        self.vouchers.work(entry, amount)

    def add_routed(self, entry: str, amount: int) -> None:
        self.vouchers.routed_work(entry, amount)

    def routed_owed(self, entry: str) -> int:
        return self.vouchers.routed_owed(entry)

    def forget_coverage(self, entry: str | None = None) -> None:
        """Read coverage from the chain again next time (an unlock was requested)."""
        if entry is None:
            self._coverage.clear()
        else:
            self._coverage.pop(entry.lower(), None)

    async def coverage(self, entry: str, *, at_least: int = 0) -> int:
        """The channel's coverage for this worker; read again when the cached value is old or below
        `at_least` (coverage may have grown since)."""
        got = self._coverage.get(entry.lower())
        if got is not None and self.clock() - got[1] < self.coverage_ttl_s and got[0] >= at_least:
            return got[0]
        value = int(await asyncio.to_thread(self.escrow.coverage, entry, self.wallet))
        # Anyone may ask for work as a fresh entry address (each costs this node a chain read): the cache is
        # capped, the oldest read dropped first; rows in the book exist only for entries with escrow coverage.
        self._coverage.pop(entry.lower(), None)
        self._coverage[entry.lower()] = (value, self.clock())
        while len(self._coverage) > MAX_COVERAGE_CACHED:
            self._coverage.pop(next(iter(self._coverage)))
        return value

    async def accept(self, entry: str, voucher: Any) -> str | None:
        try:
            v = Voucher.from_json(voucher) if not isinstance(voucher, Voucher) else voucher
        except ValueError as e:
            return str(e)
        if v.cumulative <= self.held(entry) and v.entry.lower() == entry.lower():
            return None  # nothing new (a repeat, or an older one overtaken): not even worth checking
        # signature recovery (~30 ms in pure Python) and the fsync'd write run off the loop
        why = await asyncio.to_thread(self.vouchers.check, v, entry)
        if why is not None:
            return why
        cover = await self.coverage(entry, at_least=v.cumulative)
        if v.cumulative > cover:
            return f"voucher {v.cumulative} exceeds what the escrow covers for this worker ({cover})"
        await asyncio.to_thread(self.vouchers.keep, v)
        return None

    async def headroom(self, entry: str, at_least: int = 0) -> int:
        """Coverage beyond the best voucher held from `entry`; read on chain again when the cached value gives
        less than `at_least` (an entry that just locked a float is not refused for a stale read)."""
        held = self.held(entry)
        return max(0, await self.coverage(entry, at_least=held + at_least) - held)
