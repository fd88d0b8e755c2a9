"""The peer-to-peer mesh (mesh402.mesh): framing, gossip, invites, admission, liveness, the QUIC service,
and model-free node processes forming a mesh."""
