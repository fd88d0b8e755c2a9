"""Node identity: an Ed25519 key kept in ``--home``; node id = public key.

The key file ``<home>/node.key`` holds the 32-byte secret as hex, mode 0600.
The same home gives the same node id across restarts. Signing and
verification use iroh's own Ed25519 (``SecretKey.sign`` /
``EndpointId.verify``), the same key that authenticates QUIC connections.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from iroh import EndpointId, SecretKey, Signature

from mesh402.home import write_private
from mesh402.mesh import iroh_fastcopy  # noqa: F401

KEY_FILE = "node.key"
NODE_ID_LEN = 32
SIGNATURE_LEN = 64


class IdentityError(Exception):
    pass


def ensure_home(home: Path) -> Path:
    home = Path(home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(home, 0o700)
    except OSError:
        pass
    return home



class NodeIdentity:
    def __init__(self, secret_key: SecretKey):
        self.secret_key = secret_key
        self._public = secret_key.public()
        self.node_id: bytes = self._public.to_bytes()
        self.node_id_hex: str = self.node_id.hex()

    @classmethod
    def generate(cls) -> "NodeIdentity":
        return cls(SecretKey.generate())

    @classmethod
    def load_or_create(cls, home: Path) -> "NodeIdentity":
        home = ensure_home(home)
        path = home / KEY_FILE
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(path, 0o600)
            text = path.read_text().strip()
            try:
                raw = bytes.fromhex(text)
                if len(raw) != 32:
                    raise ValueError("wrong length")
                return cls(SecretKey.from_bytes(raw))
            except Exception as e:
                raise IdentityError(f"{path} is not a valid node key ({e})") from None
        ident = cls.generate()
        write_private(path, ident.secret_key.to_bytes().hex() + "\n")
        return ident

    def secret_bytes(self) -> bytes:
        return self.secret_key.to_bytes()

    def sign(self, message: bytes) -> bytes:
        return self.secret_key.sign(message).to_bytes()

    @property
    def short(self) -> str:
        return self.node_id_hex[:10]


def verify(node_id: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is node_id's Ed25519 signature of ``message``."""
    if len(node_id) != NODE_ID_LEN or len(signature) != SIGNATURE_LEN:
        return False
    try:
        EndpointId.from_bytes(bytes(node_id)).verify(bytes(message), Signature.from_bytes(bytes(signature)))
        return True
    except Exception:
        return False


def endpoint_id(node_id: bytes) -> EndpointId:
    return EndpointId.from_bytes(bytes(node_id))


def short_id(node_id: bytes | str, n: int = 10) -> str:
    h = node_id if isinstance(node_id, str) else node_id.hex()
    return h[:n]


def parse_node_id(text: str) -> Optional[bytes]:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if len(raw) == NODE_ID_LEN else None
