"""Escrow vouchers on a node (`mesh402 serve --escrow`; docs/payments.md).

One wallet (--pay-to, its key from --payout-key-file) plays both parts:
- as an entry, it pays the remote stages of its split requests: each hop whose node announces an `escrow`
  label for the same MeshEscrow and chain gets signed pay terms in the OPEN grant (its layer share of this
  node's prices) and cumulative vouchers from the entry's VoucherIssuer as the work is done;
- as a worker, its StageWorker requires those terms and vouchers (serving.work_pay.WorkerPay over the
  WorkerLedger: vouchers checked and kept in vouchers.sqlite, coverage read on chain), and the Redeemer turns
  the best vouchers into tokens every --redeem-every seconds.

Serving never imports economics: this module hands it the Protocol implementations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

from mesh402.economics.vouchers import EscrowRef, VoucherBook, VoucherIssuer, VoucherWallet, WorkerLedger
from mesh402.node.escrow_jobs import EscrowKeeper, Redeemer
from mesh402.serving.work_pay import WorkerPay, WorkTerms, is_address, share_terms
from mesh402.settings import PaymentsConfig

ESCROW_LABEL = "escrow"
LABEL_LIMIT = 512  # bytes of an announced escrow label
MAX_PAID_WORKERS = 1024  # worker wallets whose floats the keeper tends (the most recently paid)
KEEPER_EVERY_S = 15.0  # the keeper's rounds: chain reads only, a transaction when a float runs low


@dataclass(frozen=True)
class EscrowLabel:
    """What a node announces so entries can pay it: its wallet, and the escrow and chain its vouchers bind to."""

    wallet: str
    escrow: str
    chain: int

    def to_label(self) -> str:
        return json.dumps({"wallet": self.wallet, "escrow": self.escrow, "chain": self.chain}, separators=(",", ":"))

    @classmethod
    def parse(cls, raw: Any) -> "EscrowLabel | None":
        """A peer's label (untrusted gossip): None unless it is small, JSON and typed."""
        if not isinstance(raw, str) or len(raw) > LABEL_LIMIT:
            return None
        try:
            d = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(d, dict) or not is_address(d.get("wallet")) or not is_address(d.get("escrow")):
            return None
        chain = d.get("chain")
        if type(chain) is not int or not 0 < chain < 1 << 64:
            return None
        return cls(str(d["wallet"]), str(d["escrow"]), chain)

    def same_escrow(self, other: "EscrowLabel") -> bool:
        return self.escrow.lower() == other.escrow.lower() and self.chain == other.chain


class EscrowPay:
    """This node's voucher book, its worker rule and its redeemer, wired into the distributed runtime."""

    def __init__(self, payments: PaymentsConfig, home: Path) -> None:
        from mesh402.economics.chain import web3_for  # lazy: web3 only on a node that pays with vouchers
        from mesh402.economics.escrow import Escrow

        assert payments.escrow and payments.escrow_rpc_url and payments.payout_key and payments.pay_to
        self.payments = payments
        self.escrow = Escrow(web3_for(payments.escrow_rpc_url), payments.escrow)
        ref = EscrowRef(payments.escrow_chain_id, self.escrow.address)
        book = VoucherBook(home)
        self.issuer = VoucherIssuer(book, payments.payout_key, ref)
        self.wallet = VoucherWallet(book, self.issuer.address, ref)
        self.ledger = WorkerLedger(self.wallet, self.escrow)
        self.worker_pay = WorkerPay(self.ledger)
        self.redeemer = Redeemer(self.escrow, self.wallet, payments.payout_key, every_s=payments.redeem_every_s)
        self.label = EscrowLabel(self.issuer.address, self.escrow.address, ref.chain_id)
        self.peer_labels: Callable[[], dict[str, dict[str, str]]] = dict
        self.paid: dict[str, None] = {}  # worker wallets this entry gave terms to, oldest first (bounded)
        self.keeper: EscrowKeeper | None = None
        if payments.escrow_float > 0:
            self.keeper = EscrowKeeper(self.escrow, self.issuer, payments.payout_key, self.workers,
                                       float_amount=payments.escrow_float, every_s=KEEPER_EVERY_S)
        self.hosted: Callable[[], dict[str, Any]] = dict

    def attach(self, dist: Any) -> None:
        """Hand the distributed runtime (serving) what it needs: the worker rule, the entry's signer and terms."""
        dist.worker.pay = self.worker_pay
        dist.voucher_signer = self.issuer
        dist.pay_terms_for = self.terms
        dist.expert_terms_for = self.expert_terms
        dist.expert_service.pay = self.worker_pay  # expert work is paid like stage work
        dist.expert_service.payer_of = self.wallet_of
        dist.worker.payer_of = self.wallet_of  # a stage's terms must name the wallet its host announces
        dist.pay_labels = {ESCROW_LABEL: self.label.to_label()}
        self.peer_labels = dist._peer_labels
        self.hosted = lambda: dist.hosted

    def _wallet_of(self, peers: dict[str, dict[str, str]], node: str) -> str | None:
        theirs = EscrowLabel.parse(peers.get(node, {}).get(ESCROW_LABEL))
        return theirs.wallet if theirs is not None and theirs.same_escrow(self.label) else None

    def wallet_of(self, node: str) -> str | None:
        """The wallet peer `node` announces on this node's escrow (None: none): who may pay from it here."""
        return self._wallet_of(self.peer_labels(), node)

    def workers(self) -> set[str]:
        """The wallets whose floats the keeper tends: the stages of the chains this node hosts now (so a
        float is locked before their first request) and every worker it paid recently."""
        peers = self.peer_labels()
        out = set(self.paid)
        for h in list(self.hosted().values()):
            for hop in getattr(getattr(h.serving, "chain", None), "hops", ()):
                wallet = self._wallet_of(peers, hop.node)
                if wallet is not None:
                    out.add(wallet.lower())
        return out

    def terms(self, chain: Any, n_layers: int) -> dict[str, WorkTerms]:
        """Pay terms for every hop of `chain` whose node announces a wallet on this escrow: its layer share of
        this node's prices (a hop without a valid label is not paid by vouchers)."""
        peers = self.peer_labels()
        out: dict[str, WorkTerms] = {}
        for h in chain.hops:
            wallet = self._wallet_of(peers, h.node)
            if wallet is None or n_layers <= 0:
                continue
            out[h.node] = share_terms(self.label.wallet, wallet, Fraction(h.end - h.start, n_layers),
                                      self.payments.price_per_request, self.payments.price_per_1k_tokens)
            self._mark_paid(wallet)
        return out

    def expert_terms(self, plan: Any, model_path: str) -> dict[str, WorkTerms]:
        """Pay terms for every expert node of `plan` that announces a wallet on this escrow: the expected share of
        this node's per-request price its experts compute, and its per-1k price per row it runs
        (work.units.expert_pay_shares; an expert held by several nodes is split between them)."""
        from mesh402.models.gguf_meta import read_gguf_meta
        from mesh402.work.units import expert_pay_shares

        meta = read_gguf_meta(model_path)
        copies: dict[tuple[int, int], int] = {}
        for shard in plan.shards:
            for ex in shard.experts:
                copies[(int(ex[0]), int(ex[1]))] = copies.get((int(ex[0]), int(ex[1])), 0) + 1
        peers = self.peer_labels()
        out: dict[str, WorkTerms] = {}
        for shard in plan.shards:
            wallet = self._wallet_of(peers, shard.node_id)
            if wallet is None or shard.node_id == plan.host:
                continue
            share, per_row = expert_pay_shares(meta, [(int(e[0]), int(e[1])) for e in shard.experts], copies)
            out[shard.node_id] = share_terms(self.label.wallet, wallet, share, self.payments.price_per_request,
                                             self.payments.price_per_1k_tokens, per_token_share=per_row)
            self._mark_paid(wallet)
        return out

    def routed_vouchers(self) -> "RoutedVouchers":
        """The entry's side of routed requests to hosts on the same escrow (economics.upstream.UpstreamBuyer)."""
        return RoutedVouchers(self)

    def _mark_paid(self, wallet: str) -> None:
        """A worker this node pays: the keeper tends its float (the most recently paid MAX_PAID_WORKERS)."""
        if wallet.lower() in self.paid:
            return
        self.paid[wallet.lower()] = None
        while len(self.paid) > MAX_PAID_WORKERS:
            del self.paid[next(iter(self.paid))]
        if self.keeper is not None:
            self.keeper.kick()  # a new worker: lock its float before its next request needs it

    def start(self) -> None:
        self.redeemer.start()
        if self.keeper is not None:
            self.keeper.start()

    async def stop(self) -> None:
        await self.redeemer.stop()
        if self.keeper is not None:
            await self.keeper.stop()

    def status(self) -> dict[str, Any]:
        """For `mesh402 status`: vouchers held and owed per entry, issued per worker, redemptions."""
        return {"wallet": self.label.wallet, "escrow": self.label.escrow, "chain": self.label.chain,
                "held": self.wallet.summary(), "issued": self.issuer.totals(),
                "redeemer": self.redeemer.status(), "escrow_free": self.redeemer.free_balance,
                "worker": self.worker_pay.status(),
                "keeper": self.keeper.status() if self.keeper is not None else None}


EARNED_LIMIT = 1 << 64


class RoutedVouchers:
    """An entry paying the hosts it routes requests to with escrow vouchers (economics.upstream.RoutedVoucherSource):
    each request carries a voucher covering what the host confirmed it earned, the most the requests in flight to
    it can cost, and this one's most (VoucherIssuer.routed); the host's report of what it earned nets the
    prepayment into later vouchers."""

    def __init__(self, pay: EscrowPay) -> None:
        self.pay = pay
        self.inflight: dict[str, int] = {}  # host wallet -> the most its requests in flight can cost

    def _wallet(self, host: str) -> str | None:
        return self.pay._wallet_of(self.pay.peer_labels(), host)

    def voucher(self, host: str, most: int) -> tuple[str, Callable[[], None]] | None:
        wallet = self._wallet(host)
        if wallet is None or most <= 0:
            return None
        w = wallet.lower()
        self.inflight[w] = self.inflight.get(w, 0) + int(most)
        try:
            v = self.pay.issuer.routed(wallet, self.inflight[w])
        except BaseException:
            self._done(w, most)
            raise
        self.pay._mark_paid(wallet)
        ended = [False]

        def done() -> None:
            if not ended[0]:
                ended[0] = True
                self._done(w, most)
        return json.dumps(v.to_json(), separators=(",", ":")), done

    def _done(self, wallet: str, most: int) -> None:
        left = self.inflight.get(wallet, 0) - int(most)
        if left > 0:
            self.inflight[wallet] = left
        else:
            self.inflight.pop(wallet, None)

    def earned(self, host: str, reported: str) -> None:
        wallet = self._wallet(host)
        if wallet is None or not isinstance(reported, str) or not reported.isdigit() or len(reported) > 20:
            return
        value = int(reported)
        if value < EARNED_LIMIT:
            self.pay.issuer.routed_earned(wallet, value)
