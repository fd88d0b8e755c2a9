"""Per-model host election (mesh402.placement.election)."""
from __future__ import annotations

import itertools

from mesh402.placement import MeshSnapshot, elect_host, host_ranking
from tests.support.placement import KEY, MB, mesh, node


def test_most_capacity_wins():
    snap = mesh(node("a", 50 * MB), node("b", 80 * MB), node("c", 70 * MB))
    assert elect_host(KEY, snap) == "b"
    assert host_ranking(KEY, snap) == ("b", "c", "a")


def test_tie_goes_to_higher_node_id():
    snap = mesh(node("aaa", 80 * MB), node("zzz", 80 * MB), node("mmm", 80 * MB))
    assert elect_host(KEY, snap) == "zzz"
    assert host_ranking(KEY, snap) == ("zzz", "mmm", "aaa")


def test_only_serving_nodes_with_the_model_on_disk():
    snap = mesh(node("client", 900 * MB, client=True),
                node("nomodel", 800 * MB, models=("other@1",)),
                node("empty", 0),
                node("ok", 10 * MB))
    assert elect_host(KEY, snap) == "ok"
    assert elect_host("other@1", snap) == "nomodel"
    assert elect_host("missing@0", snap) is None
    assert elect_host(KEY, mesh()) is None


def test_same_answer_from_any_node_order():
    nodes = [node(f"n{i}", c) for i, c in enumerate([30 * MB, 70 * MB, 70 * MB, 10 * MB])]
    answers = {elect_host(KEY, MeshSnapshot(p)) for p in itertools.permutations(nodes)}
    assert answers == {"n2"}


def test_election_is_per_model():
    a, b = "a@1", "b@2"
    snap = mesh(node("x", 90 * MB, models=(a,)), node("y", 50 * MB, models=(a, b)))
    assert elect_host(a, snap) == "x"
    assert elect_host(b, snap) == "y"
