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


ASSET = "0x" + "ab" * 20
ROW = {"model": "qwen", "network": "eip155:8453", "asset": ASSET, "per_request": "10000", "per_1k": "500",
       "verified": True}


def test_a_listing_carries_prices_validated_on_read() -> None:
    """The price table (x402 discovery in listings): kept through JSON; hostile rows are dropped, the table
    is capped, prices are integers in range and travel as strings."""
    import json

    from mesh402.discovery.listing import MAX_PRICES

    lst = L("m1", prices=[ROW, {**ROW, "model": "llama", "verified": False}])
    assert MeshListing.from_json(lst.to_json()).prices == lst.prices
    hostile = [ROW, {**ROW, "model": "bad id with spaces"}, {**ROW, "per_request": "-1"},
               {**ROW, "per_1k": str(10**19)}, {**ROW, "asset": "0xnothex"}, {**ROW, "network": "x" * 100},
               {**ROW, "verified": "yes"}, {**ROW, "per_request": "1e3"}, "not a row", None,
               *[{**ROW, "model": f"m{i}", "per_request": 7} for i in range(200)]]
    d = json.loads(lst.to_json()) | {"prices": hostile}
    back = MeshListing.from_json(json.dumps(d))
    assert back.prices[0] == ROW and len(back.prices) == MAX_PRICES
    assert all(p["model"].startswith("m") and p["per_request"] == "7" for p in back.prices[1:])
    assert MeshListing.from_json(json.dumps(d | {"prices": "qwen=1"})).prices == []


def test_lan_txt_carries_the_prices_of_one_network_within_the_txt_cap() -> None:
    from mesh402.discovery.lan import MAX_TXT

    rows = [{**ROW, "model": f"model-{i:02d}"} for i in range(30)] + [{**ROW, "network": "eip155:1"}]
    lst = L("m1", policy="open", prices=rows)
    txt = txt_for(lst, "ab" * 32, ["10.0.0.2:7000"], "m402tok")
    assert txt["x402"] == f"eip155:8453,{ASSET}" and 0 < len(txt["prices"]) <= MAX_TXT
    got = listing_from_txt(txt, now=100.0)
    assert got is not None and got.prices == rows[: len(got.prices)] and len(got.prices) >= 5
    hostile = {**txt, "prices": "qwen=1/2/1,bad model=1/2/1,x=-5/0/1,y=1/2,z=1/2/0", "x402": "eip155:8453,0xzz"}
    assert listing_from_txt(hostile, now=100.0).prices == []  # type: ignore[union-attr]
    ok = listing_from_txt({**hostile, "x402": f"eip155:8453,{ASSET}"}, now=100.0)
    assert ok is not None and [(p["model"], p["verified"]) for p in ok.prices] == [("qwen", True), ("z", False)]


def test_mesh_prices_are_the_lowest_offer_per_model_from_sellers_labels() -> None:
    """What a mesh's listing says its sellers charge: each seller's announced offer for the models it answers
    itself (hosted, or its own backend's, unverified); a malformed offer or backend claim is ignored."""
    from types import SimpleNamespace

    from mesh402.discovery.auto import mesh_prices
    from mesh402.economics.charging import OFFER_LABEL, HostOffer
    from mesh402.labels import MODEL_LABEL, backend_label
    from mesh402.mesh.proto import mesh_pb2 as pb

    def ann(offer: str | None, hosted: list[str], labels: dict[str, str] | None = None) -> SimpleNamespace:
        return SimpleNamespace(labels={**({OFFER_LABEL: offer} if offer else {}), **(labels or {})},
                               models=[SimpleNamespace(model_id=m, ready=True, role=pb.MODEL_ROLE_HOST) for m in hosted])

    def offer(per_request: int, per_1k: int = 0) -> str:
        return HostOffer("eip155:8453", ASSET, "0x" + "11" * 20, per_request, per_1k).to_label()

    rows = mesh_prices([ann(offer(300), ["qwen"]), ann(offer(200, 5), ["qwen", "llama"]),
                        ann(offer(1), ["qwen"], {MODEL_LABEL + "org/back": backend_label(True, 0)}),
                        ann(None, ["free-model"]), ann('{"network":"x","per_request":-4}', ["qwen"]),
                        ann(offer(0), ["qwen"])])  # a free node sells nothing
    got = {r["model"]: (r["per_request"], r["per_1k"], r["verified"]) for r in rows}
    assert got == {"qwen": ("1", "0", True), "llama": ("200", "5", True), "org/back": ("1", "0", False)}
