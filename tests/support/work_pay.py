"""Test helpers for paying workers with vouchers without a chain: the real issuer, wallet and ledger
(economics.vouchers) over a stand-in for the escrow's coverage view, which is all the ledger reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mesh402.economics.vouchers import EscrowRef, VoucherBook, VoucherIssuer, VoucherWallet, WorkerLedger

ESCROW = EscrowRef(31337, "0x" + "e5" * 20)


@dataclass
class CoverageView:
    """What MeshEscrow.coverage(entry, worker) would answer: set by the test, counted when read."""

    amounts: dict[tuple[str, str], int] = field(default_factory=dict)
    reads: int = 0

    def set(self, entry: str, worker: str, amount: int) -> None:
        self.amounts[(entry.lower(), worker.lower())] = amount

    def coverage(self, entry: str, worker: str) -> int:
        self.reads += 1
        return self.amounts.get((entry.lower(), worker.lower()), 0)


@dataclass
class PayPair:
    """An entry's issuer and one worker's ledger, each with its own voucher file."""

    issuer: VoucherIssuer
    wallet: VoucherWallet
    ledger: WorkerLedger
    chain: CoverageView


def pay_pair(tmp: Path, coverage: int) -> PayPair:
    from eth_account import Account

    entry, worker = Account.create(), Account.create()
    issuer = VoucherIssuer(VoucherBook(tmp / "entry"), "0x" + entry.key.hex().removeprefix("0x"), ESCROW)
    wallet = VoucherWallet(VoucherBook(tmp / "worker"), worker.address, ESCROW)
    chain = CoverageView()
    chain.set(entry.address, worker.address, coverage)
    return PayPair(issuer, wallet, WorkerLedger(wallet, chain, coverage_ttl_s=0.0), chain)
