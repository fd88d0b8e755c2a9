"""The mesh layer: iroh QUIC transport, framing, identity, invites, gossip, liveness.

Never imports torch: hardware and model facts come in from the Node.
"""

from mesh402.mesh import iroh_fastcopy as _iroh_fastcopy  # noqa: F401  (patches iroh on import)

ALPN = b"mesh402/1"
