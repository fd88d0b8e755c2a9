"""`--auto` follows counts it verified, not a listing's self-reported node count (issue 13).

A hostile publisher re-lists its real one-node mesh claiming 10,000 nodes (a real nostr-sdk
LocalRelay, real node processes). A new `--auto` node probes the candidates, joins the honest
two-node mesh, and its merge loop never moves it to the inflated one; a running `--auto` mesh of two
merges into an honest mesh of three, not toward the claim. Both fail on the code before the probe."""

from __future__ import annotations

import asyncio
import time

from mesh402.discovery.listing import MeshListing
from mesh402.discovery.nostr import fetch_listings
from harness.mesh_nodes import MeshNodes, wait_until
from tests.support.hostile_listing import publish_inflated


def listings(url: str) -> list[MeshListing]:
    return asyncio.run(fetch_listings([url], 2.0))


def test_auto_ignores_an_inflated_node_count(mesh_nodes: MeshNodes, nostr_relay) -> None:
    url = nostr_relay.url
    pub = ["--nostr-relay", url, "--nostr-refresh", "1", "--publish"]
    a = mesh_nodes.start("a", extra=pub)
    b = mesh_nodes.start("b", join=a.token())
    mesh_nodes.wait_full_mesh([a, b], timeout=20)
    honest = a.status()["mesh_id"]
    wait_until(lambda: any(x.mesh_id == honest and x.node_count == 2 for x in listings(url)), 15,
               what="honest listing of 2 nodes")

    h = mesh_nodes.start("h", extra=pub)  # the attacker's mesh: really one node
    evil = h.status()["mesh_id"]
    wait_until(lambda: any(x.mesh_id == evil for x in listings(url)), 15, what="attacker's own listing")
    real = next(x for x in listings(url) if x.mesh_id == evil)
    publish_inflated(url, real, node_count=10_000)
    wait_until(lambda: any(x.mesh_id == evil and x.node_count == 10_000 for x in listings(url)), 10,
               what="inflated listing")

    t0 = time.monotonic()
    c = mesh_nodes.start("c", extra=["--nostr-relay", url, "--nostr-refresh", "1", "--auto",
                                     "--auto-interval", "1"])
    mesh_nodes.wait_full_mesh([a, b, c], timeout=30)
    st = c.status()
    assert st["mesh_id"] == honest
    d = st["node"]["discovery"]
    print(f"\n--auto with probes: process start -> full mesh {time.monotonic() - t0:.2f}s; "
          f"join_s {d['join_s']:.2f}s, latest probe {d['probe_s']:.2f}s")
    # several merge rounds later it has not moved, and the attacker's mesh never held it
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        assert c.status()["mesh_id"] == honest
        assert c.node_id not in h.peers()
        time.sleep(0.5)
    disc = c.status()["node"]["discovery"]
    assert disc["merged_into"] is None
    assert disc["verified_nodes"].get(evil) == 1  # probed: one node behind the 10,000 claim
    assert disc["verified_nodes"].get(honest, 2) >= 2


def test_a_running_auto_mesh_merges_toward_the_verified_larger_mesh(mesh_nodes: MeshNodes, nostr_relay) -> None:
    """C (`--auto`) and D already form a 2-node mesh; an honest 3-node mesh and a 1-node mesh claiming
    10,000 get listed. C probes both and merges into the honest one, never into the attacker's."""
    url = nostr_relay.url
    pub = ["--nostr-relay", url, "--nostr-refresh", "1", "--publish"]
    c = mesh_nodes.start("c", extra=["--nostr-relay", url, "--nostr-refresh", "1", "--auto", "--auto-interval", "1"])
    d = mesh_nodes.start("d", join=c.token())
    mesh_nodes.wait_full_mesh([c, d], timeout=20)
    own = c.status()["mesh_id"]

    h = mesh_nodes.start("h", extra=pub)
    evil = h.status()["mesh_id"]
    wait_until(lambda: any(x.mesh_id == evil for x in listings(url)), 15, what="attacker's own listing")
    publish_inflated(url, next(x for x in listings(url) if x.mesh_id == evil), node_count=10_000)

    a = mesh_nodes.start("a", extra=pub)
    b = mesh_nodes.start("b", join=a.token())
    e = mesh_nodes.start("e", join=a.token())
    honest = a.status()["mesh_id"]
    t0 = time.monotonic()
    wait_until(lambda: c.status()["mesh_id"] == honest, 30, what="C merged into the honest mesh")
    merge_s = time.monotonic() - t0
    mesh_nodes.wait_full_mesh([a, b, e, c], timeout=20)
    assert c.node_id not in h.peers()  # C never entered the attacker's mesh on the way
    disc = c.status()["node"]["discovery"]
    assert disc["merged_into"] == honest and own != honest
    assert disc["verified_nodes"].get(evil) == 1 and disc["verified_nodes"].get(honest) == 3
    print(f"\nmerge by verified count: honest mesh up -> C merged {merge_s:.2f}s")
