"""Expert placement for MoE models (mesh402.placement.experts)."""
from __future__ import annotations

import itertools

import pytest

from mesh402.placement import (
    ExpertLayout,
    ExpertPlan,
    MeshSnapshot,
    ModelLayout,
    WaitingForCapacity,
    expert_shares,
    fits,
    plan_experts,
)
from tests.support.placement import KEY, MB, full_mesh, mesh, node

N_EXP, N_LAYERS, EXPERT = 8, 4, MB  # 8 experts of 1 MB in each of 4 layers: 32 MB of experts


def moe(n_layers: int = N_LAYERS, n_exp: int = N_EXP, expert: int = EXPERT) -> ModelLayout:
    trunk_per_layer = 2 * MB
    return ModelLayout(KEY, n_layers, (trunk_per_layer + n_exp * expert,) * n_layers,
                       embed_bytes=4 * MB, head_bytes=4 * MB, norm_bytes=1000, tied=True,
                       experts=ExpertLayout(n_exp, 2, (expert,) * n_layers))


def check(plan: ExpertPlan, lay: ModelLayout, snap: MeshSnapshot) -> None:
    assert plan.shards[0].node_id == plan.host and plan.shards[0].holds_trunk
    assert sum(s.holds_trunk for s in plan.shards) == 1
    for e in lay.experts.all_experts():
        assert len(plan.owners(e)) >= 1, e
    for s in plan.shards:
        assert len(set(s.experts)) == len(s.experts)
        expected = sum(lay.experts.expert_bytes[layer] for layer, _ in s.experts)
        expected += lay.trunk_bytes if s.holds_trunk else 0
        assert s.tensor_bytes == expected
        assert fits(s.tensor_bytes, snap.capacity(s.node_id))
    for e in plan.replicated:
        assert len(plan.owners(e)) == 2


def test_everything_on_the_host_when_it_fits():
    lay = moe()
    snap = full_mesh({"h": 200 * MB, "a": 100 * MB})
    plan = plan_experts(KEY, lay, snap, epoch=1)
    assert isinstance(plan, ExpertPlan) and plan.nodes == ("h",)
    assert len(plan.shards[0].experts) == N_EXP * N_LAYERS and plan.standbys == ("a",)
    check(plan, lay, snap)


def test_experts_spread_by_capacity_with_the_trunk_on_the_host():
    lay = moe()  # trunk: 4 x 2 MB + 4 MB tied embedding (once) = 12 MB; experts 32 MB
    snap = full_mesh({"h": 26 * MB, "a": 20 * MB, "b": 20 * MB})  # room for 11.6 + 18.2 + 18.2 MB
    plan = plan_experts(KEY, lay, snap, epoch=2)
    assert isinstance(plan, ExpertPlan) and plan.host == "h" and plan.epoch == 2
    assert set(plan.nodes) == {"h", "a", "b"}
    check(plan, lay, snap)
    # uniform usage: nothing is hot, nothing replicated, each expert exactly once
    assert plan.replicated == ()
    assert sum(len(s.experts) for s in plan.shards) == N_EXP * N_LAYERS


def test_hot_experts_are_replicated_on_another_node():
    lay = moe()
    usage = {(layer, e): (50.0 if e == 3 else 5.0) for layer in range(N_LAYERS) for e in range(N_EXP)}
    # the model (44 MB) does not fit h alone; h and a have room for 56 MB of experts
    snap = full_mesh({"h": 45 * MB, "a": 30 * MB, "b": 30 * MB})
    plan = plan_experts(KEY, lay, snap, usage, epoch=1)
    assert isinstance(plan, ExpertPlan) and plan.nodes == ("h", "a") and plan.standbys == ("b",)
    check(plan, lay, snap)
    assert set(plan.replicated) == {(layer, 3) for layer in range(N_LAYERS)}
    for layer in range(N_LAYERS):
        assert len(set(plan.owners((layer, 3)))) == 2


def test_replication_only_when_capacity_allows():
    lay = moe()
    usage = {(layer, 0): 100.0 for layer in range(N_LAYERS)}
    # room for each expert once and no more: h holds the 12 MB trunk + 8 MB, a and b 12 MB each
    snap = full_mesh({"h": -(-(lay.trunk_bytes + 8 * MB) * 11 // 10), "a": 132 * MB // 10, "b": 132 * MB // 10})
    plan = plan_experts(KEY, lay, snap, usage, epoch=1)
    assert isinstance(plan, ExpertPlan) and plan.replicated == ()
    check(plan, lay, snap)


def test_waiting_when_experts_do_not_fit_or_trunk_does_not_fit_host():
    lay = moe()
    res = plan_experts(KEY, lay, full_mesh({"h": 20 * MB, "a": 10 * MB}), epoch=1)
    assert isinstance(res, WaitingForCapacity) and res.needed_bytes == lay.experts.total_bytes
    res = plan_experts(KEY, lay, full_mesh({"h": 10 * MB, "a": 9 * MB}), epoch=1)
    assert isinstance(res, WaitingForCapacity) and "trunk" in res.reason


def test_rtt_cap_applies_to_expert_nodes():
    lay = moe()
    snap = mesh(node("h", 30 * MB, {"a": 100.0, "b": 1.0}), node("a", 40 * MB), node("b", 40 * MB))
    plan = plan_experts(KEY, lay, snap, epoch=1)
    assert isinstance(plan, ExpertPlan) and "a" not in plan.nodes and "a" in plan.standbys


def test_deterministic_under_node_order():
    lay = moe()
    usage = {(layer, e): float((e * 7 + layer) % 5) for layer in range(N_LAYERS) for e in range(N_EXP)}
    nodes = [node(n, c, {m: 1.0 for m in "habc" if m != n}) for n, c in
             [("h", 30 * MB), ("a", 20 * MB), ("b", 20 * MB), ("c", 15 * MB)]]
    plans = {plan_experts(KEY, lay, MeshSnapshot(p), usage, epoch=1) for p in itertools.permutations(nodes)}
    assert len(plans) == 1
    (plan,) = plans
    check(plan, lay, MeshSnapshot(nodes))


def test_expert_shares():
    ex = ExpertLayout(4, 2, (0, 10))  # layer 0 is dense
    assert expert_shares(ex, None) == {(1, e): 0.25 for e in range(4)}
    shares = expert_shares(ex, {(1, 0): 6, (1, 1): 2})
    assert shares == {(1, 0): 0.75, (1, 1): 0.25, (1, 2): 0.0, (1, 3): 0.0}


def test_dense_layout_is_rejected():
    with pytest.raises(ValueError):
        plan_experts(KEY, ModelLayout(KEY, 1, (1,), 1, 1), full_mesh({"h": MB}), epoch=1)
