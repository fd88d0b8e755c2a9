"""SpotCheckQuorum on a real local chain (`mesh402 chain dev`, anvil): staked validators seated by a block hash
nobody knew when the check was opened, commit-reveal votes, majority outcomes that slash the stage or the
validators who voted against them, and an appeal to a larger quorum. One chain for the module, with 12
validators (9 on device A, 3 on device B)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from web3.logs import DISCARD

from tests.support.work_contracts import STAGE_STAKE, USDC, QuorumEnv, reverts, work_env

DEV_A = "cpu:avx512 torch-2.5.1"
DEV_B = "cuda:NVIDIA H200 torch-2.5.1"


@pytest.fixture(scope="module")
def qenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumEnv]:
    with work_env(tmp_path_factory.mktemp("quorum")) as env:
        q = QuorumEnv(env)
        for _ in range(9):
            q.add_validator(DEV_A)
        for _ in range(3):
            q.add_validator(DEV_B)
        yield q


def test_validator_registry_needs_stake_and_the_agents_operator(qenv: QuorumEnv) -> None:
    env = qenv.env
    poor = env.actor(5 * USDC, agent=True)
    env.staking.stake(poor.key, poor.agent_id, 5 * USDC)
    reverts("InsufficientValidatorStake", env.quorum.register_validator, poor.key, poor.agent_id, DEV_A)
    some = next(iter(qenv.validators.values()))
    reverts("NotAgentOperator", env.quorum.register_validator, poor.key, some.agent_id, DEV_A)
    reverts("ValidatorExists", env.quorum.register_validator, some.key, some.agent_id, DEV_A)
    leaver = qenv.add_validator(DEV_A)
    assert leaver.agent_id in env.quorum.validators()
    env.record("deregisterValidator", env.quorum.deregister_validator(leaver.key, leaver.agent_id))
    assert leaver.agent_id not in env.quorum.validators() and len(env.quorum.validators()) == 12
    reverts("UnknownValidator", env.quorum.deregister_validator, leaver.key, leaver.agent_id)
    del qenv.validators[leaver.agent_id]


def test_quorum_is_seated_by_a_later_block_hash_mixed_with_the_receipt(qenv: QuorumEnv) -> None:
    from mesh402.economics.quorum import quorum_seed, select_quorum
    env, q = qenv.env, qenv.env.quorum
    stage = qenv.stage()
    receipt = b"\x5a" * 32
    check_id = qenv.open(stage, receipt, device=DEV_A)
    opened = q.logs("CheckOpened", from_block=env.block(), checkId=check_id)[0]
    assert opened["seedBlock"] == opened["blockNumber"] + q.params().seed_delay  # a block not yet made
    reverts("SeedNotReady", q.draw, qenv.reporter.key, check_id)
    # joining after the check was opened (a new validator, or stake raised) cannot get anyone seated
    late = qenv.add_validator(DEV_A)
    topped = next(a for a in qenv.validators if a != late.agent_id)
    env.mint(qenv.validators[topped].address, USDC)
    env.staking.stake(qenv.validators[topped].key, topped, USDC)
    eligible = q.eligible(check_id, 0)
    assert late.agent_id not in eligible and topped not in eligible and stage.agent_id not in eligible
    assert len(eligible) == 11
    members = qenv.seat(check_id)
    drawn = q.logs("QuorumDrawn", from_block=env.block(), checkId=check_id)[0]
    seed_hash = bytes(env.w3.eth.get_block(opened["seedBlock"])["hash"])
    assert bytes(drawn["seed"]) == quorum_seed(seed_hash, receipt, check_id, 0)
    assert list(members) == select_quorum(drawn["seed"], eligible, 3) == q.expected_members(check_id, 0)
    assert len(set(members)) == 3 and set(members) <= set(eligible)
    for m in members:
        assert env.staking.info(m).open_checks >= 1  # seated stake is frozen until the check is executed
    assert env.staking.info(stage.agent_id).open_checks == 1
    reverts("AlreadyDrawn", q.draw, qenv.reporter.key, check_id)
    reverts("CheckExists", q.open_check, qenv.reporter.key, stage.agent_id, receipt)
    qenv.vote(check_id, {m: False for m in members})  # settle it so its members are free again
    q.finalize(qenv.reporter.key, check_id)


def test_a_seed_whose_block_hash_is_gone_is_rearmed_on_a_future_block(qenv: QuorumEnv) -> None:
    env, q = qenv.env, qenv.env.quorum
    check_id = qenv.open(qenv.stage(), device=DEV_A)
    first = q.round(check_id, 0).seed_block
    env.mine(256 + 2)  # past the 256 blocks BLOCKHASH can see
    rcpt = env.record("draw(seed re-armed)", q.draw(qenv.reporter.key, check_id))
    rearmed = q.events(rcpt, "SeedRearmed")[0]["seedBlock"]
    assert rearmed == rcpt["blockNumber"] + q.params().seed_delay and rearmed > first
    assert not q.round(check_id, 0).drawn and q.phase(check_id) == "seed"
    assert len(qenv.seat(check_id)) == 3 and q.phase(check_id) == "commit"


def test_fast_mode_checks_go_only_to_validators_with_the_stages_device(qenv: QuorumEnv) -> None:
    env, q = qenv.env, qenv.env.quorum
    stage = qenv.stage()
    members = qenv.seat(qenv.open(stage, exact=False, device=DEV_B))
    assert sorted(members) == sorted(a for a, d in qenv.devices.items() if d == DEV_B)
    # a device no validator has: no quorum, nothing decided, bond back, stage free
    before = env.balance(qenv.reporter.address)
    lonely = qenv.open(stage, exact=False, device="tpu:v5 jax-0.4")
    qenv.seat(lonely, "draw(no quorum)")
    c = q.check(lonely)
    assert c.executed and c.final_outcome.name == "INCONCLUSIVE"
    assert q.logs("QuorumUnavailable", from_block=env.block(), checkId=lonely)[0]["eligible"] == 0
    assert env.balance(qenv.reporter.address) == before
    assert env.staking.info(stage.agent_id).open_checks == 1  # only the DEV_B check still holds it


def test_commit_reveal_hides_votes_and_binds_them_to_the_voter(qenv: QuorumEnv) -> None:
    env, q = qenv.env, qenv.env.quorum
    stage = qenv.stage()
    check_id = qenv.open(stage, device=DEV_A)
    m1, m2, m3 = qenv.seat(check_id)
    outsider = next(a for a in qenv.validators if a not in (m1, m2, m3) and a != stage.agent_id)
    key = {a: qenv.validators[a].key for a in (m1, m2, m3, outsider)}
    s1, s3 = q.seal_vote(check_id, m1, True), q.seal_vote(check_id, m3, False)
    reverts("NotSelected", q.commit, key[outsider], check_id, outsider, s1.commitment)
    reverts("NotAgentOperator", q.commit, key[m2], check_id, m1, s1.commitment)
    reverts("BadCommitment", q.commit, key[m1], check_id, m1, b"\0" * 32)
    q.commit(key[m1], check_id, m1, s1.commitment)
    reverts("AlreadyCommitted", q.commit, key[m1], check_id, m1, s3.commitment)
    assert q.vote(check_id, 0, m1) == (1, False)  # committed: the vote itself is not on chain
    # m2 copies m1's commitment; nobody may reveal until every member committed (or the window closed)
    q.commit(key[m2], check_id, m2, s1.commitment)
    reverts("RevealNotOpen", q.reveal, key[m1], check_id, m1, True, s1.salt)
    q.commit(key[m3], check_id, m3, s3.commitment)
    assert q.phase(check_id) == "reveal"
    reverts("CommitmentMismatch", q.reveal, key[m1], check_id, m1, False, s1.salt)  # another vote
    reverts("CommitmentMismatch", q.reveal, key[m1], check_id, m1, True, s3.salt)  # another salt
    q.reveal(key[m1], check_id, m1, True, s1.salt)
    reverts("AlreadyRevealed", q.reveal, key[m1], check_id, m1, True, s1.salt)
    # the copier now knows m1's vote and salt, but the commitment names m1: it cannot reveal it as its own
    reverts("CommitmentMismatch", q.reveal, key[m2], check_id, m2, True, s1.salt)
    q.reveal(key[m3], check_id, m3, False, s3.salt)
    reverts("TallyNotReady", q.finalize, key[m3], check_id)
    env.advance(q.round(check_id, 0).reveal_deadline - env.now() + 1)
    reverts("RevealClosed", q.reveal, key[m2], check_id, m2, True, s1.salt)
    rcpt = env.record("finalize", q.finalize(key[m3], check_id))
    assert q.events(rcpt, "RoundFinalized")[0]["outcome"] == 3  # 1 fail, 1 pass, 1 silent: inconclusive
    v = {a: qenv.slashable(a) for a in (m1, m2, m3)}
    env.advance(q.params().appeal_window + 1)
    q.execute(qenv.reporter.key, check_id)
    # the silent copier loses 10%; an inconclusive round punishes no revealed vote, and not the stage
    assert qenv.slashable(m2) == v[m2] - v[m2] // 10
    assert (qenv.slashable(m1), qenv.slashable(m3)) == (v[m1], v[m3])
    assert qenv.slashable(stage.agent_id) == STAGE_STAKE


def test_two_of_three_fail_a_cheating_stage_and_slash_it(qenv: QuorumEnv) -> None:
    env, q = qenv.env, qenv.env.quorum
    stage = qenv.stage()
    rep = qenv.reporter
    check_id = qenv.open(stage, device=DEV_A)
    env.staking.request_unstake(stage.key, stage.agent_id, STAGE_STAKE)  # trying to leave with the stake
    m1, m2, m3 = qenv.seat(check_id)
    qenv.vote(check_id, {m1: True, m2: True, m3: False})
    q.finalize(rep.key, check_id)
    assert q.round(check_id, 0).outcome.name == "FAILED" and q.phase(check_id) == "appeal-window"
    reverts("AppealWindowOpen", q.execute, rep.key, check_id)
    env.advance(env.staking.unbonding_delay)
    reverts("StakeFrozen", env.staking.withdraw, stage.key, stage.agent_id)  # the open check holds it
    before = {a: qenv.slashable(a) for a in (m1, m2, m3)}
    rep_before, treasury_before = env.balance(rep.address), env.balance(env.deployer)
    rcpt = env.record("execute(failed)", q.execute(rep.key, check_id))
    p = q.params()
    lost = STAGE_STAKE * p.stage_slash_bps // 10_000
    reward = lost * p.reporter_share_bps // 10_000
    done = q.events(rcpt, "CheckExecuted")[0]
    assert (done["outcome"], done["stageSlashed"], done["reporterReward"]) == (2, lost, reward + p.report_bond)
    assert qenv.slashable(stage.agent_id) == STAGE_STAKE - lost
    assert env.balance(rep.address) == rep_before + p.report_bond + reward
    dissent = before[m3] * p.validator_slash_bps // 10_000
    assert qenv.slashable(m3) == before[m3] - dissent  # voted against the majority
    assert (qenv.slashable(m1), qenv.slashable(m2)) == (before[m1], before[m2])
    assert env.balance(env.deployer) == treasury_before + (lost - reward) + dissent
    assert q.check(check_id).final_outcome.name == "FAILED" and q.phase(check_id) == "executed"
    env.staking.withdraw(stage.key, stage.agent_id)  # what is left is free again
    assert env.balance(stage.address) == STAGE_STAKE - lost
    reverts("AlreadyExecuted", q.execute, rep.key, check_id)


def test_one_dishonest_validator_cannot_fail_an_honest_stage(qenv: QuorumEnv) -> None:
    env, q = qenv.env, qenv.env.quorum
    stage = qenv.stage()
    check_id = qenv.open(stage, device=DEV_A)
    liar, h1, h2 = qenv.seat(check_id)
    qenv.vote(check_id, {liar: True, h1: False, h2: False})
    q.finalize(qenv.reporter.key, check_id)
    env.advance(q.params().appeal_window + 1)
    reverts("AppealClosed", q.appeal, stage.key, check_id)
    before = {a: qenv.slashable(a) for a in (liar, h1, h2)}
    wallets = {a: env.balance(qenv.validators[a].address) for a in (h1, h2)}
    rep_before = env.balance(qenv.reporter.address)
    env.record("execute(passed)", q.execute(qenv.reporter.key, check_id))
    assert q.check(check_id).final_outcome.name == "PASSED"
    assert qenv.slashable(stage.agent_id) == STAGE_STAKE and env.staking.info(stage.agent_id).open_checks == 0
    assert qenv.slashable(liar) == before[liar] - before[liar] // 10
    assert (qenv.slashable(h1), qenv.slashable(h2)) == (before[h1], before[h2])
    # the report bond pays the validators who passed the stage (at their agent wallets)
    bond = q.params().report_bond
    assert env.balance(qenv.reporter.address) == rep_before
    for a in (h1, h2):
        assert env.balance(qenv.validators[a].address) == wallets[a] + bond // 2


def test_an_appeal_to_a_larger_quorum_overturns_a_wrong_failure(qenv: QuorumEnv) -> None:
    env, q = qenv.env, qenv.env.quorum
    stage = qenv.stage()
    env.mint(stage.address, q.params().appeal_bond)
    check_id = qenv.open(stage, device=DEV_A)
    c1, c2, honest = qenv.seat(check_id)
    qenv.vote(check_id, {c1: True, c2: True, honest: False})  # two colluders fail an honest stage
    q.finalize(qenv.reporter.key, check_id)
    assert q.round(check_id, 0).outcome.name == "FAILED"
    first = {a: qenv.slashable(a) for a in (c1, c2, honest)}
    env.record("appeal", q.appeal(stage.key, check_id))
    reverts("AlreadyAppealed", q.appeal, stage.key, check_id)
    appeal_members = qenv.seat(check_id, "draw(5)")
    assert len(appeal_members) == 5 and not set(appeal_members) & {c1, c2, honest, stage.agent_id}
    assert list(appeal_members) == q.expected_members(check_id, 1)
    wallets = {a: env.balance(qenv.validators[a].address) for a in appeal_members}
    held = {a: env.staking.info(a).open_checks for a in (*appeal_members, c1, c2, honest)}
    qenv.vote(check_id, {a: False for a in appeal_members})
    rcpt = env.record("finalize(appeal: executes)", q.finalize(qenv.reporter.key, check_id))
    done = q.events(rcpt, "CheckExecuted")[0]
    assert done["outcome"] == 1 and done["stageSlashed"] == 0
    assert q.check(check_id).final_outcome.name == "PASSED" and q.phase(check_id) == "executed"
    assert qenv.slashable(stage.agent_id) == STAGE_STAKE
    assert env.balance(stage.address) == q.params().appeal_bond  # refunded: the appeal changed the outcome
    for a in (c1, c2):  # voted against the final outcome in round 0
        assert qenv.slashable(a) == first[a] - first[a] // 10
    assert qenv.slashable(honest) == first[honest]
    share = q.params().report_bond // 5
    for a in appeal_members:
        assert env.balance(qenv.validators[a].address) == wallets[a] + share
    for a, n in held.items():  # this check no longer holds any seat's stake (others may)
        assert env.staking.info(a).open_checks == n - 1
    penalized = q.contract.events.ValidatorPenalized().process_receipt(rcpt, errors=DISCARD)
    assert sorted(int(e["args"]["agentId"]) for e in penalized) == sorted((c1, c2))
