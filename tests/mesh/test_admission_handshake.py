"""Property tests of the admission handshake (Admission.admit), no network:
arbitrary or mutated Hellos are refused with an InviteError and leave no trace."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from google.protobuf.message import DecodeError

from mesh402.mesh import invite
from mesh402.mesh.config import MeshConfig
from mesh402.mesh.gossip import sign_announcement
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.invite import InviteError
from mesh402.mesh.framing import PROTOCOL_VERSION
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.service import MeshService

PROPS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    s = MeshService(MeshConfig(home=tmp_path_factory.mktemp("hs"), bind_ip="127.0.0.1"))
    s.membership.create(pb.ADMISSION_SECRET)
    s._init_gossip(s.membership.mesh_id)
    return s


JOINER = NodeIdentity.generate()


def valid_hello(node: MeshService, kind: str, seq: int) -> pb.Hello:
    mesh_id = node.mesh_id
    ann = pb.PeerAnnouncement(node_id=JOINER.node_id, seq=seq, issued_at_ms=int(time.time() * 1000), mesh_id=mesh_id)
    h = pb.Hello(mesh_id=mesh_id, announcement=sign_announcement(JOINER, mesh_id, ann), protocol_version=PROTOCOL_VERSION)
    if kind == "invite":
        cred = invite.make_credential(node.membership.secret, mesh_id, node.node_id, int(time.time()) + 3600, pb.ADMISSION_SECRET)
        h.invite.CopyFrom(cred)
        h.want_secret = True
    else:
        h.member_proof = invite.member_proof(node.membership.secret, mesh_id, JOINER.node_id, node.node_id)
    return h


def admitted(node: MeshService, hello: pb.Hello, remote: bytes = JOINER.node_id):
    before = set(node.gossip.entries)
    try:
        ann, welcome, _ = node.admission.admit(remote, hello)
    except InviteError as e:
        assert str(e) and "\n" not in str(e) and e.code
        assert set(node.gossip.entries) == before  # a refused Hello stores nothing
        return None
    return welcome


def test_valid_hellos_are_admitted(node):
    w = admitted(node, valid_hello(node, "invite", 10))
    assert w is not None and w.mesh_secret == node.membership.secret
    w = admitted(node, valid_hello(node, "member", 11))
    assert w is not None and w.mesh_secret == b""  # members already hold the secret
    assert w.member_proof == invite.member_ack(node.membership.secret, node.mesh_id, node.node_id, JOINER.node_id)
    # the same Hello from another QUIC identity is a forgery
    assert admitted(node, valid_hello(node, "member", 12), remote=b"\x05" * 32) is None
    # an older announcement from the origin itself (QUIC-authenticated) is admitted,
    # but the newer one stays stored
    assert admitted(node, valid_hello(node, "member", 5)) is not None
    assert node.gossip.get(JOINER.node_id).seq == 11


@PROPS
@given(st.binary(max_size=600))
def test_arbitrary_hello_bytes(node, data):
    try:
        hello = pb.Hello.FromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return
    assert admitted(node, hello) is None


@PROPS
@given(st.sampled_from(["invite", "member"]), st.integers(0, 10_000), st.integers(1, 255))
def test_mutated_hellos_only_admitted_if_signed_parts_intact(node, kind, pos, delta):
    seq = int(time.time() * 1e6)
    hello = valid_hello(node, kind, seq)
    raw = bytearray(hello.SerializeToString())
    pos %= len(raw)
    raw[pos] = (raw[pos] + delta) % 256
    try:
        mutated = pb.Hello.FromString(bytes(raw))
    except (DecodeError, RuntimeError, ValueError):
        return
    w = admitted(node, mutated)
    if w is not None:
        # admission implies the announcement, mesh id and proof are the genuine ones
        assert mutated.announcement == hello.announcement
        assert mutated.mesh_id == hello.mesh_id
        assert mutated.WhichOneof("proof") == hello.WhichOneof("proof")
        if kind == "member":
            assert mutated.member_proof == hello.member_proof
        else:
            assert mutated.invite.mac == hello.invite.mac and mutated.invite.expires_at == hello.invite.expires_at
