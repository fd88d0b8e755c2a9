"""Gas of the economics layer on a local chain: ERC-8004 registration, validation, feedback and epoch payouts.

    .venv/bin/python benchmarks/econ_gas.py [--agents 5] [--payees 2,4,8,16]

Starts `mesh402 chain dev`. Then it measures:
  - `register(uri, [node binding])` the way `mesh402 register` sends it, for several agents (the first
    agent on a chain pays for fresh storage);
  - setAgentWallet with its EIP-712 proof;
  - the spot-check round per agent: validationRequest (owner), validationResponse (validator) and the
    giveFeedback an entry posts for a failed check (medians over the agents);
  - one epoch payout per payee count: approve + publish of the Merkle root, then every claim;
  - every call of the escrow, staking and quorum contracts (issue 14), the quorum's draw for several
    validator-set sizes, and per-epoch totals of the voucher design next to the epoch payout above.
Prints a table, writes benchmarks/results/econ_gas.json.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--validators", default="4,8,16,32", help="validator-set sizes to measure the quorum draw at")
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
            out["work_contracts"] = work_contracts_gas(chain, [int(n) for n in args.payees.split(",")],
                                                       [int(v) for v in args.validators.split(",")])
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
    print_work_contracts(out["work_contracts"], out["epoch_payout"])  # type: ignore[arg-type]
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

# ---- escrow, staking and the quorum (issue 14) ----------------------------------------------------

USDC = 1_000_000


def work_contracts_gas(chain: Any, workers: list[int], validator_sets: list[int]) -> dict[str, Any]:
    """Gas of every escrow, staking and quorum call, as the wrappers send them (medians where repeated)."""
    from harness.work_contracts import WorkEnv
    env = WorkEnv(chain)
    escrow_gas(env, workers)
    staking_gas(env)
    quorum_gas(env)
    calls = {k: int(statistics.median(v)) for k, v in sorted(env.samples.items())}
    draws = {v: draw_gas(env, v) for v in validator_sets}
    return {"calls": calls, "draw_by_validators": draws}


def escrow_gas(env: Any, workers: list[int]) -> None:
    """An entry funds, locks per worker, gets vouchers redeemed (singly and batched), unlocks and releases."""
    from mesh402.economics.escrow import sign_release
    e = env.escrow
    for n in workers:
        entry = env.actor(1000 * USDC)
        env.record("escrow.deposit(first)", e.deposit(entry.key, 500 * USDC))
        env.record("escrow.deposit", e.deposit(entry.key, 100 * USDC))
        ws = [env.actor() for _ in range(n)]
        env.record(f"escrow.lock({n} new workers)", e.lock(entry.key, {w.address: USDC for w in ws}))
        env.record(f"escrow.lock({n} workers, top-up)", e.lock(entry.key, {w.address: USDC for w in ws}))
        for w in ws:
            env.record("escrow.redeem(worker's first)", e.redeem(w.key, e.sign(entry.key, w.address, USDC // 2)))
            env.record("escrow.redeem", e.redeem(w.key, e.sign(entry.key, w.address, USDC)))
        w = ws[0]
        env.record("escrow.requestUnlock", e.request_unlock(entry.key, w.address, USDC // 4))
        env.record("escrow.cancelUnlock", e.cancel_unlock(entry.key, w.address))
        e.request_unlock(entry.key, w.address, USDC // 4)
        env.advance(e.unlock_delay)
        env.record("escrow.finalizeUnlock", e.finalize_unlock(entry.key, w.address))
        nonce = e.channel(entry.address, w.address).release_nonce
        deadline = env.now() + 600
        sig = sign_release(w.key, e.chain_id, e.address, entry.address, USDC // 4, nonce, deadline)
        env.record("escrow.release", e.release(entry.key, w.address, USDC // 4, deadline, sig))
        env.record("escrow.withdraw", e.withdraw(entry.key, USDC))
        env.mint(e.vault_of(entry.address), USDC)
        env.record("escrow.sweep(first: deploys the vault)", e.sweep(w.key, entry.address))
        env.mint(e.vault_of(entry.address), USDC)
        env.record("escrow.sweep", e.sweep(w.key, entry.address))
    worker = env.actor()
    for k in (4, 16):
        entries = [env.actor(USDC) for _ in range(k)]
        for en in entries:
            e.deposit(en.key, USDC)
            e.lock(en.key, {worker.address: USDC})
        vouchers = [e.sign(en.key, worker.address, USDC) for en in entries]
        env.record(f"escrow.redeemBatch({k} entries, one worker)", e.redeem_batch(worker.key, vouchers))


def staking_gas(env: Any) -> None:
    s = env.staking
    for i in range(3):
        node = env.actor(30 * USDC, agent=True)
        env.record("staking.stake(first)", s.stake(node.key, node.agent_id, 20 * USDC))
        env.record("staking.stake", s.stake(node.key, node.agent_id, 5 * USDC))
        env.record("staking.requestUnstake", s.request_unstake(node.key, node.agent_id, 5 * USDC))
        env.record("staking.rebond", s.rebond(node.key, node.agent_id))
        s.request_unstake(node.key, node.agent_id, 5 * USDC)
        env.advance(s.unbonding_delay)
        env.record("staking.withdraw", s.withdraw(node.key, node.agent_id))
        env.record("staking.createMesh", s.create_mesh(node.key, f"gas-mesh-{i}-{node.address}", 2 * USDC))
        env.record("staking.setMeshMinStake", s.set_min_stake(node.key, f"gas-mesh-{i}-{node.address}", 3 * USDC))


def quorum_gas(env: Any) -> None:
    """Checks on a fresh quorum with 9 validators: a failed one (2 of 3), a passed one (1 dissent), and an
    appealed one (5 fresh validators overturn)."""
    from mesh402.economics.quorum import device_key
    from harness.work_contracts import QuorumEnv
    qe = QuorumEnv(env.redeploy())
    for _ in range(9):
        qe.add_validator("cpu")
    for name, appeal in (("failed", False), ("passed", False), ("appealed", True)):
        stage = qe.stage()
        env.mint(stage.address, 10 * USDC)
        check = qe.open(stage)
        m = qe.seat(check, "quorum.draw(3 of 9)")
        votes = {m[0]: True, m[1]: name != "passed", m[2]: False}
        qe.vote(check, votes)
        env.record("quorum.finalize", qe.env.quorum.finalize(qe.reporter.key, check))
        if appeal:
            env.record("quorum.appeal", qe.env.quorum.appeal(stage.key, check))
            members = qe.seat(check, "quorum.draw(5 of 6, appeal)")
            qe.vote(check, {a: False for a in members})
            env.record("quorum.finalize(appeal round: executes)", qe.env.quorum.finalize(qe.reporter.key, check))
            continue
        env.advance(qe.env.quorum.params().appeal_window + 1)
        env.record(f"quorum.execute({name})", qe.env.quorum.execute(qe.reporter.key, check))
    for k, v in list(env.samples.items()):
        if k in ("registerValidator", "draw(3)", "commitVote", "revealVote"):
            env.samples[f"quorum.{k}"] = env.samples.pop(k)
    leaver = next(iter(qe.validators.values()))
    env.record("quorum.deregisterValidator", qe.env.quorum.deregister_validator(leaver.key, leaver.agent_id))
    # openCheck sent by hand: the wrapper returns the check id, not the receipt
    q, stage = qe.env.quorum, qe.stage()
    q.approve(qe.reporter.key, q.params().report_bond)
    env.record("quorum.openCheck", q.send(qe.reporter.key, q.fn.openCheck(stage.agent_id, os.urandom(32), True,
                                                                          device_key("cpu"))))


def draw_gas(env: Any, validators: int) -> int:
    """Gas of seating 3 validators out of `validators` on a fresh deployment (the draw reads every one)."""
    from harness.work_contracts import QuorumEnv
    qe = QuorumEnv(env.redeploy())
    for _ in range(validators):
        qe.add_validator("cpu")
    check = qe.open(qe.stage())
    qe.seat(check, "draw")
    return qe.env.samples.pop("draw")[-1]


def print_work_contracts(w: dict[str, Any], payouts: dict[int, dict[str, Any]]) -> None:
    calls = w["calls"]
    print("\nescrow / staking / quorum call" + " " * 31 + "gas")
    for name, gas in calls.items():
        print(f"  {name:58s} {gas:9d}")
    print("quorum.draw(3) by registered validators: " +
          ", ".join(f"{v}: {g}" for v, g in w["draw_by_validators"].items()))
    check = (calls["quorum.openCheck"] + calls["quorum.draw(3 of 9)"] + 3 * calls["quorum.commitVote"]
             + 3 * calls["quorum.revealVote"] + calls["quorum.finalize"] + calls["quorum.execute(failed)"])
    print(f"one quorum check (open, draw 3 of 9, 3 commits, 3 reveals, finalize, execute): {check}")
    print("per epoch, n workers   EpochRewards (approve + publish + n claims)   vouchers (sweep + lock top-up + n redeems)")
    per_epoch = {}
    for n, p in payouts.items():
        lock = calls.get(f"escrow.lock({n} workers, top-up)")
        if lock is None:
            continue
        per_epoch[n] = {"epoch_rewards": p["total"], "vouchers": calls["escrow.sweep"] + lock + n * calls["escrow.redeem"]}
        print(f"  {n:18d}   {p['total']:42d}   {per_epoch[n]['vouchers']}")
    w["one_quorum_check"], w["per_epoch"] = check, per_epoch


if __name__ == "__main__":
    main()
