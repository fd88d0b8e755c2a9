"""Solo vs pipeline plans, RTT cap, cost model, re-planning (mesh402.placement.pipeline)."""
from __future__ import annotations

import pytest

from mesh402.placement import (
    CostModel,
    ModelLayout,
    Plan,
    StageAssignment,
    WaitingForCapacity,
    assign_layers,
    estimate_token_latency_ms,
    node_capacity,
    plan_model,
    replan,
    split_peers,
    stage_bytes,
)
from tests.support.placement import KEY, MB, check_plan, full_mesh, layout, mesh, node, smollm2_layout

GB = 10**9


@pytest.fixture(scope="module")
def smol() -> ModelLayout:
    return smollm2_layout()


def smol_mesh(lay, max_vram: float, n: int, rtt: float = 0.5):
    cap = node_capacity(max_vram, 64 * GB)
    return full_mesh({f"node{i}": cap for i in range(n)}, rtt=rtt, models=(lay.model_key,))


# -- SmolLM2 (about 98 MB on disk, 96.6 MB of tensors) -------------------------------------


def test_smollm2_solo_when_it_fits(smol):
    snap = smol_mesh(smol, 0.2, 2)
    plan = plan_model(smol.model_key, smol, snap, epoch=1)
    assert isinstance(plan, Plan) and plan.is_solo
    assert plan.host == "node1"  # equal capacity: the higher id hosts
    assert plan.stages == (StageAssignment("node1", 0, 30, smol.total_bytes),)
    assert plan.standbys == ("node0",)
    check_plan(plan, smol, snap)


def test_smollm2_two_stages_at_0_08_gb(smol):
    snap = smol_mesh(smol, 0.08, 2)
    plan = plan_model(smol.model_key, smol, snap, epoch=3)
    assert isinstance(plan, Plan) and plan.epoch == 3
    assert [(s.node_id, s.start, s.end) for s in plan.stages] == [("node1", 0, 15), ("node0", 15, 30)]
    check_plan(plan, smol, snap)


def test_smollm2_three_stages_at_0_05_gb(smol):
    snap = smol_mesh(smol, 0.05, 3)
    plan = plan_model(smol.model_key, smol, snap, epoch=1)
    assert isinstance(plan, Plan) and len(plan.stages) == 3
    # the end stages also hold the (tied) 30 MB embedding, so they get fewer layers
    assert [(s.start, s.end) for s in plan.stages] == [(0, 6), (6, 24), (24, 30)]
    check_plan(plan, smol, snap)


def test_smollm2_uses_fewest_stages_and_keeps_a_standby(smol):
    snap = smol_mesh(smol, 0.08, 4)
    plan = plan_model(smol.model_key, smol, snap, epoch=1)
    assert len(plan.stages) == 2 and plan.host == "node3"
    assert set(plan.standbys) == set(snap.ids) - set(plan.nodes)
    check_plan(plan, smol, snap)


def test_smollm2_waits_when_total_capacity_is_short(smol):
    snap = smol_mesh(smol, 0.05, 2)
    res = plan_model(smol.model_key, smol, snap, epoch=5)
    assert isinstance(res, WaitingForCapacity)
    assert res.epoch == 5 and res.host == "node1"
    assert res.available_bytes < res.needed_bytes
    assert smol.model_key in res.reason and "MB" in res.reason


# -- synthetic -------------------------------------------------------------------------------


def test_no_host_waits():
    res = plan_model(KEY, layout(), mesh(node("a", 10 * GB, models=())), epoch=1)
    assert isinstance(res, WaitingForCapacity) and res.host is None and "on disk" in res.reason


def test_layout_key_must_match():
    with pytest.raises(ValueError):
        plan_model("other@1", layout(), mesh(node("a", GB)), epoch=1)


def test_rtt_cap_excludes_far_peers():
    lay = layout()  # 100 MB of layers + 20 MB embedding, tied
    snap = mesh(node("h", 100 * MB, {"far": 120.0}), node("far", 100 * MB))
    res = plan_model(KEY, lay, snap, epoch=1)
    assert isinstance(res, WaitingForCapacity)
    assert "beyond" in res.reason and "80 ms" in res.reason
    plan = plan_model(KEY, lay, snap, epoch=1, max_split_rtt_ms=150.0)
    assert isinstance(plan, Plan) and plan.nodes == ("h", "far")
    plan = plan_model(KEY, lay, snap, epoch=1, max_split_rtt_ms=None)
    assert isinstance(plan, Plan) and len(plan.stages) == 2


def test_rtt_from_either_side_counts():
    # only the peer measured the link: the host still sees it as too far
    snap = mesh(node("h", 100 * MB), node("far", 99 * MB, {"h": 120.0}))
    assert split_peers(KEY, snap, "h") == ()
    assert split_peers(KEY, snap, "h", max_split_rtt_ms=200) == ("far",)


def test_unknown_rtt_sorted_last_but_usable():
    snap = mesh(node("h", 100 * MB, {"b": 30.0, "c": 5.0}), node("a", 90 * MB), node("b", 90 * MB),
                node("c", 90 * MB), node("d", 90 * MB, {"h": 79.0}), node("e", 90 * MB, {"h": 81.0}))
    assert split_peers(KEY, snap, "h") == ("c", "b", "d", "a")  # e is beyond the cap
    # only the unmeasured peer is left: it may still take a stage
    plan = plan_model(KEY, layout(), snap.without(["b", "c", "d", "e"]), epoch=1)
    assert isinstance(plan, Plan) and plan.nodes == ("h", "a")


def test_clients_and_nodes_without_the_model_take_no_stage():
    snap = mesh(node("h", 100 * MB, {"c": 1.0, "x": 1.0}), node("c", 900 * MB, client=True),
                node("x", 900 * MB, models=()))
    assert isinstance(plan_model(KEY, layout(), snap, epoch=1), WaitingForCapacity)
    plan = plan_model(KEY, layout(), snap, epoch=1, allow_transfer=True)
    assert isinstance(plan, Plan) and plan.nodes == ("h", "x")  # hosting still needs the model on disk
    check_plan(plan, layout(), snap)


def test_cost_prefers_fewer_hops_when_compute_is_equal():
    caps = {"a": 100 * MB, "b": 100 * MB, "c": 100 * MB, "d": 100 * MB}
    snap = full_mesh(caps, rtt=2.0, speed=20.0)
    plan = plan_model(KEY, layout(), snap, epoch=1)
    assert len(plan.stages) == 2


def test_cost_prefers_a_faster_node_when_it_fits():
    lay = layout()
    snap = mesh(node("h", 110 * MB, {"slow": 1.0, "fast": 1.0}, speed=10.0),
                node("slow", 100 * MB, {"fast": 1.0}, speed=10.0),
                node("fast", 100 * MB, speed=40.0))
    plan = plan_model(KEY, lay, snap, epoch=1)
    assert plan.nodes == ("h", "fast")
    # and the fast node gets more layers (speed-proportional, capped by what fits)
    assert plan.stages[1].n_layers > plan.stages[0].n_layers
    check_plan(plan, lay, snap)


def test_cost_prefers_the_nearer_node_when_speeds_are_equal():
    snap = mesh(node("h", 110 * MB, {"near": 5.0, "mid": 30.0}), node("near", 100 * MB), node("mid", 100 * MB))
    plan = plan_model(KEY, layout(), snap, epoch=1)
    assert plan.nodes == ("h", "near")


def test_a_much_faster_third_node_is_worth_a_hop():
    # h and b are slow and could hold the model together; f is 20x faster but too small to take
    # half the model: three stages with f win (it takes the end stage, whose head is costly to read)
    lay = layout(n_layers=20, layer=5 * MB, embed=20 * MB)
    snap = mesh(node("h", 91 * MB, {"b": 1.0, "f": 1.0}, speed=1.0),
                node("b", 90 * MB, {"f": 1.0}, speed=1.0),
                node("f", 50 * MB, speed=20.0))
    plan = plan_model(KEY, lay, snap, epoch=1)
    assert len(plan.stages) == 3 and plan.stages[2].node_id == "f"
    check_plan(plan, lay, snap)
    two = plan_model(KEY, lay, snap.without(["f"]), epoch=1)
    assert two.est_token_latency_ms > plan.est_token_latency_ms


def test_estimate_matches_plan():
    lay = layout()
    snap = full_mesh({"a": 80 * MB, "b": 80 * MB}, rtt=10.0)
    plan = plan_model(KEY, lay, snap, epoch=1)
    assert estimate_token_latency_ms(lay, plan.stages, snap) == pytest.approx(plan.est_token_latency_ms)
    cm = CostModel()
    compute = (lay.total_bytes - lay.embed_bytes - lay.norm_bytes + lay.head_bytes) / (cm.default_speed_gbps * 1e6)
    hops = 2 * (10.0 / 2 + cm.hop_overhead_ms)
    assert plan.est_token_latency_ms == pytest.approx(compute + hops)


def test_replan_after_a_stage_dies_uses_the_standby(smol):
    snap = smol_mesh(smol, 0.08, 3)
    plan = plan_model(smol.model_key, smol, snap, epoch=1)
    (standby,) = plan.standbys
    dead = plan.stages[1].node_id
    again = replan(smol.model_key, smol, snap, [dead], epoch=2)
    assert isinstance(again, Plan) and again.epoch == 2
    assert again.host == plan.host
    assert again.stages[1].node_id == standby
    assert (again.stages[1].start, again.stages[1].end) == (plan.stages[1].start, plan.stages[1].end)
    assert again.standbys == ()


def test_replan_after_the_host_dies_elects_a_new_host(smol):
    snap = smol_mesh(smol, 0.08, 3)
    plan = plan_model(smol.model_key, smol, snap, epoch=1)
    again = replan(smol.model_key, smol, snap, [plan.host], epoch=2)
    assert isinstance(again, Plan) and plan.host not in again.nodes and len(again.stages) == 2
    assert again.host == "node1"


def test_replan_without_enough_nodes_waits(smol):
    snap = smol_mesh(smol, 0.08, 2)
    res = replan(smol.model_key, smol, snap, ["node0"], epoch=2)
    assert isinstance(res, WaitingForCapacity) and res.host == "node1"


def test_assign_layers_exact_bytes_with_uneven_layers():
    # layer 0 is huge: it can only go where it fits
    lay = ModelLayout(KEY, 4, (50, 5, 5, 5), embed_bytes=10, head_bytes=10, tied=True)
    ranges = assign_layers(lay, [capacity_for(60), capacity_for(30)])
    assert ranges == ((0, 1), (1, 4))
    assert assign_layers(lay, [capacity_for(59), capacity_for(30)]) is None
    assert assign_layers(lay, [capacity_for(1000)]) == ((0, 4),)
    assert assign_layers(lay, [capacity_for(1000)] * 5) is None  # more stages than layers


def test_assign_layers_proportional_to_speed_or_capacity():
    lay = layout(n_layers=40, layer=MB, embed=0, norm=0, tied=False, head=0)
    assert assign_layers(lay, [capacity_for(100 * MB)] * 2, speeds=[10.0, 30.0]) == ((0, 10), (10, 40))
    assert assign_layers(lay, [capacity_for(10 * MB), capacity_for(30 * MB)]) == ((0, 10), (10, 40))
    # the fast node is capped by what fits it
    assert assign_layers(lay, [capacity_for(100 * MB), capacity_for(5 * MB)], speeds=[1.0, 99.0]) == ((0, 35), (35, 40))


def capacity_for(n_bytes: int) -> int:
    """The smallest capacity that fits ``n_bytes`` with the 10% headroom."""
    return -(-n_bytes * 11 // 10)


def test_plan_round_trips_through_a_dict(smol):
    plan = plan_model(smol.model_key, smol, smol_mesh(smol, 0.05, 4), epoch=7)
    again = Plan.from_dict(plan.to_dict())
    assert again == plan and again.same_assignment(plan)
    assert not plan.same_assignment(plan_model(smol.model_key, smol, smol_mesh(smol, 0.08, 2), epoch=7))
    assert stage_bytes(smol, 0, 6) == plan.stages[0].tensor_bytes
