"""Placement: pure functions from a typed snapshot of the mesh to where each model runs.

No sockets, no torch, no clocks: see README.md in this folder for the rules and formulas.
"""

from mesh402.placement.capacity import (
    fits,
    kv_bytes_per_token,
    kv_tokens,
    max_vram_bytes,
    node_capacity,
    request_kv_budget,
    stage_bytes,
    usable_bytes,
)
from mesh402.placement.election import elect_host, host_ranking
from mesh402.placement.experts import expert_shares, plan_experts
from mesh402.placement.pipeline import (
    DEFAULT_MAX_SPLIT_RTT_MS,
    CostModel,
    SearchLimits,
    assign_layers,
    estimate_token_latency_ms,
    plan_model,
    replan,
    split_peers,
)
from mesh402.placement.plans import (
    Accepted,
    PlanBook,
    RefusalReason,
    Refused,
    SessionPin,
    next_epoch,
)
from mesh402.placement.types import (
    ExpertId,
    ExpertLayout,
    ExpertPlan,
    ExpertShard,
    MeshSnapshot,
    ModelKey,
    ModelLayout,
    NodeId,
    NodeSnapshot,
    Plan,
    PlanLike,
    StageAssignment,
    WaitingForCapacity,
    make_model_key,
)

__all__ = [
    "DEFAULT_MAX_SPLIT_RTT_MS",
    "Accepted",
    "CostModel",
    "ExpertId",
    "ExpertLayout",
    "ExpertPlan",
    "ExpertShard",
    "MeshSnapshot",
    "ModelKey",
    "ModelLayout",
    "NodeId",
    "NodeSnapshot",
    "Plan",
    "PlanBook",
    "PlanLike",
    "Refused",
    "RefusalReason",
    "SearchLimits",
    "SessionPin",
    "StageAssignment",
    "WaitingForCapacity",
    "assign_layers",
    "elect_host",
    "estimate_token_latency_ms",
    "expert_shares",
    "fits",
    "host_ranking",
    "kv_bytes_per_token",
    "kv_tokens",
    "make_model_key",
    "max_vram_bytes",
    "next_epoch",
    "node_capacity",
    "plan_experts",
    "plan_model",
    "replan",
    "request_kv_budget",
    "split_peers",
    "stage_bytes",
    "usable_bytes",
]
