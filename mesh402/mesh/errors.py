"""Errors the mesh raises to its callers; ``str()`` of each is one line for a person."""

from __future__ import annotations


class JoinError(Exception):
    """Joining failed; str() is one line for a person."""


class PeerUnavailable(Exception):
    """No live connection to the peer a caller named."""


class AdmissionRefused(JoinError):
    """The peer we dialled answered the handshake with a Reject."""

    def __init__(self, node_id: bytes, reason: str, code: str = ""):
        super().__init__(reason)
        self.node_id = node_id
        self.code = code
