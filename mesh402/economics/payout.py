"""Pay one epoch's revenue to the nodes that served it, by work units, through EpochRewards.

Shared by `mesh402 payout` (a person or cron) and the entry node's EpochCloser (automatic payouts). The
caller runs the validation round first (or passes `validate`); this module reads its outcome on chain,
withholds the stage nodes without a passed spot check, posts feedback for failures, publishes the Merkle
root and, with `push`, sends every claim. Chain calls block: the node runs this in a thread.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mesh402.economics.chain import web3_for
from mesh402.economics.erc8004 import identity_contract, registered_agents
from mesh402.economics.evm import tx_hex
from mesh402.economics import rewards as epoch_rewards
from mesh402.economics.rewards import (
    EpochPayout,
    EpochPublished,
    epoch_revenue,
    plan_epoch,
    publish_epoch,
    publish_tx,
    unclaimed,
    withhold,
)
from mesh402.economics.quorum_checks import QUORUM_PREFIX, quorum_running, quorum_status
from mesh402.economics.validation_registry import (
    RegistryError,
    payout_condition,
    post_feedback,
    spot_check_failed,
    validation_status,
)
from mesh402.home import Home, HomeBusy
from mesh402.mesh.identity import KEY_FILE, NodeIdentity
from mesh402.work.store import ReceiptStore

PAYOUT_LOCK = "payout.lock"  # held while an epoch is paid from this home

Log = Callable[[str], None]


class PayoutError(RuntimeError):
    """Why an epoch was not paid, in one line."""


class QuorumPending(PayoutError):
    """Some stage's quorum check is not executed yet (serve --quorum): the epoch is paid after it is."""


class NoReceipts(PayoutError):
    """The epoch has no work receipts: there is nothing to split (not a failure)."""


class AlreadyPaid(PayoutError):
    """This wallet already published the epoch (EpochRewards takes one root per distributor and epoch)."""


@dataclass
class PayoutChain:
    """Where an epoch is paid: the chain, the EpochRewards contract and the ERC-8004 registries."""
    rpc_url: str
    rewards: str
    registries: dict[str, str] = field(default_factory=dict)  # IdentityRegistry, ValidationRegistry, ReputationRegistry

    def registry(self, name: str) -> str:
        addr = self.registries.get(name)
        if not addr:
            raise PayoutError(f"no {name} address (pass --deployment, --network or its address)")
        return addr


@dataclass
class PayoutResult:
    epoch: int
    plan: EpochPayout
    failed: dict[str, Any] = field(default_factory=dict)  # node id -> ValidationStatus of a failed spot check
    gas: dict[str, int] = field(default_factory=dict)
    claim_txs: list[str] = field(default_factory=list)
    claims_file: Path | None = None

    @property
    def published(self) -> bool:
        return self.plan.tx is not None

    @property
    def paid(self) -> dict[str, int]:
        """Payout account -> amount sent to it in this epoch's tree."""
        return dict(self.plan.tree.amounts) if self.plan.tree else {}


def pay_epoch(home: Path, epoch: int, chain: PayoutChain, *, key: str | None, epoch_s: int, push: bool = False,
              require_validation: bool = True, dry_run: bool = False, validate: Callable[[int], Any] | None = None,
              log: Log = print, warn: Log | None = None, w3: Any = None) -> PayoutResult:
    """Plan, gate on validation and pay `epoch` from the wallet of `key` (the entry's revenue wallet).
    `validate(epoch)` runs the validation round once the epoch is known to have receipts (skipped on a
    dry run). Raises NoReceipts, AlreadyPaid or PayoutError; what it did goes to `log` as it goes."""
    warn = warn or log
    home = Path(home)
    if not (home / "receipts.sqlite").exists():
        raise NoReceipts(f"no receipts in {home} (a paid entry node keeps them for split requests)")
    pay = functools.partial(_pay_epoch, home, epoch, chain, key=key, epoch_s=epoch_s, push=push,
                            require_validation=require_validation, dry_run=dry_run, validate=validate, log=log,
                            warn=warn, w3=w3)
    if dry_run:  # writes nothing
        return pay()
    try:  # one payout per home at a time: `mesh402 payout` and the node's EpochCloser write the same records
        lock = Home(home).lock(PAYOUT_LOCK, "a payout")
    except HomeBusy as e:
        raise PayoutError(str(e)) from None
    try:
        return pay()
    finally:
        lock.release()


def _pay_epoch(home: Path, epoch: int, chain: PayoutChain, *, key: str | None, epoch_s: int, push: bool,
               require_validation: bool, dry_run: bool, validate: Callable[[int], Any] | None, log: Log, warn: Log,
               w3: Any) -> PayoutResult:

    w3 = w3 or web3_for(chain.rpc_url)
    store = ReceiptStore(home / "receipts.sqlite")  # its own connection: the node's is used on the event loop
    try:
        revenue = epoch_revenue(home / "payments.sqlite", epoch, epoch_s)
        plan = plan_epoch(store, epoch, None, _payout_accounts(w3, chain.registry("IdentityRegistry")), revenue=revenue)
        if not plan.units:
            raise NoReceipts(f"epoch {epoch}: no receipts")
        result = PayoutResult(epoch, plan)
        if require_validation and not dry_run and validate is not None:
            validate(epoch)
        if require_validation:
            vreg = chain.registry("ValidationRegistry")
            try:
                result.failed = _gate_on_validation(w3, vreg, store, plan, _entry_node(home, store, epoch))
            except QuorumPending:
                raise
            except Exception as e:  # RPC down, wrong address
                raise PayoutError(f"cannot read the spot checks' validations from {vreg}: {e}") from e
        for line in plan_lines(plan):
            log(line)
        if dry_run:
            return result
        if not key:
            raise PayoutError("no payout key (the key of the wallet that holds the revenue)")
        if result.failed:
            _feedback_for_failures(w3, key, chain.registry("ReputationRegistry"), store, epoch, result.failed, log, warn)
        if not any(plan.amounts.get(n, 0) > 0 for n in plan.accounts):
            raise PayoutError("nothing to pay: no node with work in this epoch has a verified agent wallet"
                              + (" and a passed spot check" if require_validation else ""))
        try:
            try:
                publish_epoch(w3, key, chain.rewards, plan)
                result.gas["approve+publish"] = int(plan.gas or 0)
            except EpochPublished as e:
                if store.payout_recorded(epoch):
                    raise AlreadyPaid(f"epoch {epoch} is already published and recorded: it is paid") from e
                if e.root != e.tree.root:
                    raise AlreadyPaid(f"epoch {epoch} is already published from this wallet with another root "
                                      f"(0x{e.root.hex()[:16]}…): its receipts, revenue or accounts changed since") from e
                # published, then the node stopped before recording it: finish the same payout
                plan.tree, plan.tx = e.tree, publish_tx(w3, chain.rewards, e.tree.epoch_id)
                warn(f"epoch {epoch} was published before (in {plan.tx}) but not recorded: finishing that payout")
            if push:  # only the accounts still unclaimed, so a retry after a failed claim sends the rest
                # through the module: each claim is its own transaction, and a stop between two is a real case
                receipts = [epoch_rewards.claim(w3, key, chain.rewards, plan.tree, a)
                            for a in unclaimed(w3, chain.rewards, plan.tree)]
                result.gas["claims"] = sum(int(r["gasUsed"]) for r in receipts)
                result.claim_txs = [tx_hex(r["transactionHash"]) for r in receipts]
        except AlreadyPaid:
            raise
        except Exception as e:
            raise PayoutError(f"payout failed: {e}") from e
        store.save_payout(epoch, revenue, {n: (plan.units[n], plan.amounts[n], plan.accounts.get(n)) for n in plan.units},
                          epoch_id=hex(plan.tree.epoch_id), root=plan.tree.root.hex(), tx=plan.tx)
        result.claims_file = _write_claims(home, plan, chain.rewards)
        log(f"published epoch {epoch} root 0x{plan.tree.root.hex()[:16]}… in {plan.tx}; gas "
            + ", ".join(f"{k} {v}" for k, v in result.gas.items()))
        log(f"claims: {result.claims_file}" + (" (all sent)" if push else ""))
        return result
    finally:
        store.close()


def _payout_accounts(w3: Any, identity_registry: str) -> dict[str, str]:
    """node id -> the agentWallet of its ERC-8004 agent whose node binding verifies."""
    accounts: dict[str, str] = {}
    ident = identity_contract(w3, identity_registry)
    for info in registered_agents(w3, ident.address):
        if info.node_id:
            wallet = ident.functions.getAgentWallet(info.agent_id).call()
            if int(wallet, 16):
                accounts[info.node_id] = wallet
    return accounts


def _write_claims(home: Path, plan: EpochPayout, rewards: str) -> Path:
    """<home>/payout-epoch-N.json: each account's amount and Merkle proof, for claims not pushed."""
    assert plan.tree is not None
    proofs = {a: {"amount": v, "proof": ["0x" + p.hex() for p in plan.tree.proofs[a]]} for a, v in plan.tree.amounts.items()}
    path = home / f"payout-epoch-{plan.epoch}.json"
    path.write_text(json.dumps({"epoch": plan.epoch, "epochId": hex(plan.tree.epoch_id), "root": "0x" + plan.tree.root.hex(),
                                "rewards": rewards, "tx": plan.tx, "claims": proofs}, indent=1))
    return path


def _entry_node(home: Path, store: Any, epoch: int) -> str:
    """This entry's own node id: its node key, else the node that ran stage 0 of most of the epoch's requests."""
    from collections import Counter

    if (home / KEY_FILE).exists():
        return NodeIdentity.load_or_create(home).node_id_hex
    firsts = Counter(r.node_id for r in store.epoch_receipts(epoch) if r.stage == 0)
    return firsts.most_common(1)[0][0] if firsts else ""


def _gate_on_validation(w3: Any, validation_registry: str, store: Any, plan: EpochPayout, entry: str) -> dict[str, Any]:
    """Withhold every stage node without a passed spot check (validation.payout_condition); the nodes
    whose check failed, with their on-chain status."""
    rows = store.validations(plan.epoch)
    running = sorted(n for n, r in rows.items() if n in plan.units and r["validator"].startswith(QUORUM_PREFIX)
                     and quorum_running(w3, r["validator"], r["request_hash"]))
    if running:  # publishing now would keep their shares for good: wait for the quorum (an automatic payout retries)
        raise QuorumPending(f"epoch {plan.epoch}: quorum checks still running for "
                            f"{', '.join(n[:12] for n in running)}; pay once they are executed")

    def status(row: dict[str, Any]) -> Any:
        if row["validator"].startswith(QUORUM_PREFIX):  # decided by the validator quorum (serve --quorum)
            return quorum_status(w3, row["validator"], row["request_hash"], row["agent_id"])
        return validation_status(w3, validation_registry, row["request_hash"])
    statuses = {n: status(rows[n]) if n in rows else None for n in plan.units if n != entry}
    validators = {n: r["validator"] for n, r in rows.items()}
    _, reasons = payout_condition(plan.units, entry, statuses, validators=validators)
    withhold(plan, reasons)
    return {n: st for n, st in statuses.items() if spot_check_failed(st, validators.get(n))}


def plan_lines(plan: EpochPayout) -> list[str]:
    """The split, one line per node (what `mesh402 payout` prints and the node logs)."""
    total_units = sum(plan.units.values())
    out = [f"epoch {plan.epoch}: revenue {plan.revenue / 1e6:.6f}, {len(plan.units)} nodes, {total_units:.4g} work units"]
    for node, u in sorted(plan.units.items()):
        if node in plan.withheld:
            to = f"withheld ({plan.withheld[node]}): kept by the entry"
        else:
            to = "to " + (plan.accounts.get(node) or "(no verified agent: kept by the entry)")
        out.append(f"  {node[:12]}  units {u:.4g} ({u / max(total_units, 1):.1%})  pays {plan.amounts[node] / 1e6:.6f}  " + to)
    return out


def _feedback_for_failures(w3: Any, key: str, reputation: str, store: Any, epoch: int, failed: dict[str, Any],
                           log: Log, warn: Log) -> None:
    """Post ReputationRegistry feedback 0 ("mesh402"/"spot-check-failed") for each failed node, once per
    (epoch, node): the tx is recorded in the validations row's verdict, so a rerun does not post again."""
    rows = store.validations(epoch)
    for node, st in sorted(failed.items()):
        row = rows[node]
        verdict = verdict_dict(row["verdict"])
        if verdict.get("feedback_tx"):
            log(f"  {node[:12]}: feedback already posted in {verdict['feedback_tx']}")
            continue
        try:
            rcpt = post_feedback(w3, key, reputation, st.agent_id, 0, feedback_hash=st.request_hash)
        except RegistryError as e:  # e.g. the payout wallet owns that agent: warn, the payout goes on
            warn(f"no feedback for {node[:12]}: {e}")
            continue
        verdict.update(feedback_tx=tx_hex(rcpt["transactionHash"]), feedback_agent=st.agent_id)
        store.save_validation(epoch, node, row["request_hash"], row["validator"], row["agent_id"], row["statement"],
                              json.dumps(verdict, sort_keys=True))
        log(f"  {node[:12]}: spot check failed, feedback 0 posted to agent {st.agent_id}")


def verdict_dict(text: str | None) -> dict[str, Any]:
    """A validations row's verdict as a dict (a non-JSON verdict is kept under "verdict")."""
    if not text:
        return {}
    try:
        v = json.loads(text)
    except ValueError:
        return {"verdict": text}
    return v if isinstance(v, dict) else {"verdict": v}
