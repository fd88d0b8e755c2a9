"""Epoch payouts through the EpochRewards contract: Merkle trees over (epochId, account, amount).

The tree matches OpenZeppelin's MerkleProof: each leaf is keccak256(keccak256(abi.encode(uint256 epochId,
address account, uint256 amount))), and inner nodes hash their two children in sorted order.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def verify_proof(root: bytes, leaf: bytes, proof: list[bytes]) -> bool:
    h = leaf
    for p in proof:
        h = _pair(h, p)
    return h == root
