"""Plain-dict views of protobuf messages for the management API and the CLI."""

from __future__ import annotations

from mesh402.mesh.proto import mesh_pb2 as pb

ROLE_NAMES = {
    pb.MODEL_ROLE_UNSPECIFIED: "unspecified",
    pb.MODEL_ROLE_ON_DISK: "on_disk",
    pb.MODEL_ROLE_HOST: "host",
    pb.MODEL_ROLE_STAGE: "stage",
    pb.MODEL_ROLE_STANDBY: "standby",
}
ROLE_BY_NAME = {v: k for k, v in ROLE_NAMES.items()}
KIND_NAMES = {pb.NODE_KIND_UNSPECIFIED: "unspecified", pb.NODE_KIND_SERVING: "serving", pb.NODE_KIND_CLIENT: "client"}


def hardware_to_dict(h: pb.Hardware) -> dict:
    return {
        "device_kind": h.device_kind,
        "vram_bytes": h.vram_bytes,
        "ram_bytes": h.ram_bytes,
        "mem_bandwidth_gbps": round(h.mem_bandwidth_gbps, 3),
        "compute_tflops": round(h.compute_tflops, 3),
        "gpu_name": h.gpu_name,
        "gpu_count": h.gpu_count,
        "cpu_cores": h.cpu_cores,
    }


def model_to_dict(m: pb.ModelEntry) -> dict:
    d = {
        "model_id": m.model_id,
        "content_hash": m.content_hash,
        "role": ROLE_NAMES.get(m.role, str(m.role)),
        "n_layers": m.n_layers,
        "size_bytes": m.size_bytes,
        "architecture": m.architecture,
        "context_length": m.context_length,
        "quant": m.quant,
        "ready": m.ready,
        "moe": {"is_moe": m.moe.is_moe, "expert_count": m.moe.expert_count, "experts_used": m.moe.experts_used},
    }
    if m.role == pb.MODEL_ROLE_STAGE or m.layer_end:
        d["layers"] = [m.layer_start, m.layer_end]
    if m.plan_epoch:
        d["plan_epoch"] = m.plan_epoch
    return d


def announcement_to_dict(a: pb.PeerAnnouncement) -> dict:
    return {
        "node_id": a.node_id.hex(),
        "seq": a.seq,
        "issued_at_ms": a.issued_at_ms,
        "boot_id": a.boot_id,
        "kind": KIND_NAMES.get(a.kind, str(a.kind)),
        "name": a.name,
        "version": a.version,
        "api_port": a.api_port,
        "console_port": a.console_port,
        "addrs": list(a.addrs),
        "relay_url": a.relay_url or None,
        "hardware": hardware_to_dict(a.hardware),
        "models": [model_to_dict(m) for m in a.models],
        "demand": [
            {"model_id": d.model_id, "last_active_ms": d.last_active_ms, "request_count": d.request_count}
            for d in a.demand
        ],
        "rtts": {r.node_id.hex(): round(r.rtt_ms, 3) for r in a.rtts},
        "protocol_gen": a.protocol_gen,
        "leaving": a.leaving,
        "labels": dict(a.labels),
    }
