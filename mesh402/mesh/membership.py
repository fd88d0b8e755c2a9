"""What a node remembers about its mesh across restarts, under ``--home``.

- ``mesh.json``: mesh id, admission policy, the highest announcement seq
  used, the last known addresses of peers (to rejoin after a restart), and
  the mesh's spent or revoked invite nonces (mesh402.mesh.spent);
- ``mesh.secret``: the 32-byte mesh secret as hex, mode 0600, never printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from mesh402.mesh import spent
from mesh402.mesh.identity import ensure_home, write_private
from mesh402.mesh.invite import (
    POLICY_BY_NAME,
    POLICY_NAMES,
    new_mesh_id,
    new_mesh_secret,
)
from mesh402.mesh.proto import mesh_pb2 as pb

MESH_FILE = "mesh.json"
SECRET_FILE = "mesh.secret"
MAX_REMEMBERED_PEERS = 64


def load_revocation(v: object) -> spent.Revocation:
    """``[expiry, member hex, signature hex]``, or a bare expiry (files from before entries were signed:
    the announcer vouches for those itself)."""
    if isinstance(v, list) and len(v) == 3:
        return spent.Revocation(int(v[0]), bytes.fromhex(str(v[1])), bytes.fromhex(str(v[2])))
    return spent.Revocation(int(v))  # type: ignore[call-overload]


class Membership:
    def __init__(self, home: Path):
        self.home = ensure_home(home)
        self.mesh_id: Optional[str] = None
        self.policy: int = pb.ADMISSION_SECRET
        self.secret: Optional[bytes] = None
        self.seq: int = 0
        self.peers: dict[str, dict] = {}  # hex id -> {addrs, relay_url, last_seen}
        self.spent: dict[str, spent.Revocation] = {}  # invite nonce hex -> expiry and voucher (used or revoked)

    @classmethod
    def load(cls, home: Path) -> "Membership":
        m = cls(home)
        p = m.home / MESH_FILE
        if p.exists():
            try:
                d = json.loads(p.read_text())
                m.mesh_id = d.get("mesh_id") or None
                m.policy = POLICY_BY_NAME.get(d.get("policy", "secret"), pb.ADMISSION_SECRET)
                m.seq = int(d.get("seq", 0))
                m.peers = dict(d.get("peers", {}))
                m.spent = {str(k): load_revocation(v) for k, v in dict(d.get("spent", {})).items()}
            except (ValueError, OSError, TypeError):
                pass  # unreadable state: start afresh, the key (identity) is separate
        s = m.home / SECRET_FILE
        if s.exists():
            try:
                raw = bytes.fromhex(s.read_text().strip())
                m.secret = raw if len(raw) == 32 else None
            except ValueError:
                m.secret = None
        return m

    @property
    def is_member(self) -> bool:
        return bool(self.mesh_id) and (self.policy == pb.ADMISSION_OPEN or self.secret is not None)

    def member_of(self, mesh_id: str) -> bool:
        return self.mesh_id == mesh_id and self.is_member

    @property
    def policy_name(self) -> str:
        return POLICY_NAMES.get(self.policy, "secret")

    def create(self, policy: int, mesh_id: Optional[str] = None) -> None:
        self.mesh_id = mesh_id or new_mesh_id()
        self.policy = policy
        self.secret = new_mesh_secret() if policy == pb.ADMISSION_SECRET else None
        self.peers = {}
        self.spent = {}
        self.save()

    def adopt(self, mesh_id: str, policy: int, secret: Optional[bytes]) -> None:
        if mesh_id != self.mesh_id:
            self.peers = {}
            self.spent = {}
        self.mesh_id = mesh_id
        self.policy = policy
        self.secret = secret if policy == pb.ADMISSION_SECRET else None
        self.save()

    def next_seq(self, now: float) -> int:
        """Strictly increasing across restarts: max(last + 1, wall clock in µs)."""
        self.seq = max(self.seq + 1, int(now * 1_000_000))
        return self.seq

    def bump_seq(self, at_least: int) -> None:
        self.seq = max(self.seq, at_least)

    def remember_peer(self, node_id_hex: str, addrs: list[str], relay_url: str = "") -> None:
        self.peers[node_id_hex] = {"addrs": list(addrs), "relay_url": relay_url or "", "last_seen": time.time()}
        if len(self.peers) > MAX_REMEMBERED_PEERS:
            oldest = sorted(self.peers.items(), key=lambda kv: kv[1].get("last_seen", 0))
            for k, _ in oldest[: len(self.peers) - MAX_REMEMBERED_PEERS]:
                self.peers.pop(k, None)

    def save(self) -> None:
        d = {"mesh_id": self.mesh_id, "policy": self.policy_name, "seq": self.seq, "peers": self.peers,
             "spent": {n: [r.expires_at, r.by.hex(), r.sig.hex()] for n, r in self.spent.items()}}
        write_private(self.home / MESH_FILE, json.dumps(d, indent=1) + "\n")
        secret_path = self.home / SECRET_FILE
        if self.secret is not None:
            write_private(secret_path, self.secret.hex() + "\n")
        elif secret_path.exists():
            secret_path.unlink()
