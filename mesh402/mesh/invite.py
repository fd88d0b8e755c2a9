"""Invite tokens and admission credentials.

Token text: ``"m402" + base64url_nopad(InviteToken ‖ sha256(InviteToken)[:4])``.
It carries the issuing node's id and addresses, the mesh id, the admission
policy and a credential.

Admission (policy SECRET): every member holds the 32-byte mesh secret. A
credential is ``HMAC-SHA256(secret, "mesh402-invite-v1\\0" ‖ mesh_id ‖ issuer ‖
expires_at ‖ nonce ‖ policy)``, so any member, not only the issuer, can check
any member's token. Editing the expiry, mesh id, issuer or nonce breaks the
MAC; flipping bytes breaks the checksum first. Once admitted, a node receives
the mesh secret over the authenticated QUIC connection and later proves
membership to other members with :func:`member_proof`, bound to both QUIC
identities so it cannot be replayed to a third node.

A single-use token (``mesh402 invite --single-use``; the flag is under the
MAC) is accepted only by the member that minted it, which then marks it spent;
spent and revoked tokens are gossiped mesh-wide (:mod:`mesh402.mesh.spent`).

Policy OPEN: no credential is needed (public meshes).

Every error raised here is an :class:`InviteError` with a one-line message
meant for a person.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
import time
from typing import Optional

from google.protobuf.message import DecodeError

from mesh402.mesh.proto import mesh_pb2 as pb

TOKEN_PREFIX = "m402"
TOKEN_VERSION = 1
CHECKSUM_LEN = 4
NONCE_LEN = 16
SECRET_LEN = 32
MAC_LEN = 32
# Tokens whose clock is this far in the future of the verifier are still
# checked for MAC but an expiry can never be more than this far ahead.
MAX_TOKEN_LIFETIME_S = 366 * 24 * 3600

POLICY_NAMES = {pb.ADMISSION_SECRET: "secret", pb.ADMISSION_OPEN: "open"}
POLICY_BY_NAME = {v: k for k, v in POLICY_NAMES.items()}


class InviteError(Exception):
    """A token or credential problem; str() is one line for a person; ``code`` for counters."""

    def __init__(self, message: str, code: str = "bad_token"):
        super().__init__(message)
        self.code = code


def new_mesh_id() -> str:
    return os.urandom(16).hex()


def new_mesh_secret() -> bytes:
    return os.urandom(SECRET_LEN)


_DUR = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '1h30m', '2d', or a bare number of seconds."""
    t = text.strip().lower().replace(" ", "")
    if not t:
        raise ValueError("empty duration")
    try:
        return float(t)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for m in _DUR.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(t) or total <= 0:
        raise ValueError(f"cannot parse duration {text!r} (try 30m, 1h, 2d)")
    return total


def _mac_message(mesh_id: str, issuer: bytes, expires_at: int, nonce: bytes, policy: int,
                 single_use: bool = False) -> bytes:
    msg = (
        b"mesh402-invite-v1\0"
        + mesh_id.encode()
        + b"\0"
        + bytes(issuer)
        + struct.pack(">QB", int(expires_at), int(policy) & 0xFF)
        + bytes(nonce)
    )
    return msg + b"\0single-use" if single_use else msg  # reusable tokens keep their MAC


def credential_mac(secret: bytes, mesh_id: str, issuer: bytes, expires_at: int, nonce: bytes, policy: int,
                   single_use: bool = False) -> bytes:
    return hmac.new(secret, _mac_message(mesh_id, issuer, expires_at, nonce, policy, single_use),
                    hashlib.sha256).digest()


def make_credential(
    secret: Optional[bytes], mesh_id: str, issuer: bytes, expires_at: int, policy: int, single_use: bool = False
) -> pb.InviteCredential:
    nonce = os.urandom(NONCE_LEN)
    mac = b""
    if policy == pb.ADMISSION_SECRET:
        if not secret:
            raise InviteError("this node has no mesh secret; cannot mint a secret-policy invite", "no_secret")
        mac = credential_mac(secret, mesh_id, issuer, expires_at, nonce, policy, single_use)
    elif single_use:
        raise InviteError("an open mesh admits anyone: single-use invites need a private mesh", "open_mesh")
    return pb.InviteCredential(expires_at=int(expires_at), nonce=nonce, mac=mac, issuer=bytes(issuer),
                               single_use=single_use)


def mint_token(
    *,
    mesh_id: str,
    secret: Optional[bytes],
    policy: int,
    node_id: bytes,
    addrs: list[str],
    relay_url: str = "",
    expires_in: float = 24 * 3600,
    now: Optional[float] = None,
    single_use: bool = False,
) -> str:
    now = time.time() if now is None else now
    expires_at = int(now + expires_in)
    tok = pb.InviteToken(
        version=TOKEN_VERSION,
        mesh_id=mesh_id,
        node_id=bytes(node_id),
        addrs=list(addrs),
        relay_url=relay_url or "",
        policy=policy,
        credential=make_credential(secret, mesh_id, node_id, expires_at, policy, single_use),
    )
    return encode_token(tok)


def encode_token(tok: pb.InviteToken) -> str:
    raw = tok.SerializeToString()
    raw += hashlib.sha256(raw).digest()[:CHECKSUM_LEN]
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_token(text: str) -> pb.InviteToken:
    """Parse and integrity-check a token's structure. Does not check expiry or MAC."""
    if not isinstance(text, str):
        raise InviteError("invite token must be text")
    t = "".join(text.split())  # tolerate line wraps from copy/paste
    if not t:
        raise InviteError("invite token is empty")
    if not t.startswith(TOKEN_PREFIX):
        raise InviteError(f"not a mesh402 invite token (it should start with '{TOKEN_PREFIX}')", "garbled")
    body = t[len(TOKEN_PREFIX):]
    if not re.fullmatch(r"[A-Za-z0-9_-]+", body or "!"):
        raise InviteError("invite token is garbled (characters outside base64url)", "garbled")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise InviteError("invite token is garbled (not valid base64url)", "garbled") from None
    if len(raw) <= CHECKSUM_LEN:
        raise InviteError("invite token is truncated", "garbled")
    payload, check = raw[:-CHECKSUM_LEN], raw[-CHECKSUM_LEN:]
    if hashlib.sha256(payload).digest()[:CHECKSUM_LEN] != check:
        raise InviteError("invite token is corrupted or was edited (checksum mismatch); copy it again", "garbled")
    tok = pb.InviteToken()
    try:
        tok.ParseFromString(payload)
    except (DecodeError, RuntimeError, ValueError):
        raise InviteError("invite token is unreadable (bad encoding)", "garbled") from None
    if tok.version != TOKEN_VERSION:
        raise InviteError(f"unsupported invite token version {tok.version} (this node speaks {TOKEN_VERSION})", "version")
    if len(tok.node_id) != 32:
        raise InviteError("invite token has no valid node id", "garbled")
    if not tok.mesh_id:
        raise InviteError("invite token has no mesh id", "garbled")
    if not tok.addrs and not tok.relay_url:
        raise InviteError("invite token carries no address to dial", "garbled")
    if tok.policy not in POLICY_NAMES:
        raise InviteError("invite token names an unknown admission policy", "garbled")
    if tok.policy == pb.ADMISSION_SECRET and len(tok.credential.mac) != MAC_LEN:
        raise InviteError("invite token has no admission credential", "garbled")
    return tok


def check_expiry(cred: pb.InviteCredential, now: Optional[float] = None) -> None:
    now = time.time() if now is None else now
    if cred.expires_at <= now:
        ago = _human(now - cred.expires_at)
        raise InviteError(
            f"invite token expired {ago} ago; ask a member for a new one (mesh402 invite)", "expired"
        )
    if cred.expires_at > now + MAX_TOKEN_LIFETIME_S:
        raise InviteError("invite token expiry is implausibly far in the future", "bad_credential")


def verify_credential(
    cred: pb.InviteCredential, *, mesh_id: str, secret: Optional[bytes], policy: int, now: Optional[float] = None
) -> None:
    """Admitting side: raise InviteError unless ``cred`` admits to this mesh."""
    if policy == pb.ADMISSION_OPEN:
        return
    check_mac(cred, mesh_id=mesh_id, secret=secret)
    check_expiry(cred, now)


def check_mac(cred: pb.InviteCredential, *, mesh_id: str, secret: Optional[bytes]) -> None:
    """Raise InviteError unless this mesh's secret minted ``cred`` (expiry not checked)."""
    if not secret:
        raise InviteError("this node cannot verify invites (no mesh secret)", "no_secret")
    if len(cred.nonce) != NONCE_LEN or len(cred.mac) != MAC_LEN or len(cred.issuer) != 32:
        raise InviteError("admission credential is malformed", "bad_credential")
    expected = credential_mac(secret, mesh_id, cred.issuer, cred.expires_at, cred.nonce, pb.ADMISSION_SECRET,
                              cred.single_use)
    if not hmac.compare_digest(expected, cred.mac):
        raise InviteError(
            "invite was not issued by this mesh or was edited (credential check failed)", "bad_credential"
        )


def member_proof(secret: bytes, mesh_id: str, dialer: bytes, acceptor: bytes) -> bytes:
    msg = b"mesh402-member-v1\0" + mesh_id.encode() + b"\0" + bytes(dialer) + bytes(acceptor)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def member_ack(secret: bytes, mesh_id: str, acceptor: bytes, dialer: bytes) -> bytes:
    msg = b"mesh402-member-ack-v1\0" + mesh_id.encode() + b"\0" + bytes(acceptor) + bytes(dialer)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def check_member_proof(proof: bytes, secret: Optional[bytes], mesh_id: str, dialer: bytes, acceptor: bytes) -> None:
    if not secret:
        raise InviteError("this node has no mesh secret", "no_secret")
    if not hmac.compare_digest(member_proof(secret, mesh_id, dialer, acceptor), bytes(proof)):
        raise InviteError("membership proof failed (not a member of this mesh)", "bad_member_proof")


def describe_token(tok: pb.InviteToken, now: Optional[float] = None) -> dict:
    now = time.time() if now is None else now
    return {
        "mesh_id": tok.mesh_id,
        "node_id": tok.node_id.hex(),
        "addrs": list(tok.addrs),
        "relay_url": tok.relay_url or None,
        "policy": POLICY_NAMES.get(tok.policy, "unknown"),
        "expires_at": tok.credential.expires_at,
        "expires_in_s": int(tok.credential.expires_at - now),
        "issuer": tok.credential.issuer.hex(),
        "single_use": tok.credential.single_use,
    }


def _human(seconds: float) -> str:
    s = int(abs(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"
