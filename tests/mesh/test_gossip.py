"""Gossip state: signatures, forged/replayed/stale drops, and order-independent merging."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from mesh402.mesh.gossip import GossipState, Outcome, sign_announcement
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.proto import mesh_pb2 as pb

MESH = "ab" * 16
NOW = 1_700_000_000.0
IDS = [NodeIdentity.generate() for _ in range(4)]
ME = NodeIdentity.generate()


def ann(ident: NodeIdentity, seq: int, *, mesh=MESH, at=NOW, port=0, leaving=False) -> pb.SignedAnnouncement:
    a = pb.PeerAnnouncement(node_id=ident.node_id, seq=seq, issued_at_ms=int(at * 1000), mesh_id=mesh, api_port=port, leaving=leaving,
                            models=[pb.ModelEntry(model_id="m", content_hash="ff" * 32, role=pb.MODEL_ROLE_HOST, n_layers=30)])
    return sign_announcement(ident, mesh, a)


def state() -> GossipState:
    return GossipState(MESH, ME.node_id, stale_after=600, max_skew=300)


def test_new_update_duplicate_replay():
    g = state()
    a = IDS[0]
    assert g.offer(ann(a, 5), NOW)[0] == Outcome.NEW
    assert g.offer(ann(a, 5), NOW)[0] == Outcome.DUPLICATE
    assert g.offer(ann(a, 6, port=1), NOW)[0] == Outcome.UPDATED
    assert g.offer(ann(a, 5), NOW)[0] == Outcome.REPLAYED
    assert g.counters["replayed"] == 1
    assert g.get(a.node_id).api_port == 1
    # the origin itself handing over an old one is a replay; a third party relaying it is lag
    assert g.offer(ann(a, 5), NOW, via=a.node_id)[0] == Outcome.REPLAYED
    assert g.offer(ann(a, 5), NOW, via=IDS[1].node_id)[0] == Outcome.OUTDATED
    assert (g.counters["replayed"], g.counters["outdated"]) == (2, 1)


def test_forged_signature_and_sender():
    g = state()
    a, b = IDS[0], IDS[1]
    sa = ann(a, 1)
    forged = pb.SignedAnnouncement(announcement=sa.announcement, signature=bytes(64))
    assert g.offer(forged, NOW)[0] == Outcome.FORGED
    # b signs an announcement claiming to be a
    fake = pb.PeerAnnouncement.FromString(sa.announcement)
    data = fake.SerializeToString()
    from mesh402.mesh.gossip import signing_payload

    by_b = pb.SignedAnnouncement(announcement=data, signature=b.sign(signing_payload(MESH, data)))
    assert g.offer(by_b, NOW)[0] == Outcome.FORGED
    # edited content after signing
    edited = pb.PeerAnnouncement.FromString(sa.announcement)
    edited.api_port = 9999
    assert g.offer(pb.SignedAnnouncement(announcement=edited.SerializeToString(), signature=sa.signature), NOW)[0] == Outcome.FORGED
    # genuine, but presented by b as its own (direct sender mismatch)
    assert g.offer(sa, NOW, via=b.node_id, direct_sender=True)[0] == Outcome.FORGED
    assert g.counters["forged"] == 4
    assert g.get(a.node_id) is None


def test_stale_future_wrong_mesh_malformed():
    g = state()
    assert g.offer(ann(IDS[0], 1, at=NOW - 601), NOW)[0] == Outcome.STALE
    assert g.offer(ann(IDS[0], 1, at=NOW + 301), NOW)[0] == Outcome.STALE
    assert g.offer(ann(IDS[0], 1, mesh="cd" * 16), NOW)[0] == Outcome.WRONG_MESH
    assert g.offer(pb.SignedAnnouncement(announcement=b"\xff\xff", signature=b""), NOW)[0] == Outcome.MALFORMED
    assert g.offer(pb.SignedAnnouncement(announcement=b"", signature=b""), NOW)[0] == Outcome.MALFORMED


def test_replay_after_forget_is_still_detected():
    g = state()
    g.offer(ann(IDS[0], 10), NOW)
    g.forget(IDS[0].node_id)
    assert g.offer(ann(IDS[0], 10), NOW)[0] == Outcome.REPLAYED
    assert g.offer(ann(IDS[0], 9), NOW)[0] == Outcome.REPLAYED
    assert g.offer(ann(IDS[0], 9), NOW, via=IDS[1].node_id)[0] == Outcome.OUTDATED
    assert g.offer(ann(IDS[0], 11), NOW)[0] == Outcome.NEW


def test_own_announcement_relayed_back():
    g = state()
    out, a = g.offer(ann(ME, 3), NOW)
    assert out == Outcome.SELF and a.seq == 3


def test_newer_than_for_push_pull():
    g = state()
    g.offer(ann(IDS[0], 2), NOW)
    g.offer(ann(IDS[1], 4), NOW)
    missing = g.newer_than({IDS[0].node_id: 2, IDS[1].node_id: 3})
    assert [pb.PeerAnnouncement.FromString(s.announcement).node_id for s in missing] == [IDS[1].node_id]


POOL = [ann(IDS[i], seq, port=p) for i in range(3) for seq in (1, 2, 3) for p in (0, 1)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(range(len(POOL))), min_size=1, max_size=20), st.randoms())
def test_merge_is_order_independent(picks, rnd):
    """Two nodes receiving the same announcements in different orders end in the same state
    (including equivocations: same seq, different content)."""
    items = [POOL[i] for i in picks]
    g1, g2 = state(), state()
    for sa in items:
        g1.offer(sa, NOW)
    shuffled = list(items)
    rnd.shuffle(shuffled)
    for sa in shuffled:
        g2.offer(sa, NOW)
    assert g1.snapshot() == g2.snapshot()
    for origin, (seq, _) in g1.snapshot().items():
        assert seq == max(pb.PeerAnnouncement.FromString(s.announcement).seq for s in items
                          if pb.PeerAnnouncement.FromString(s.announcement).node_id == origin)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=80))
def test_arbitrary_signed_announcements_never_crash(a, s):
    g = state()
    out, _ = g.offer(pb.SignedAnnouncement(announcement=a, signature=s), NOW)
    assert out in (Outcome.MALFORMED, Outcome.FORGED, Outcome.WRONG_MESH, Outcome.STALE)


def test_copies_and_older_announcements_are_dropped_before_the_signature_check():
    g = state()
    a = IDS[0]
    first, newer = ann(a, 5), ann(a, 6, port=1)
    g.offer(first, NOW)
    g.offer(newer, NOW)
    checks = g.counters["sig_checks"]
    for _ in range(50):
        assert g.offer(newer, NOW)[0] == Outcome.DUPLICATE
        assert g.offer(first, NOW, via=IDS[1].node_id)[0] == Outcome.OUTDATED
    assert g.counters["sig_checks"] == checks and g.counters["deduped"] == 100
    # a forgery is checked once; its repeats are recognised without a second check
    forged = pb.SignedAnnouncement(announcement=ann(a, 7).announcement, signature=bytes(64))
    for _ in range(20):
        assert g.offer(forged, NOW)[0] == Outcome.FORGED
    assert g.counters["sig_checks"] == checks + 1 and g.counters["forged"] == 20
    assert g.get(a.node_id).api_port == 1


def test_oversize_announcements_are_refused_before_anything_else():
    from mesh402.mesh.limits import MeshLimits

    lim = MeshLimits()
    g = state()
    cases = {
        "bytes": dict(labels={"junk": "x" * (lim.max_announcement_bytes + 10)}),
        "labels": dict(labels={f"k{i}": "v" for i in range(lim.max_labels + 1)}),
        "value": dict(labels={"k": "v" * (lim.max_label_value + 1)}),
        "models": dict(models=[pb.ModelEntry(model_id=f"m{i}") for i in range(lim.max_models + 1)]),
        "demand": dict(demand=[pb.DemandEntry(model_id=f"m{i}") for i in range(lim.max_demand + 1)]),
        "text": dict(name="n" * (lim.max_text + 1)),
    }
    for i, (what, fields) in enumerate(cases.items()):
        who = NodeIdentity.generate()
        a = pb.PeerAnnouncement(node_id=who.node_id, seq=1, issued_at_ms=int(NOW * 1000), mesh_id=MESH, **fields)
        assert g.offer(sign_announcement(who, MESH, a), NOW)[0] == Outcome.OVERSIZE, what
        assert g.get(who.node_id) is None
    assert g.counters["oversize"] == len(cases) and g.counters["sig_checks"] == 0


def test_the_table_is_bounded_and_a_connecting_peer_displaces_second_hand_junk():
    from mesh402.mesh.limits import MeshLimits

    g = GossipState(MESH, ME.node_id, stale_after=600, max_skew=300, limits=MeshLimits(max_origins=8))
    relay = IDS[0]
    sybils = [NodeIdentity.generate() for _ in range(12)]
    outcomes = [g.offer(ann(s, 1, at=NOW - 100 + i), NOW, via=relay.node_id)[0] for i, s in enumerate(sybils)]
    assert outcomes.count(Outcome.NEW) == 8 and outcomes.count(Outcome.TABLE_FULL) == 4
    newcomer = IDS[1]
    assert g.offer(ann(newcomer, 1), NOW, via=newcomer.node_id)[0] == Outcome.NEW
    assert len(g.entries) == 8 and g.get(sybils[0].node_id) is None  # the stalest second-hand one went
    assert g.counters["evicted"] == 1


def test_high_water_marks_are_pruned_once_a_replay_would_be_stale_anyway():
    from mesh402.mesh.limits import MeshLimits

    g = GossipState(MESH, ME.node_id, stale_after=600, max_skew=300, limits=MeshLimits(max_high_water=5))
    old = [NodeIdentity.generate() for _ in range(10)]
    for i, o in enumerate(old):
        g.offer(ann(o, 3, at=NOW - 50 + i), NOW)
        g.forget(o.node_id)
    assert len(g.high_water) == 10
    assert g.prune(NOW) == 5 and len(g.high_water) == 5  # the cap: the oldest go first
    assert g.offer(ann(old[-1], 3, at=NOW - 41), NOW)[0] == Outcome.REPLAYED  # still remembered
    assert g.prune(NOW + 700) == 5 and g.high_water == {}
    # what a replay of the forgotten origin would carry is stale by now
    assert g.offer(ann(old[-1], 3, at=NOW - 41), NOW + 700)[0] == Outcome.STALE


def test_gossip_packs_into_frames_under_the_control_limit():
    from mesh402.mesh.framing import CONTROL_MAX_FRAME, encode_frame, make_frame
    from mesh402.mesh.gossip_push import pack

    big = [sign_announcement(i, MESH, pb.PeerAnnouncement(node_id=i.node_id, seq=1, mesh_id=MESH,
                                                          labels={"x": "y" * 90_000}))
           for i in [NodeIdentity.generate() for _ in range(30)]]
    groups = pack(big)
    assert len(groups) > 1 and [sa for g in groups for sa in g] == big
    for group in groups:
        encode_frame(make_frame(gossip=pb.Gossip(sender_id=ME.node_id, announcements=group)), CONTROL_MAX_FRAME)
    assert pack([]) == [[]]
