"""MeshStaking on a real local chain (`mesh402 chain dev`, anvil): stake bound to ERC-8004 agent ids, an
unbonding delay longer than a whole spot check, a per-mesh minimum, and slashing only by the quorum.
One chain for the module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.work_contracts import USDC, WorkEnv, reverts, work_env



def refused(abi: list[dict[str, Any]], call: Callable[..., Any], *args: Any) -> tuple[str, dict[str, Any]]:
    """The custom error (name, args) a raw web3 call (not a wrapper) reverts with."""
    from web3.exceptions import ContractLogicError

    from mesh402.economics.contractcall import decode_revert
    with pytest.raises(ContractLogicError) as ei:
        call(*args)
    decoded = decode_revert(ei.value, abi)
    assert decoded is not None, str(ei.value)
    return decoded


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkEnv]:
    with work_env(tmp_path_factory.mktemp("staking")) as e:
        yield e


def test_stake_is_bound_to_an_agent_and_only_its_operator_unbonds(env: WorkEnv) -> None:
    node, sponsor, stranger = env.actor(agent=True), env.actor(8 * USDC), env.actor()
    assert env.staking.stake_of(node.agent_id) == 0
    env.mint(node.address, 5 * USDC)
    env.record("stake(first)", env.staking.stake(node.key, node.agent_id, 5 * USDC))
    env.record("stake", env.staking.stake(sponsor.key, node.agent_id, 3 * USDC))  # anyone may add stake
    assert env.staking.stake_of(node.agent_id) == 8 * USDC
    reverts("UnknownAgent", env.staking.stake, sponsor.key, 10**9, USDC)
    reverts("NotAgentOperator", env.staking.request_unstake, stranger.key, node.agent_id, USDC)
    reverts("NotAgentOperator", env.staking.request_unstake, sponsor.key, node.agent_id, USDC)
    reverts("InsufficientStake", env.staking.request_unstake, node.key, node.agent_id, 8 * USDC + 1)
    reverts("ZeroAmount", env.staking.stake, node.key, node.agent_id, 0)
    # an approved operator may unbond, but the money goes to the owner
    from mesh402.economics.evm import send_tx
    send_tx(env.w3, node.key, env.identity.functions.approve(stranger.address, node.agent_id))
    env.staking.request_unstake(stranger.key, node.agent_id, USDC)
    env.advance(env.staking.unbonding_delay)
    env.staking.withdraw(stranger.key, node.agent_id)
    assert env.balance(node.address) == USDC and env.balance(stranger.address) == 0


def test_unbonding_waits_out_the_delay_and_stays_slashable_until_then(env: WorkEnv) -> None:
    node = env.actor(10 * USDC, agent=True)
    env.staking.stake(node.key, node.agent_id, 10 * USDC)
    rcpt = env.record("requestUnstake", env.staking.request_unstake(node.key, node.agent_id, 4 * USDC))
    ready = env.staking.events(rcpt, "UnstakeRequested")[0]["readyAt"]
    assert ready == env.now() + env.staking.unbonding_delay
    info = env.staking.info(node.agent_id)
    assert (info.active, info.unbonding, info.slashable) == (6 * USDC, 4 * USDC, 10 * USDC)
    assert int(env.staking.fn.slashableOf(node.agent_id).call()) == 10 * USDC
    reverts("UnbondingNotReady", env.staking.withdraw, node.key, node.agent_id)
    env.advance(env.staking.unbonding_delay - 10)
    reverts("UnbondingNotReady", env.staking.withdraw, node.key, node.agent_id)
    env.advance(10)
    env.record("withdraw", env.staking.withdraw(node.key, node.agent_id))
    assert env.balance(node.address) == 4 * USDC and env.staking.stake_of(node.agent_id) == 6 * USDC
    reverts("NothingUnbonding", env.staking.withdraw, node.key, node.agent_id)
    # rebond cancels an unbonding
    env.staking.request_unstake(node.key, node.agent_id, 2 * USDC)
    env.record("rebond", env.staking.rebond(node.key, node.agent_id))
    assert env.staking.info(node.agent_id).unbonding == 0 and env.staking.stake_of(node.agent_id) == 6 * USDC


def test_unbonding_is_longer_than_a_whole_check_and_the_quorum_insists(env: WorkEnv) -> None:
    from dataclasses import replace

    from mesh402.economics.contracts import compile_contracts
    from mesh402.economics.workchain import WorkContractParams
    q = env.quorum.params()
    assert env.staking.unbonding_delay > q.appeal_window
    assert env.staking.unbonding_delay > q.longest_check_s
    with pytest.raises(ValueError, match="unbonding delay"):
        WorkContractParams(unbonding_delay=q.longest_check_s)
    # the contract itself refuses a quorum whose check could outlive the unbonding delay
    arts = compile_contracts()
    long_appeal = replace(q, appeal_window=env.staking.unbonding_delay)
    ctor = env.w3.eth.contract(abi=arts["SpotCheckQuorum"].abi, bytecode=arts["SpotCheckQuorum"].bytecode).constructor(
        env.chain.dep.contracts["IdentityRegistry"], env.staking.address, env.deployer, long_appeal.as_tuple())
    name, args = refused(env.staking.contract.abi + arts["SpotCheckQuorum"].abi, ctor.estimate_gas, {"from": env.deployer})
    assert name == "BadParams" and "unbonding delay must exceed" in args["why"]


def test_each_mesh_sets_its_minimum_stake_above_the_floor(env: WorkEnv) -> None:
    admin, other = env.actor(), env.actor()
    node = env.actor(5 * USDC, agent=True)
    floor = int(env.staking.fn.minStakeFloor().call())
    assert env.staking.min_stake("never-created") == floor
    reverts("BelowFloor", env.staking.create_mesh, admin.key, "mesh-a", floor - 1)
    env.record("createMesh", env.staking.create_mesh(admin.key, "mesh-a", 5 * USDC))
    reverts("MeshExists", env.staking.create_mesh, other.key, "mesh-a", 50 * USDC)
    assert env.staking.min_stake("mesh-a") == 5 * USDC
    env.staking.stake(node.key, node.agent_id, 4 * USDC)
    assert not env.staking.meets_minimum("mesh-a", node.agent_id)
    assert env.staking.meets_minimum("elsewhere", node.agent_id)  # the floor (1 USDC) applies there
    env.staking.stake(node.key, node.agent_id, USDC)
    assert env.staking.meets_minimum("mesh-a", node.agent_id)
    reverts("NotMeshAdmin", env.staking.set_min_stake, other.key, "mesh-a", 2 * USDC)
    reverts("UnknownMesh", env.staking.set_min_stake, admin.key, "mesh-b", 2 * USDC)
    env.record("setMeshMinStake", env.staking.set_min_stake(admin.key, "mesh-a", 6 * USDC))
    assert not env.staking.meets_minimum("mesh-a", node.agent_id)
    assert not env.staking.meets_minimum("elsewhere", env.actor(agent=True).agent_id)  # no stake at all


def test_only_the_quorum_slashes_or_freezes(env: WorkEnv) -> None:
    node = env.actor(2 * USDC, agent=True)
    env.staking.stake(node.key, node.agent_id, 2 * USDC)
    for call in (env.staking.fn.slash(node.agent_id, USDC), env.staking.fn.freeze(node.agent_id),
                 env.staking.fn.unfreeze(node.agent_id)):
        reverts("NotSlasher", env.staking.send, node.key, call)
    reverts("NotDeployer", env.staking.send, node.key, env.staking.fn.setSlasher(node.address))
    name, _ = refused(env.staking.contract.abi, env.staking.fn.setSlasher(node.address).transact, {"from": env.deployer})
    assert name == "SlasherAlreadySet"
    assert env.staking.stake_of(node.agent_id) == 2 * USDC
