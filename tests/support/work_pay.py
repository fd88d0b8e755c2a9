"""Test helpers for paying workers with vouchers without a chain: the real issuer, wallet and ledger
(economics.vouchers) over a stand-in for the escrow's coverage view, which is all the ledger reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh402.economics.vouchers import EscrowRef, VoucherBook, VoucherIssuer, VoucherWallet, WorkerLedger
from mesh402.serving.work_pay import WorkerPay, WorkTerms

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


@dataclass
class PaidSplit:
    """An entry's issuer paying the stages of an in-process split (tests/support/pipeline.py), each stage
    with its own wallet, ledger and WorkerPay."""

    issuer: VoucherIssuer
    wallets: dict[str, VoucherWallet]
    pays: dict[str, WorkerPay]
    chain: CoverageView


class StingySigner:
    """An entry that stops raising its vouchers after `keep` of them (it re-sends the last one): the hostile
    entry of issue 14 test (b), in process."""

    def __init__(self, issuer: VoucherIssuer, keep: int) -> None:
        self.issuer = issuer
        self.keep = keep
        self.last: dict[str, Any] = {}

    @property
    def address(self) -> str:
        return self.issuer.address

    def pay_to_total(self, worker: str, key: str, micro: int) -> Any:
        if self.keep > 0 or worker not in self.last:
            self.keep -= 1
            self.last[worker] = self.issuer.pay_to_total(worker, key, micro)
        return self.last[worker]


def pay_split(tmp: Path, model: Any, workers: dict[str, Any], coverage: int, *, rate: int = 250_000,
              flat: int = 2) -> PaidSplit:
    """Make `model` (a PipelineModel) pay every worker in `workers` (name -> StageWorker; results keyed by name) `flat` plus
    `rate` millionths per token, each worker requiring it; every channel covers `coverage`."""
    from eth_account import Account

    entry = Account.create()
    issuer = VoucherIssuer(VoucherBook(tmp / "entry"), "0x" + entry.key.hex().removeprefix("0x"), ESCROW)
    chain = CoverageView()
    wallets, pays = {}, {}
    for node, w in workers.items():
        acct = Account.create()
        wallets[node] = VoucherWallet(VoucherBook(tmp / node), acct.address, ESCROW)
        pays[node] = w.pay = WorkerPay(WorkerLedger(wallets[node], chain, coverage_ttl_s=0.0))
        chain.set(entry.address, acct.address, coverage)
    by_node = {w.node_id: name for name, w in workers.items()}  # the plan's hops name node ids, tests use names
    model.voucher_signer = issuer
    model.pay_terms = lambda c: {h.node: WorkTerms(issuer.address, wallets[by_node[h.node]].worker, flat, rate)
                                 for h in c.hops if h.node in by_node}
    return PaidSplit(issuer, wallets, pays, chain)
