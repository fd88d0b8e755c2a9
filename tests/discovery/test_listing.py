"""Pure discovery decisions: listing format, named mesh ids, --auto scoring, merge order, LAN TXT."""

from __future__ import annotations

from mesh402.discovery.lan import listing_from_txt, token_fingerprint, txt_for
from mesh402.discovery.probe import beats
from mesh402.discovery.listing import (MeshListing, Seeker, by_mesh, choose_mesh, matches,
                                       named_mesh_id, newest_per_author, score_mesh)


def L(mesh_id: str, **kw) -> MeshListing:
    kw.setdefault("invite", "m402tok")
    return MeshListing(mesh_id=mesh_id, **kw)


def test_private_listing_never_carries_an_invite() -> None:
    lst = L("a" * 32, policy="private", invite="m402secretish")
    assert '"invite":""' in lst.to_json()
    back = MeshListing.from_json(lst.to_json().replace('"invite":""', '"invite":"m402x"'))
    assert back.invite == "" and not back.is_open


def test_named_mesh_id_is_deterministic_per_name_and_key() -> None:
    k1, k2 = "ab" * 32, "cd" * 32
    assert named_mesh_id("lab", k1) == named_mesh_id("lab", k1)
    assert len({named_mesh_id("lab", k1), named_mesh_id("lab", k2), named_mesh_id("lab2", k1)}) == 3


def test_newest_per_author_drops_expired() -> None:
    old = L("m1", author="x", created_at=10, node_count=1)
    new = L("m1", author="x", created_at=20, node_count=3)
    gone = L("m2", author="y", created_at=20, expires_at=50)
    assert newest_per_author([old, new, gone], now=100) == [new]


def test_auto_score_fit_size_demand_last_and_private() -> None:
    me = Seeker(models_on_disk=frozenset({"qwen"}), last_mesh_id="")
    big = L("big", node_count=8, serving=["x", "y"])
    wants = L("wants", node_count=2, wanted=["qwen"])
    private = L("priv", policy="private", node_count=50)
    best = choose_mesh([big, wants, private], me)
    assert best is not None and best.listing.mesh_id == "wants"  # fit beats size
    assert score_mesh(private, me) is None
    again = choose_mesh([big, wants], Seeker(last_mesh_id="big"))
    assert again.listing.mesh_id == "big" and "joined last time" in again.reasons
    assert choose_mesh([L("n", name="other")], Seeker(name="mine")) is None
    assert score_mesh(L("full", client_count=5, max_clients=5), me) is None


def test_merge_order_is_antisymmetric_with_hysteresis() -> None:
    assert beats((1, "bbbb"), (1, "aaaa")) and not beats((1, "aaaa"), (1, "bbbb"))  # lone nodes: larger id
    assert not beats((2, "zzzz"), (3, "aaaa"))  # the larger mesh stays
    assert beats((3, "aaaa"), (2, "zzzz"))
    assert not beats((2, "zzzz"), (2, "aaaa")) and not beats((2, "aaaa"), (2, "zzzz"))  # equal meshes stay put


def test_discover_filters_and_one_listing_per_mesh() -> None:
    x = L("m", node_count=2, created_at=1, serving=["a"], total_capacity_bytes=5 * 10**9, region="EU")
    y = L("m", node_count=3, created_at=2)
    assert by_mesh([x, y])["m"] is y
    assert matches(x, model="a", min_capacity_bytes=10**9, region="eu")
    assert not matches(x, model="b") and not matches(x, min_capacity_bytes=10**10) and not matches(x, name="n")


def test_lan_txt_has_fingerprint_not_token() -> None:
    tok = "m402" + "Q" * 80
    lst = L("f" * 32, policy="open", invite=tok, serving=["s"], node_count=2)
    txt = txt_for(lst, "ab" * 32, ["10.0.0.1:4000"], tok)
    assert tok not in str(txt) and txt["tok_fp"] == token_fingerprint(tok)
    back = listing_from_txt(txt, now=1000.0)
    assert back is not None and back.is_open and back.invite.startswith("m402") and back.invite != tok
    priv = listing_from_txt({**txt, "policy": "private"}, now=1000.0)
    assert priv is not None and priv.invite == "" and not priv.is_open
