"""Gas of the economics layer on a local chain: ERC-8004 registration, validation, feedback and epoch payouts.

    .venv/bin/python benchmarks/econ_gas.py [--agents 5] [--payees 2,4,8,16]

Starts `mesh402 chain dev`. Then it measures:
  - `register(uri, [node binding])` the way `mesh402 register` sends it, for several agents (the first
    agent on a chain pays for fresh storage);
  - setAgentWallet with its EIP-712 proof;
  - the spot-check round per agent: validationRequest (owner), validationResponse (validator) and the
    giveFeedback an entry posts for a failed check (medians over the agents);
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
from typing import Any

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
    from mesh402.economics.erc8004 import register_node
    from mesh402.economics.rewards import EpochPayout, claim, publish_epoch
    from mesh402.mesh.identity import NodeIdentity
    from harness.dev_chain import start_chain

    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        chain = start_chain(Path(tmp), buyers=1)
        try:
            w3 = chain.w3()
            reg = chain.dep.contracts["IdentityRegistry"]
            uri = "https://node-0.example.net:9337/.well-known/agent-registration.json"
            gas_reg, gas_wallet, agents = [], [], []
            for i in range(args.agents):
                node = NodeIdentity.generate()
                res = register_node(w3, chain.key("node-0"), reg, uri, node, wallet_key=Account.create().key.hex())
                gas_reg.append(res.gas["register"])
                gas_wallet.append(res.gas["setAgentWallet"])
                agents.append((res.agent_id, node.node_id_hex))
            out["register_with_binding"] = {"first": gas_reg[0], "median_after_first": statistics.median(gas_reg[1:] or gas_reg)}
            out["setAgentWallet"] = statistics.median(gas_wallet)
            out.update(spot_check_gas(chain, agents))
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
    print(f"validationRequest: {out['validationRequest']}; validationResponse: pass (100) "
          f"{out['validationResponse_pass']}, fail (0) {out['validationResponse_fail']}; "
          f"giveFeedback (0, spot-check-failed): {out['giveFeedback']} (medians)")
    print("epoch payout   payees  approve+publish  claim(median)  total")
    for n, p in out["epoch_payout"].items():
        print(f"               {n:6d}  {p['approve_publish']:15d}  {p['claim_median']:13.0f}  {p['total']}")
    res = ROOT / "benchmarks" / "results"
    res.mkdir(exist_ok=True)
    (res / "econ_gas.json").write_text(json.dumps(out, indent=1))


def spot_check_gas(chain: Any, agents: list[tuple[int, str]]) -> dict[str, float]:
    """Median gas of the spot-check round, sent as the mesh sends it (validation.py): per agent, the owner
    requests two validations (statement hashes), the validator passes one (100) and fails the other (0),
    and the entry posts feedback for the failure."""
    from mesh402.economics.validation_registry import PASS_SCORE, post_feedback, request_validation, respond_validation, statement
    w3, c = chain.w3(), chain.dep.contracts
    validator = chain.dep.address("node-1")
    gas: dict[str, list[int]] = {"validationRequest": [], "validationResponse_pass": [], "validationResponse_fail": [],
                                 "giveFeedback": []}
    for epoch, (aid, node) in enumerate(agents):
        for response in (PASS_SCORE, 0):
            _, h = statement(epoch, "e" * 64, node, validator, [f"{response:064x}"])
            rq = request_validation(w3, chain.key("node-0"), c["ValidationRegistry"], validator, aid, "mesh402:statement", h)
            rs = respond_validation(w3, chain.key("node-1"), c["ValidationRegistry"], h, response, "", b"\x44" * 32)
            gas["validationRequest"].append(int(rq["gasUsed"]))
            gas["validationResponse_pass" if response else "validationResponse_fail"].append(int(rs["gasUsed"]))
        fb = post_feedback(w3, chain.key("buyer-0"), c["ReputationRegistry"], aid, 0, feedback_hash=h)
        gas["giveFeedback"].append(int(fb["gasUsed"]))
    return {k: statistics.median(v) for k, v in gas.items()}

if __name__ == "__main__":
    main()
