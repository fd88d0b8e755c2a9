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
from pathlib import Path

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
    assert 0 < lst.expires_at - lst.created_at <= 3 + 1  # --nostr-ttl: a NIP-40 expiration 3 s out (+1 s rounding)
    mesh_nodes.kill9(a)  # no withdrawal: the NIP-40 expiration removes it
    wait_until(lambda: all(x.mesh_id != lst.mesh_id for x in listings(url)), 20, what="listing expired")


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


def test_a_listing_carries_the_sellers_prices_and_drops_hostile_ones(mesh_nodes: MeshNodes, nostr_relay,
                                                                    tmp_path: Path) -> None:
    """x402 discovery in the listing: a member that sells (its signed `x402` offer label) a model it hosts and
    one behind its own backend shows up in the publisher's listing with its price per model, network and
    asset (the backend one unverified); a second member whose offer is malformed (a negative price) and one
    whose backend claim is not one add nothing. Read back through the relay, every row is validated."""
    from mesh402.economics.charging import OFFER_LABEL, HostOffer
    from mesh402.labels import MODEL_LABEL, backend_label
    from mesh402.mesh.proto import mesh_pb2 as pb
    from tests.support.hostile import EvilMember

    url = nostr_relay.url
    a = mesh_nodes.start("a", extra=relay_args(url, "--publish"))
    asset = "0x" + "ab" * 20
    offer = HostOffer("eip155:84532", asset, "0x" + "11" * 20, per_request=10_000, per_1k=500).to_label()

    async def run() -> list[MeshListing]:
        async with EvilMember(tmp_path / "seller", a.token()) as seller, \
                EvilMember(tmp_path / "liar", a.token()) as liar:
            seller.svc.update_local(
                models=[pb.ModelEntry(model_id="sold-model", role=pb.MODEL_ROLE_HOST, ready=True)],
                labels={OFFER_LABEL: offer, MODEL_LABEL + "org/backend-model": backend_label(True, 4096)})
            liar.svc.update_local(
                models=[pb.ModelEntry(model_id="liar-model", role=pb.MODEL_ROLE_HOST, ready=True)],
                labels={OFFER_LABEL: offer.replace('"per_request":10000', '"per_request":-1'),
                        MODEL_LABEL + "liar-backend": '{"backend": "yes"}'})
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                got = await fetch_listings([url], 2.0)
                if got and got[0].prices and got[0].node_count + got[0].client_count >= 3:  # both members seen
                    return got
                await asyncio.sleep(0.2)
            raise AssertionError("no prices in the listing")

    (lst,) = asyncio.run(run())
    rows = {p["model"]: p for p in lst.prices}
    assert set(rows) == {"sold-model", "org/backend-model"}, lst.prices
    assert rows["sold-model"] == {"model": "sold-model", "network": "eip155:84532", "asset": asset,
                                  "per_request": "10000", "per_1k": "500", "verified": True}
    assert rows["org/backend-model"]["verified"] is False
