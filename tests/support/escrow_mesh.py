"""Test helpers for escrow-voucher scenarios on real nodes and a dev chain: the `serve` flags of a node paid
(and paying) with vouchers, funding an entry's escrow for one worker, and what a node's status says."""

from __future__ import annotations

import subprocess
from typing import Any

from harness.dev_chain import DevChain
from harness.mesh_nodes import MeshNode
from harness.procs import MESH402

USDC = 10**6


def escrow_args(chain: DevChain, fac_url: str, account: str, *extra: str, redeem_every: float = 2.0) -> list[str]:
    """A priced node (0.01 USDC per request, x402) whose wallet is `account` and that pays and is paid with
    escrow vouchers, redeeming every `redeem_every` seconds."""
    return [*extra, "--price", "0.01", "--pay-to", account, "--deployment", str(chain.dir), "--facilitator", fac_url,
            "--escrow", "--payout-key-file", str(chain.dep.key_file(account)), "--redeem-every", str(redeem_every)]


def escrow_of(chain: DevChain) -> Any:
    from mesh402.economics.escrow import Escrow
    return Escrow(chain.w3(), chain.dep.contracts["MeshEscrow"])


def escrow_cli(chain: DevChain, *args: str) -> str:
    """`mesh402 escrow ARGS --deployment` as a user runs it; its output (the command must succeed)."""
    r = subprocess.run([*MESH402, "escrow", *args, "--deployment", str(chain.dir)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def fund_escrow(chain: DevChain, entry: str, amount: int, lock_for: str | None = None) -> None:
    """`entry` (an account name) gets `amount` test USDC from buyer-0 and deposits it with `mesh402 escrow
    deposit`; with `lock_for` (a worker's account name) it locks it all for that worker (`mesh402 escrow lock`)."""
    chain.transfer("buyer-0", entry, amount)
    escrow_cli(chain, "deposit", str(amount / USDC), "--account", entry)
    if lock_for is not None:
        escrow_cli(chain, "lock", chain.dep.address(lock_for), str(amount / USDC), "--account", entry)


def escrow_status(node: MeshNode) -> dict[str, Any]:
    return ((node.status().get("node") or {}).get("distributed") or {}).get("escrow") or {}
