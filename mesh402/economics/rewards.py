"""Epoch payouts through the EpochRewards contract: Merkle trees over (epochId, account, amount).

The tree matches OpenZeppelin's MerkleProof: each leaf is keccak256(keccak256(abi.encode(uint256 epochId,
address account, uint256 amount))), and inner nodes hash their two children in sorted order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh402.economics.chain import contract_at
from mesh402.economics.evm import account_of, send_tx, tx_hex
from mesh402.work.units import split_pro_rata


def _keccak(data: bytes) -> bytes:
    from eth_utils import keccak
    return keccak(data)


def leaf_hash(epoch_id: int, account: str, amount: int) -> bytes:
    from eth_abi import encode
    return _keccak(_keccak(encode(["uint256", "address", "uint256"], [epoch_id, account, amount])))


def _pair(a: bytes, b: bytes) -> bytes:
    return _keccak(a + b if a < b else b + a)


@dataclass
class PayoutTree:
    epoch_id: int
    amounts: dict[str, int]  # checksummed account -> atomic amount
    root: bytes
    proofs: dict[str, list[bytes]]

    @property
    def total(self) -> int:
        return sum(self.amounts.values())


def build_tree(epoch_id: int, amounts: dict[str, int]) -> PayoutTree:
    """A Merkle tree paying each account its amount in one epoch (accounts with 0 are left out)."""
    from eth_utils import to_checksum_address
    items = sorted((to_checksum_address(a), int(v)) for a, v in amounts.items() if int(v) > 0)
    if not items:
        raise ValueError("an epoch payout needs at least one account with a positive amount")
    leaves = [leaf_hash(epoch_id, a, v) for a, v in items]
    proofs: dict[str, list[bytes]] = {a: [] for a, _ in items}
    # position of each account's node in the current level
    pos = {a: i for i, (a, _) in enumerate(items)}
    level = leaves
    while len(level) > 1:
        nxt = [_pair(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
        for a, i in pos.items():
            sib = i ^ 1
            if sib < len(level):
                proofs[a].append(level[sib])
            pos[a] = i // 2
        level = nxt
    return PayoutTree(epoch_id, dict(items), level[0], proofs)



# ---- epoch payouts -----------------------------------------------------------------------------

@dataclass
class EpochPayout:
    epoch: int
    revenue: int
    units: dict[str, int]  # node id -> work units
    amounts: dict[str, int]  # node id -> atomic token units
    accounts: dict[str, str]  # node id -> payout address
    tree: PayoutTree | None = None
    tx: str | None = None
    gas: int | None = None
    withheld: dict[str, str] = field(default_factory=dict)  # node id -> why it is not paid this epoch


def epoch_revenue(ledger_path: Path, epoch: int, epoch_s: int) -> int:
    """Revenue the entry node earned in an epoch, from its payment ledger: settled per-request payments
    made in the epoch, plus prepaid credit drawn down by usage in the epoch (credit is earned when used)."""
    import sqlite3
    if not Path(ledger_path).exists():
        return 0
    t0, t1 = epoch * epoch_s, (epoch + 1) * epoch_s
    db = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
    try:
        paid = db.execute("SELECT COALESCE(SUM(amount),0) FROM payments WHERE state='settled' AND kind='request' "
                          "AND created >= ? AND created < ?", (t0, t1)).fetchone()[0]
        used = db.execute("SELECT COALESCE(-SUM(delta),0) FROM credit_events WHERE kind='usage' AND ts >= ? AND ts < ?",
                          (t0, t1)).fetchone()[0]
    finally:
        db.close()
    return int(paid) + int(used)


def plan_epoch(store: Any, epoch: int, flops: Any, accounts: dict[str, str], *, revenue: int | None = None
               ) -> EpochPayout:
    """Split the epoch's revenue (default: what the receipts store recorded) among the nodes in its receipts
    by work units. Nodes with no payout account (no verified ERC-8004 agent wallet) keep their share in
    `amounts` but get no leaf; their share stays with the entry node until they register."""
    units = store.work_units(epoch, flops)
    revenue = store.revenue(epoch) if revenue is None else int(revenue)
    return EpochPayout(epoch, revenue, units, split_pro_rata(revenue, units),
                       {n: a for n, a in accounts.items() if n in units})


def withhold(plan: EpochPayout, reasons: dict[str, str]) -> EpochPayout:
    """Withhold these nodes' shares (e.g. a failed or missing spot check: validation.payout_condition).
    Their amounts stay recorded but they lose their account, so they get no leaf and the share stays
    with the entry node, as for a node without an agent wallet."""
    plan.withheld.update(reasons)
    plan.accounts = {n: a for n, a in plan.accounts.items() if n not in plan.withheld}
    return plan


class EpochPublished(RuntimeError):
    """The wallet already published this epoch (EpochRewards allows one root per distributor and epoch).
    `tree` is what it would publish now, `root` what is on chain: equal when a crash came between the
    publish and its record, so the payout can be finished instead of lost."""

    def __init__(self, message: str, tree: PayoutTree, root: bytes):
        super().__init__(message)
        self.tree, self.root = tree, root


def epoch_tree(w3: Any, key: str, rewards_address: str, plan: EpochPayout) -> PayoutTree:
    """The Merkle tree the wallet of `key` publishes for `plan` (amounts summed per payout account)."""
    rw = contract_at(w3, "EpochRewards", rewards_address)
    by_account: dict[str, int] = {}
    for node, amount in plan.amounts.items():
        acct = plan.accounts.get(node)
        if acct and amount > 0:
            by_account[acct] = by_account.get(acct, 0) + amount
    return build_tree(int(rw.functions.epochId(account_of(key).address, plan.epoch).call()), by_account)


def publish_epoch(w3: Any, key: str, rewards_address: str, plan: EpochPayout) -> EpochPayout:
    """Fund and publish the epoch's Merkle root in EpochRewards (approve + publish, from the entry node's key)."""
    rw = contract_at(w3, "EpochRewards", rewards_address)
    token = contract_at(w3, "MeshUSDC", rw.functions.token().call())
    tree = epoch_tree(w3, key, rewards_address, plan)
    distributor, root, _, _ = rw.functions.getEpoch(tree.epoch_id).call()
    if int(distributor, 16):  # checked before the approve, which would succeed
        raise EpochPublished(f"epoch {plan.epoch} is already published from {account_of(key).address}", tree, bytes(root))
    gas = int(send_tx(w3, key, token.functions.approve(rw.address, tree.total))["gasUsed"])
    rcpt = send_tx(w3, key, rw.functions.publish(plan.epoch, tree.root, tree.total))
    plan.tree, plan.tx, plan.gas = tree, tx_hex(rcpt["transactionHash"]), gas + int(rcpt["gasUsed"])
    return plan


def publish_tx(w3: Any, rewards_address: str, epoch_id: int) -> str | None:
    """The transaction that published an epoch (its EpochPublished event), None if not found."""
    rw = contract_at(w3, "EpochRewards", rewards_address)
    logs = rw.events.EpochPublished().get_logs(from_block=0, argument_filters={"epochId": epoch_id})
    return tx_hex(logs[-1]["transactionHash"]) if logs else None


def unclaimed(w3: Any, rewards_address: str, tree: PayoutTree) -> list[str]:
    """The tree's accounts that have not claimed yet."""
    rw = contract_at(w3, "EpochRewards", rewards_address)
    return [a for a in tree.amounts if not rw.functions.isClaimed(tree.epoch_id, a).call()]


def claim(w3: Any, key: str, rewards_address: str, tree: PayoutTree, account: str) -> Any:
    """Claim `account`'s payout from a published tree (any key may send it; the tokens go to `account`)."""
    from eth_utils import to_checksum_address

    a = to_checksum_address(account)
    rw = contract_at(w3, "EpochRewards", rewards_address)
    return send_tx(w3, key, rw.functions.claim(tree.epoch_id, a, tree.amounts[a], tree.proofs[a]))
