"""Gas of the economics layer on a local chain: ERC-8004 registration and epoch payouts.

    .venv/bin/python benchmarks/econ_gas.py [--agents 5] [--payees 2,4,8,16]

Starts `mesh402 chain dev`. Then it measures:
  - `register(uri, [node binding])` the way `mesh402 register` sends it, for several agents (the first
    agent on a chain pays for fresh storage);
  - setAgentWallet with its EIP-712 proof;
  - one epoch payout per payee count: approve + publish of the Merkle root, then every claim.
Prints a table, writes benchmarks/results/econ_gas.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=5)
    ap.add_argument("--payees", default="2,4,8,16")
    args = ap.parse_args()
    from eth_account import Account

    from mesh402.economics.chain import contract_at
    from mesh402.economics.evm import send_tx
    from mesh402.economics.identity import register_node
    from mesh402.economics.rewards import EpochPayout, claim, publish_epoch
    from mesh402.mesh.identity import NodeIdentity
    from tests.chainutil import start_chain

    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        chain = start_chain(Path(tmp), buyers=1)
        try:
            w3 = chain.w3()
            reg = chain.dep.contracts["IdentityRegistry"]
            uri = "https://node-0.example.net:9337/.well-known/agent-registration.json"
            gas_reg, gas_wallet = [], []
            for i in range(args.agents):
                res = register_node(w3, chain.key("node-0"), reg, uri, NodeIdentity.generate(),
                                    wallet_key=Account.create().key.hex())
                gas_reg.append(res.gas["register"])
                gas_wallet.append(res.gas["setAgentWallet"])
            out["register_with_binding"] = {"first": gas_reg[0], "median_after_first": statistics.median(gas_reg[1:] or gas_reg)}
            out["setAgentWallet"] = statistics.median(gas_wallet)
            token = contract_at(w3, "MeshUSDC", chain.dep.asset.address)
            entry = chain.key("buyer-0")
            rewards = chain.dep.contracts["EpochRewards"]
            payouts = {}
            for epoch, n in enumerate(int(x) for x in args.payees.split(",")):
                payees = [Account.create().address for _ in range(n)]
                plan = EpochPayout(epoch, 10_000 * n, {p: 1 for p in payees}, {p: 10_000 for p in payees},
                                   {p: p for p in payees})
                send_tx(w3, entry, token.functions.approve(rewards, 0))  # warm the allowance slot equally
                publish_epoch(w3, entry, rewards, plan)
                claims = [int(claim(w3, entry, rewards, plan.tree, p)["gasUsed"]) for p in payees]
                payouts[n] = {"approve_publish": plan.gas, "claim_median": statistics.median(claims),
                              "total": plan.gas + sum(claims)}
            out["epoch_payout"] = payouts
        finally:
            chain.proc.stop()
    print(f"register(uri, [binding]): first {out['register_with_binding']['first']}, "
          f"then median {out['register_with_binding']['median_after_first']}")
    print(f"setAgentWallet: {out['setAgentWallet']}")
    print("epoch payout   payees  approve+publish  claim(median)  total")
    for n, p in out["epoch_payout"].items():
        print(f"               {n:6d}  {p['approve_publish']:15d}  {p['claim_median']:13.0f}  {p['total']}")
    res = ROOT / "benchmarks" / "results"
    res.mkdir(exist_ok=True)
    (res / "econ_gas.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
