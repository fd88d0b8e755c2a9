"""Property tests: plans are deterministic, valid, and the bounded search finds the cheapest split."""
from __future__ import annotations

from itertools import combinations, permutations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh402.placement import (
    MeshSnapshot,
    ModelLayout,
    NodeSnapshot,
    Plan,
    SearchLimits,
    WaitingForCapacity,
    assign_layers,
    elect_host,
    estimate_token_latency_ms,
    fits,
    plan_model,
    split_peers,
)
from mesh402.placement.types import StageAssignment
from tests.support.placement import KEY, MB, check_plan

IDS = ["a", "b", "c", "d", "e", "f"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layouts(draw) -> ModelLayout:
    """Layers of roughly one size (+-50%), embeddings up to 3 layers, sometimes tied."""
    n = draw(st.integers(1, 16) | st.integers(4, 16))
    base = draw(st.integers(MB, 10 * MB))
    layers = tuple(draw(st.lists(st.integers(base // 2, base * 3 // 2), min_size=n, max_size=n)))
    embed = draw(st.integers(0, 3 * base))
    tied = draw(st.booleans())
    head = embed if tied else draw(st.integers(0, 3 * base))
    return ModelLayout(KEY, n, layers, embed, head, draw(st.integers(0, 10_000)), tied,
                       draw(st.sampled_from([0, 0, 1000, base // 10])))


@st.composite
def meshes(draw, lay: ModelLayout, max_nodes: int = 6) -> list[NodeSnapshot]:
    """Nodes sized against the model. Half the meshes are "friendly" (every node near, serving, with
    the model, holding 25-95% of it), so that splits are common; the rest mix in clients, missing
    models, empty or huge nodes, unmeasured and far links."""
    ids = draw(st.lists(st.sampled_from(IDS[:max_nodes]), min_size=2, max_size=max_nodes, unique=True))
    friendly = draw(st.booleans())
    total = lay.total_bytes
    near = st.floats(0, 5, allow_nan=False)
    rtt_value = near if friendly else st.one_of(st.none(), near, st.floats(0, 150, allow_nan=False))
    part = st.floats(0.25, 0.95).map(lambda f: int(total * f))
    capacity = part if friendly else st.one_of(
        part, st.integers(0, total * 3 // 2), st.sampled_from([50 * MB, 80 * MB]))
    rtts: dict[str, dict[str, float]] = {nid: {} for nid in ids}
    for x, y in combinations(ids, 2):
        r = draw(rtt_value)
        if r is not None:
            for side in draw(st.sampled_from([(x,), (y,), (x, y)])):
                rtts[side][y if side == x else x] = r
    nodes = []
    for nid in ids:
        nodes.append(NodeSnapshot(
            nid,
            draw(capacity),
            rtts[nid],
            compute_score=draw(st.one_of(st.none(), st.floats(1, 50))),
            mem_bandwidth=draw(st.one_of(st.none(), st.floats(1, 50))),
            models_on_disk=frozenset((KEY,) if friendly else draw(st.sampled_from([(KEY,), ()]))),
            is_client=not friendly and draw(st.booleans()),
        ))
    return nodes


def cases(max_nodes: int = 6):
    return layouts().flatmap(lambda lay: st.tuples(st.just(lay), meshes(lay, max_nodes)))


@SETTINGS
@given(cases().flatmap(lambda c: st.tuples(st.just(c), st.permutations(c[1]))))
def test_plans_are_valid_and_independent_of_node_order(case):
    (lay, nodes), shuffled = case
    snap = MeshSnapshot(nodes)
    res = plan_model(KEY, lay, snap, epoch=4)
    assert res == plan_model(KEY, lay, MeshSnapshot(shuffled), epoch=4)
    assert res.epoch == 4
    host = elect_host(KEY, snap)
    if isinstance(res, WaitingForCapacity):
        assert res.reason and res.host == host
        if host is not None:
            assert not fits(lay.total_bytes, snap.capacity(host))
        return
    assert res.host == host
    check_plan(res, lay, snap)
    assert res.is_solo == fits(lay.total_bytes, snap.capacity(host))
    peers = set(split_peers(KEY, snap, host))
    assert set(res.nodes[1:]) <= peers  # within the RTT cap, not clients, model on disk
    assert set(res.standbys) == set(snap.holders(KEY)) - set(res.nodes)


LIMITS = SearchLimits(full_permutations_upto=5)


def brute_force(lay, snap, host):
    """The cheapest (host, *peers) order over every subset and permutation, or None."""
    peers = split_peers(KEY, snap, host)
    best = None
    for k in range(1, len(peers) + 1):
        for subset in combinations(peers, k):
            for perm in permutations(subset):
                order = (host, *perm)
                speeds = [snap.node(n).speed_gbps for n in order]
                ranges = assign_layers(lay, [snap.capacity(n) for n in order], speeds)
                if ranges is None:
                    continue
                stages = [StageAssignment(n, s, e, 0) for n, (s, e) in zip(order, ranges)]
                cost = estimate_token_latency_ms(lay, stages, snap)
                best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_nodes=5))
def test_bounded_search_finds_the_cheapest_split(case):
    lay, nodes = case
    snap = MeshSnapshot(nodes)
    res = plan_model(KEY, lay, snap, epoch=1, limits=LIMITS)
    host = elect_host(KEY, snap)
    if host is None or fits(lay.total_bytes, snap.capacity(host)):
        return
    best = brute_force(lay, snap, host)
    if best is None:
        assert isinstance(res, WaitingForCapacity)
    else:
        assert isinstance(res, Plan)
        assert res.est_token_latency_ms == pytest.approx(best, rel=1e-9, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(layouts(), st.lists(st.integers(0, 120 * MB), min_size=1, max_size=6),
       st.one_of(st.none(), st.lists(st.one_of(st.none(), st.floats(0.5, 80)), min_size=6, max_size=6)))
def test_assign_layers_is_exact_and_complete(lay, caps, speeds):
    """Ranges are contiguous, >= 1 layer each, fit exactly; None only if no contiguous split exists."""
    from mesh402.placement import stage_bytes

    sp = None if speeds is None else speeds[: len(caps)]
    ranges = assign_layers(lay, caps, sp)
    k, n = len(caps), lay.n_layers

    def exists(i: int, start: int) -> bool:  # exhaustive search for any feasible split
        if i == k - 1:
            return start < n and fits(stage_bytes(lay, start, n), caps[i])
        return any(fits(stage_bytes(lay, start, e), caps[i]) and exists(i + 1, e)
                   for e in range(start + 1, n - (k - 2 - i)))

    if ranges is None:
        assert k > n or not exists(0, 0)
        return
    assert ranges[0][0] == 0 and ranges[-1][1] == n and len(ranges) == k
    for (s, e), cap in zip(ranges, caps):
        assert e > s and fits(stage_bytes(lay, s, e), cap)
    for (_, e), (s, _) in zip(ranges, ranges[1:]):
        assert e == s


@st.composite
def moe_cases(draw):
    from mesh402.placement import ExpertLayout

    n_layers = draw(st.integers(1, 4))
    n_exp = draw(st.integers(2, 8))
    expert = draw(st.integers(MB // 4, MB))
    trunk_layer = draw(st.integers(MB // 4, 2 * MB))
    lay = ModelLayout(KEY, n_layers, (trunk_layer + n_exp * expert,) * n_layers, MB, MB, 0, True,
                      experts=ExpertLayout(n_exp, 1, (expert,) * n_layers))
    nodes = draw(meshes(lay, max_nodes=5))
    usage = draw(st.dictionaries(st.tuples(st.integers(0, n_layers - 1), st.integers(0, n_exp - 1)),
                                 st.floats(0, 100), max_size=n_layers * n_exp))
    return lay, nodes, usage


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(moe_cases().flatmap(lambda c: st.tuples(st.just(c), st.permutations(c[1]))))
def test_expert_plans_cover_every_expert_and_fit(case):
    from mesh402.placement import ExpertPlan, plan_experts

    (lay, nodes, usage), shuffled = case
    snap = MeshSnapshot(nodes)
    res = plan_experts(KEY, lay, snap, usage, epoch=1)
    assert res == plan_experts(KEY, lay, MeshSnapshot(shuffled), usage, epoch=1)
    if isinstance(res, WaitingForCapacity):
        return
    assert isinstance(res, ExpertPlan) and res.host == elect_host(KEY, snap)
    for e in lay.experts.all_experts():
        assert 1 <= len(res.owners(e)) <= 2
    for s in res.shards:
        assert fits(s.tensor_bytes, snap.capacity(s.node_id))
