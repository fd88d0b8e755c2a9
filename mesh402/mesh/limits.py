"""Every bound the mesh puts on what one peer may send or make it keep, in one frozen dataclass.

A member is not trusted: on an open mesh anyone is one. What it sends is typed and bounded here, at
the boundary, before anything is stored or relayed: one peer's bad data never breaks service for the
others. The numbers are set well above what an honest node of this software sends (the largest honest
label, a MoE expert plan of 128 experts x 48 layers with its gate usage, is ~70 KB) and far below
what would let one peer crowd out the rest (a gossip frame is 1 MiB).

:func:`announcement_problem` is the pure check of one announcement; the per-peer quotas are enforced
by mesh402.mesh.quota, the handshake limits by mesh402.mesh.admission.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from mesh402.mesh.proto import mesh_pb2 as pb

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class MeshLimits:
    # ---- one announcement (checked before its signature)
    max_announcement_bytes: int = 128 * KIB
    max_labels: int = 64
    max_label_key: int = 256
    max_label_value: int = 96 * KIB
    max_models: int = 64
    max_demand: int = 64
    max_rtts: int = 1024
    max_addrs: int = 16
    max_text: int = 256  # name, version, relay url, an address, a model id or hash
    # ---- gossip tables
    max_origins: int = 1024  # announcements held (members the node knows of)
    max_high_water: int = 4096  # remembered highest seqs of origins no longer held
    # ---- per peer, on the streams it opens here
    max_streams: int = 256  # open at once, all types (QUIC stream credit: the peer cannot exceed it)
    streams_per_s: float = 100.0  # new streams, sustained; beyond the burst the peer waits for credit
    stream_burst: int = 400
    frames_per_s: float = 200.0  # control traffic and anything not yet entitled (see quota.py)
    frame_burst: int = 1000
    bytes_per_s: float = 1 * MIB  # what any member may make the node read for ever: a flood costs CPU
    byte_burst: int = 16 * MIB  # a tunnelled request body (8 MiB at most) fits
    work_frames_per_s: float = 20_000.0  # stage/expert streams a handler entitled (an authorized session)
    work_frame_burst: int = 40_000
    work_bytes_per_s: float = 1024 * MIB
    work_byte_burst: int = 2048 * MIB
    abuse_refusals: int = 100  # frames refused within abuse_window: the connection is closed ...
    abuse_window: float = 10.0
    abuse_ban: float = 60.0  # ... and the peer refused for this long, its address marked as long
    rejoin_interval: float = 5.0  # from a marked address: at most one new connection this often
    # new identities with a burst to spend, from everywhere: a Sybil with many addresses gets no burst per
    # address; an identity beyond the pool starts with empty buckets and earns its burst at the sustained rates
    newcomer_burst: int = 16
    newcomers_per_s: float = 0.5
    # ---- handshakes (before admission)
    max_pending: int = 256  # handshakes in progress at once, from everyone
    max_pending_per_addr: int = 8  # from one IP address: a flood from one place blocks no one else

    @classmethod
    def unlimited(cls) -> "MeshLimits":
        """No per-peer quotas (benchmarks compare against it); announcement and table caps stay."""
        off = {f.name: 10**12 for f in fields(cls)
               if f.name.endswith(("_per_s", "_burst")) or f.name in ("abuse_refusals",)}
        return replace(cls(), **off)


def announcement_problem(ann: pb.PeerAnnouncement, size: int, lim: MeshLimits) -> Optional[str]:
    """Why ``ann`` (``size`` bytes serialized) breaks the limits, or None. Pure; no signature needed."""
    if size > lim.max_announcement_bytes:
        return f"announcement of {size} bytes (limit {lim.max_announcement_bytes})"
    for name, n, cap in (("labels", len(ann.labels), lim.max_labels), ("models", len(ann.models), lim.max_models),
                         ("demand entries", len(ann.demand), lim.max_demand), ("rtts", len(ann.rtts), lim.max_rtts),
                         ("addresses", len(ann.addrs), lim.max_addrs)):
        if n > cap:
            return f"{n} {name} (limit {cap})"
    for k, v in ann.labels.items():
        if len(k) > lim.max_label_key:
            return f"a label key of {len(k)} characters (limit {lim.max_label_key})"
        if len(v) > lim.max_label_value:
            return f"label {k[:40]!r} of {len(v)} characters (limit {lim.max_label_value})"
    texts = [ann.name, ann.version, ann.relay_url, ann.hardware.device_kind, ann.hardware.gpu_name, *ann.addrs,
             *(t for m in ann.models for t in (m.model_id, m.content_hash, m.architecture, m.quant)),
             *(d.model_id for d in ann.demand)]
    if any(len(t) > lim.max_text for t in texts):
        return f"a text field over {lim.max_text} characters"
    return None
