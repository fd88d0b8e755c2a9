"""Invite tokens and admission credentials: round trip, and every bad token gives a clear one-line error."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings, strategies as st

from mesh402.mesh import invite
from mesh402.mesh.invite import InviteError
from mesh402.mesh.proto import mesh_pb2 as pb

NOW = 1_700_000_000.0
SECRET = b"S" * 32
MESH = "ab" * 16
ISSUER = b"\x07" * 32


def mint(**over):
    kw = dict(mesh_id=MESH, secret=SECRET, policy=pb.ADMISSION_SECRET, node_id=ISSUER, addrs=["127.0.0.1:4000"], expires_in=3600, now=NOW)
    kw.update(over)
    return invite.mint_token(**kw)


def reencode(tok: pb.InviteToken) -> str:
    """An attacker who edits the fields and recomputes the checksum."""
    return invite.encode_token(tok)


def test_round_trip_and_verify():
    text = mint()
    assert text.startswith("m402")
    tok = invite.decode_token(text)
    assert tok.mesh_id == MESH and tok.node_id == ISSUER and list(tok.addrs) == ["127.0.0.1:4000"]
    invite.verify_credential(tok.credential, mesh_id=MESH, secret=SECRET, policy=pb.ADMISSION_SECRET, now=NOW + 10)
    # whitespace from copy/paste is tolerated
    invite.decode_token(text[:20] + "\n  " + text[20:])


def test_any_member_can_verify_any_members_token():
    other_member = b"\x09" * 32
    text = mint(node_id=other_member)
    tok = invite.decode_token(text)
    invite.verify_credential(tok.credential, mesh_id=MESH, secret=SECRET, policy=pb.ADMISSION_SECRET, now=NOW)


def one_line(e: Exception) -> str:
    s = str(e)
    assert s and "\n" not in s
    return s


def test_expired():
    tok = invite.decode_token(mint(expires_in=60))
    with pytest.raises(InviteError) as ei:
        invite.verify_credential(tok.credential, mesh_id=MESH, secret=SECRET, policy=pb.ADMISSION_SECRET, now=NOW + 3600)
    assert ei.value.code == "expired" and "expired" in one_line(ei.value)
    with pytest.raises(InviteError):
        invite.check_expiry(tok.credential, NOW + 61)


def test_edited_expiry_fails_mac():
    tok = invite.decode_token(mint(expires_in=60))
    tok.credential.expires_at += 86400
    edited = invite.decode_token(reencode(tok))
    with pytest.raises(InviteError) as ei:
        invite.verify_credential(edited.credential, mesh_id=MESH, secret=SECRET, policy=pb.ADMISSION_SECRET, now=NOW)
    assert ei.value.code == "bad_credential"
    one_line(ei.value)


@pytest.mark.parametrize("field", ["mesh_id", "issuer", "nonce"])
def test_edited_fields_fail_mac(field):
    tok = invite.decode_token(mint())
    mesh = MESH
    if field == "mesh_id":
        tok.mesh_id = mesh = "cd" * 16
    elif field == "issuer":
        tok.credential.issuer = b"\x08" * 32
    else:
        tok.credential.nonce = b"\x00" * 16
    with pytest.raises(InviteError) as ei:
        invite.verify_credential(invite.decode_token(reencode(tok)).credential, mesh_id=mesh, secret=SECRET, policy=pb.ADMISSION_SECRET, now=NOW)
    assert ei.value.code == "bad_credential"


def test_wrong_secret():
    tok = invite.decode_token(mint(secret=b"W" * 32))
    with pytest.raises(InviteError) as ei:
        invite.verify_credential(tok.credential, mesh_id=MESH, secret=SECRET, policy=pb.ADMISSION_SECRET, now=NOW)
    assert ei.value.code == "bad_credential"


def test_open_policy_needs_no_mac():
    text = mint(secret=None, policy=pb.ADMISSION_OPEN)
    tok = invite.decode_token(text)
    assert tok.credential.mac == b""
    invite.verify_credential(tok.credential, mesh_id=MESH, secret=None, policy=pb.ADMISSION_OPEN, now=NOW)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "empty"),
        ("hello", "should start with 'm402'"),
        ("m402!!!", "base64url"),
        ("m402AAAAAAAAAA", "checksum"),
        ("m402AAAA", "truncated"),
        ("m402", "garbled"),
    ],
)
def test_garbled(text, needle):
    with pytest.raises(InviteError) as ei:
        invite.decode_token(text)
    assert needle in one_line(ei.value)


def test_flipped_character_is_caught_by_checksum():
    text = mint()
    i = len(text) // 2
    flipped = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]
    with pytest.raises(InviteError) as ei:
        invite.decode_token(flipped)
    assert "checksum" in str(ei.value) or "garbled" in str(ei.value)


def test_truncated_token():
    text = mint()
    with pytest.raises(InviteError):
        invite.decode_token(text[: len(text) - 5])


def test_checksummed_garbage_payload():
    payload = b"\xff\xff\xff\xff"
    raw = payload + hashlib.sha256(payload).digest()[:4]
    text = "m402" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    with pytest.raises(InviteError) as ei:
        invite.decode_token(text)
    one_line(ei.value)


def test_member_proofs_are_bound_to_both_ids():
    a, b, c = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    p = invite.member_proof(SECRET, MESH, a, b)
    invite.check_member_proof(p, SECRET, MESH, a, b)
    for args in ((SECRET, MESH, a, c), (SECRET, MESH, b, a), (b"X" * 32, MESH, a, b), (SECRET, "other", a, b)):
        with pytest.raises(InviteError):
            invite.check_member_proof(p, *args)
    assert invite.member_ack(SECRET, MESH, b, a) != p


def test_parse_duration():
    assert invite.parse_duration("1h") == 3600
    assert invite.parse_duration("1h30m") == 5400
    assert invite.parse_duration("90") == 90
    assert invite.parse_duration("2d") == 172800
    for bad in ("", "h", "1x", "-1h", "1h junk"):
        with pytest.raises(ValueError):
            invite.parse_duration(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_invite_error_or_token(text):
    try:
        invite.decode_token(text)
    except InviteError as e:
        one_line(e)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 255))
def test_byte_edits_never_verify(pos, delta):
    """Any single-byte edit of the decoded token is caught (checksum, decode, or MAC)."""
    text = mint()
    body = text[4:]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    pos %= len(raw)
    raw[pos] = (raw[pos] + delta) % 256
    edited = "m402" + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(InviteError):
        tok = invite.decode_token(edited)
        invite.verify_credential(tok.credential, mesh_id=tok.mesh_id, secret=SECRET, policy=pb.ADMISSION_SECRET, now=NOW)


def test_single_use_flag_is_under_the_mac():
    tok = invite.decode_token(mint(single_use=True))
    assert tok.credential.single_use
    invite.verify_credential(tok.credential, mesh_id=MESH, secret=SECRET, policy=pb.ADMISSION_SECRET, now=NOW)
    tok.credential.single_use = False
    with pytest.raises(InviteError, match="credential check failed"):
        invite.verify_credential(tok.credential, mesh_id=MESH, secret=SECRET, policy=pb.ADMISSION_SECRET, now=NOW)
    # a reusable token's MAC is the same as before single-use tokens existed
    plain = invite.decode_token(mint()).credential
    assert plain.mac == invite.credential_mac(SECRET, MESH, ISSUER, plain.expires_at, plain.nonce, pb.ADMISSION_SECRET)
    with pytest.raises(InviteError, match="private mesh"):
        mint(policy=pb.ADMISSION_OPEN, secret=None, single_use=True)


def test_spent_set_encodes_merges_prunes_and_ignores_junk():
    from mesh402.mesh import spent
    from mesh402.mesh.identity import NodeIdentity, verify

    me, other = NodeIdentity.generate(), NodeIdentity.generate()

    def v(ident: NodeIdentity, n: str, e: int) -> spent.Revocation:
        return spent.vouch(ident.sign, ident.node_id, MESH, n, e)

    a, b, c = "a" * 32, "b" * 32, "c" * 32
    s = {a: v(me, a, 100), b: v(me, b, 200)}
    assert spent.decode(spent.encode(s)) == s
    good_c = spent.encode({c: v(me, c, 300)})
    assert spent.decode(f"zz:1,{a}:x,{good_c},,{b}") == {c: v(me, c, 300)}
    assert spent.merge(s, {c: v(me, c, 300), a: v(me, a, 50)}, 150, MESH, verify) == (True, 0)  # a expired: pruned
    assert set(s) == {b, c}
    assert spent.merge(s, {b: v(other, b, 900)}, 150, MESH, verify) == (False, 0)  # already spent
    forged = spent.Revocation(500, other.node_id, me.sign(spent.payload(MESH, "d" * 32, 500)))
    assert spent.merge(s, {"d" * 32: forged}, 150, MESH, verify) == (False, 1)  # vouched for by someone else's key
    assert spent.merge(s, {"e" * 32: v(me, "e" * 32, 500)}, 150, "other-mesh", verify) == (False, 1)


def test_one_member_cannot_evict_the_others_revocations():
    from mesh402.mesh import spent
    from mesh402.mesh.identity import NodeIdentity, verify

    honest, evil = NodeIdentity.generate(), NodeIdentity.generate()
    t: dict[str, spent.Revocation] = {}
    mine = {f"{i:032x}": spent.vouch(honest.sign, honest.node_id, MESH, f"{i:032x}", 1000 + i) for i in range(10)}
    spent.merge(t, mine, 0, MESH, verify)
    junk = {f"{i:032x}": spent.vouch(evil.sign, evil.node_id, MESH, f"{i:032x}", 10**9 + i)
            for i in range(100, 100 + 4 * spent.MAX_SPENT)}  # far-off expiries: the old rule kept these first
    spent.merge(t, junk, 0, MESH, verify)
    assert set(mine) <= set(t)  # every honest revocation stays
    assert sum(r.by == evil.node_id for r in t.values()) == spent.MAX_PER_MEMBER
    many = [NodeIdentity.generate() for _ in range(6)]
    for k, m in enumerate(many):  # the whole set stays bounded; the biggest voucher gives way first
        spent.merge(t, {f"{k:08x}{i:024x}": spent.vouch(m.sign, m.node_id, MESH, f"{k:08x}{i:024x}", 5000 + i)
                        for i in range(spent.MAX_PER_MEMBER)}, 0, MESH, verify)
    assert len(t) == spent.MAX_SPENT and set(mine) <= set(t)
