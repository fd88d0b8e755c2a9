"""Nostr discovery with real node processes and a nostr-sdk LocalRelay on loopback.

A publishes, B `--auto` joins with no token copied; listings are withdrawn on leave and expire
when a node dies; a private listing carries no invite; two `--auto` nodes that start at once end
in one mesh. Each test gets its own relay, so listings never leak between tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import stat
import time

import pytest

from mesh402.discovery.listing import MeshListing
from mesh402.discovery.nostr import fetch_listings
from harness.mesh_nodes import MeshNodes, wait_until
from harness.procs import MESH402, REPO


def listings(url: str) -> list[MeshListing]:
    return asyncio.run(fetch_listings([url], 2.0))


def relay_args(url: str, *more: str) -> list[str]:
    return ["--nostr-relay", url, "--nostr-refresh", "1", *more]


def test_publish_then_auto_join_without_token(mesh_nodes: MeshNodes, nostr_relay) -> None:
    url = nostr_relay.url
    a = mesh_nodes.start("a", extra=relay_args(url, "--publish", "--region", "eu-test"))
    wait_until(lambda: len(listings(url)) == 1, 15, what="A's listing")
    (lst,) = listings(url)
    st_a = a.status()
    assert lst.mesh_id == st_a["mesh_id"] and lst.policy == "open" and lst.invite.startswith("m402")
    assert lst.region == "eu-test" and lst.node_count == 1 and lst.publisher_node == a.node_id
    key = a.home / "nostr.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600

    t0 = time.monotonic()
    b = mesh_nodes.start("b", extra=relay_args(url, "--auto"))  # no --join: nothing copied
    mesh_nodes.wait_full_mesh([a, b], timeout=20)
    joined_s = time.monotonic() - t0
    st_b = b.status()
    assert st_b["mesh_id"] == st_a["mesh_id"]
    disc = st_b["node"]["discovery"]
    assert disc["chosen"] == st_a["mesh_id"] and disc["join_s"] is not None
    print(f"\ndiscovery-to-join: process start -> full mesh {joined_s:.2f}s; fetch {disc['fetch_s']*1000:.0f} ms, "
          f"fetch+dial {disc['join_s']*1000:.0f} ms")
    # the listing follows the mesh: two nodes now
    wait_until(lambda: listings(url)[0].node_count == 2, 10, what="listing shows 2 nodes")
    # an API-only client finds it too, and is counted as a client
    c = mesh_nodes.start("c", kind="client", extra=["--nostr-relay", url, "--auto"])
    mesh_nodes.wait_full_mesh([a, b, c], timeout=20)
    wait_until(lambda: listings(url)[0].client_count == 1, 10, what="listing shows 1 client")

    # mesh402 discover, with filters
    def discover(*flags: str) -> list[dict]:
        out = subprocess.run([*MESH402, "discover", "--nostr-relay", url, "--timeout", "2", "--json", *flags],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert [x["mesh_id"] for x in discover("--region", "EU-test")] == [st_a["mesh_id"]]
    assert discover("--region", "elsewhere") == [] and discover("--model", "no-such-model") == []
    assert discover("--min-capacity", "100000") == []

    # graceful leave withdraws the listing at once
    mesh_nodes.terminate(a)
    wait_until(lambda: listings(url) == [], 5, what="listing withdrawn")


def test_listing_expires_when_node_dies_and_private_has_no_invite(mesh_nodes: MeshNodes, nostr_relay) -> None:
    url = nostr_relay.url
    a = mesh_nodes.start("a", extra=["--nostr-relay", url, "--publish", "--private", "--nostr-ttl", "3",
                                     "--nostr-refresh", "1"])
    wait_until(lambda: len(listings(url)) == 1, 15, what="private listing")
    (lst,) = listings(url)
    assert lst.policy == "private" and lst.invite == "" and not lst.is_open
    secret = (a.home / "mesh.secret").read_text().strip()
    assert secret and secret not in lst.to_json()
    assert a.status()["policy"] == "secret"
    # an --auto node does not join a private mesh: it starts its own
    b = mesh_nodes.start("b", extra=relay_args(url, "--auto", "--auto-interval", "100"))
    assert b.status()["mesh_id"] != lst.mesh_id
    mesh_nodes.kill9(a)  # no withdrawal: the NIP-40 expiration removes it
    t0 = time.monotonic()
    wait_until(lambda: all(x.mesh_id != lst.mesh_id for x in listings(url)), 8, what="listing expired")
    assert time.monotonic() - t0 < 6


def test_two_simultaneous_auto_nodes_merge(mesh_nodes: MeshNodes, nostr_relay) -> None:
    url = nostr_relay.url
    args = relay_args(url, "--auto", "--auto-interval", "1", "--mesh-name", "race")
    a = mesh_nodes.start("a", extra=args, wait=False)
    b = mesh_nodes.start("b", extra=args, wait=False)
    for n in (a, b):
        n.proc.wait_http(f"{n.console}/api/status", timeout=60)
    t0 = time.monotonic()
    wait_until(lambda: a.status()["mesh_id"] == b.status()["mesh_id"], 20, what="one mesh")
    mesh_nodes.wait_full_mesh([a, b], timeout=15)
    merged = [n for n in (a, b) if n.status()["node"]["discovery"]["merged_into"]]
    assert len(merged) <= 1
    wait_until(lambda: [x.node_count for x in listings(url)] == [2], 10, what="one listing of 2 nodes")
    print(f"\nmerge: one mesh {time.monotonic() - t0:.2f}s after both were up")
