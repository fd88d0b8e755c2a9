"""Test helpers for escrow-voucher scenarios on real nodes and a dev chain: the `serve` flags of a node paid
(and paying) with vouchers, funding an entry's escrow for one worker, and what a node's status says."""

from __future__ import annotations

from typing import Any

from harness.dev_chain import DevChain
from harness.mesh_nodes import MeshNode

USDC = 10**6


def escrow_args(chain: DevChain, fac_url: str, account: str, redeem_every: float = 2.0) -> list[str]:
    """A priced node (0.01 USDC per request, x402) whose wallet is `account` and that pays and is paid with
    escrow vouchers, redeeming every `redeem_every` seconds."""
    return ["--price", "0.01", "--pay-to", account, "--deployment", str(chain.dir), "--facilitator", fac_url,
            "--escrow", "--payout-key-file", str(chain.dep.key_file(account)), "--redeem-every", str(redeem_every)]


def escrow_of(chain: DevChain) -> Any:
    from mesh402.economics.escrow import Escrow
    return Escrow(chain.w3(), chain.dep.contracts["MeshEscrow"])


def fund_escrow(chain: DevChain, entry: str, worker: str, amount: int) -> None:
    """`entry` (an account name) gets `amount` test USDC from buyer-0, deposits it and locks it for `worker`."""
    chain.transfer("buyer-0", entry, amount)
    esc, key = escrow_of(chain), chain.key(entry)
    esc.deposit(key, amount)
    esc.lock(key, {chain.dep.address(worker): amount})


def escrow_status(node: MeshNode) -> dict[str, Any]:
    return ((node.status().get("node") or {}).get("distributed") or {}).get("escrow") or {}
