"""Typed, immutable inputs and outputs of the placement functions.

Inputs: :class:`NodeSnapshot` (what gossip says about one node), :class:`MeshSnapshot` (all of
them, in a canonical order), :class:`ModelLayout` (exact byte sizes from a GGUF tensor table).
Outputs: :class:`Plan` (solo or pipeline), :class:`ExpertPlan` (MoE expert split), or
:class:`WaitingForCapacity`.

Nothing here does I/O except :meth:`ModelLayout.from_gguf_meta`, which only reads an already
parsed :class:`~mesh402.models.gguf_meta.GGUFMeta`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from mesh402.placement.capacity import shared_machine_capacities, stage_bytes

if TYPE_CHECKING:
    from mesh402.models.gguf_meta import GGUFMeta

__all__ = [
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
    "PlanLike",
    "StageAssignment",
    "WaitingForCapacity",
    "make_model_key",
]

NodeId = str
ModelKey = str  # "<model id>@<content hash>": two files with one name are different models
ExpertId = tuple[int, int]  # (layer, expert index within that layer)


def make_model_key(model_id: str, content_hash: str) -> ModelKey:
    """The key placement uses for a model: its id plus the hash of the file's content."""
    if not model_id or not content_hash:
        raise ValueError("model_id and content_hash must be non-empty")
    if "@" in model_id:
        raise ValueError(f"model id {model_id!r} must not contain '@'")
    return f"{model_id}@{content_hash}"


def _check_nonneg_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_speed(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")


# ---------------------------------------------------------------------------
# nodes and the mesh


@dataclass(frozen=True)
class NodeSnapshot:
    """One node as gossip describes it. Every node must build the same snapshot from the same gossip.

    ``capacity_bytes`` is the weight budget from :func:`~mesh402.placement.capacity.node_capacity`.
    ``rtt_ms`` holds this node's measured round-trip times to other nodes (missing = unknown).
    Speeds are in GB of weights per second, so that stage times come out in milliseconds:
    ``compute_score`` is measured (bytes of weights the node streams through its matmuls per second,
    e.g. ``model_bytes x decode tok/s / 1e9``); ``mem_bandwidth`` is the hardware figure, used when
    nothing was measured. ``machine_id``/``machine_bytes`` (optional) name the physical machine and
    its detected usable memory, so that nodes sharing a machine cannot claim it twice (see
    :func:`~mesh402.placement.capacity.shared_machine_capacities`).
    """

    node_id: NodeId
    capacity_bytes: int
    rtt_ms: Mapping[NodeId, float] = field(default_factory=dict, hash=False)
    compute_score: float | None = None
    mem_bandwidth: float | None = None
    models_on_disk: frozenset[ModelKey] = frozenset()
    is_client: bool = False
    machine_id: str | None = None
    machine_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must be non-empty")
        _check_nonneg_int("capacity_bytes", self.capacity_bytes)
        if self.machine_bytes is not None:
            _check_nonneg_int("machine_bytes", self.machine_bytes)
        _check_speed("compute_score", self.compute_score)
        _check_speed("mem_bandwidth", self.mem_bandwidth)
        rtts: dict[NodeId, float] = {}
        for peer, ms in dict(self.rtt_ms).items():
            ms = float(ms)
            if not (math.isfinite(ms) and ms >= 0):
                raise ValueError(f"rtt to {peer} must be finite and >= 0, got {ms!r}")
            if peer != self.node_id:
                rtts[peer] = ms
        object.__setattr__(self, "rtt_ms", rtts)
        object.__setattr__(self, "models_on_disk", frozenset(self.models_on_disk))

    @property
    def speed_gbps(self) -> float | None:
        """Measured speed if known, else the hardware memory bandwidth, else None."""
        return self.compute_score if self.compute_score is not None else self.mem_bandwidth

    @property
    def can_serve(self) -> bool:
        return not self.is_client and self.capacity_bytes > 0


@dataclass(frozen=True)
class MeshSnapshot:
    """All nodes, sorted by id: the input order never changes any result."""

    nodes: tuple[NodeSnapshot, ...]
    _by_id: dict[NodeId, NodeSnapshot] = field(init=False, repr=False, compare=False, hash=False)
    _capacity: dict[NodeId, int] = field(init=False, repr=False, compare=False, hash=False)

    def __init__(self, nodes: Iterable[NodeSnapshot]) -> None:
        ordered = tuple(sorted(nodes, key=lambda n: n.node_id))
        by_id: dict[NodeId, NodeSnapshot] = {}
        for n in ordered:
            if n.node_id in by_id:
                raise ValueError(f"duplicate node id {n.node_id!r} in snapshot")
            by_id[n.node_id] = n

        object.__setattr__(self, "nodes", ordered)
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_capacity", shared_machine_capacities(ordered))

    @property
    def ids(self) -> tuple[NodeId, ...]:
        return tuple(self._by_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def node(self, node_id: NodeId) -> NodeSnapshot:
        return self._by_id[node_id]

    def capacity(self, node_id: NodeId) -> int:
        """Effective weight capacity: the node's own figure, scaled down if its machine is overbooked."""
        return self._capacity[node_id]

    def rtt(self, a: NodeId, b: NodeId) -> float | None:
        """RTT between two nodes from either side's measurement (the larger if both); None if unknown."""
        if a == b:
            return 0.0
        known = [ms for ms in (self._by_id[a].rtt_ms.get(b) if a in self._by_id else None,
                               self._by_id[b].rtt_ms.get(a) if b in self._by_id else None) if ms is not None]
        return max(known) if known else None

    def holders(self, model_key: ModelKey) -> tuple[NodeId, ...]:
        """Nodes that could serve ``model_key`` from local disk (not clients, capacity > 0)."""
        return tuple(n.node_id for n in self.nodes
                     if model_key in n.models_on_disk and n.can_serve and self.capacity(n.node_id) > 0)

    def without(self, node_ids: Iterable[NodeId]) -> MeshSnapshot:
        """The mesh with some nodes removed (e.g. dead ones), for re-planning."""
        gone = set(node_ids)
        return MeshSnapshot(n for n in self.nodes if n.node_id not in gone)


# ---------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class ExpertLayout:
    """MoE shape. ``expert_bytes[l]`` is the size of ONE expert's tensors in layer ``l`` (0 in a dense layer).

    An expert is addressed as ``(layer, index)``; the trunk is everything else (attention, norms,
    router, shared experts, embeddings, head).
    """

    n_experts: int
    n_used: int
    expert_bytes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.n_experts < 1 or not (1 <= self.n_used <= self.n_experts):
            raise ValueError(f"bad expert counts: {self.n_used} used of {self.n_experts}")
        object.__setattr__(self, "expert_bytes", tuple(int(b) for b in self.expert_bytes))
        for b in self.expert_bytes:
            _check_nonneg_int("expert_bytes[i]", b)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.expert_bytes) if b > 0)

    @property
    def total_bytes(self) -> int:
        return self.n_experts * sum(self.expert_bytes)

    def all_experts(self) -> tuple[ExpertId, ...]:
        return tuple((layer, e) for layer in self.moe_layers for e in range(self.n_experts))


@dataclass(frozen=True)
class ModelLayout:
    """Exact weight bytes of a model, by part.

    * ``layer_bytes[i]``: all ``blk.i.*`` tensors (experts included).
    * ``embed_bytes``: ``token_embd.*``, held by the first stage.
    * ``head_bytes``: the LM head the last stage holds. With ``tied`` embeddings this is the
      embedding matrix again (``token_embd.weight``), so both end stages count it; a single
      stage holding the whole model counts it once.
    * ``norm_bytes``: ``output_norm.*`` (last stage).
    * ``shared_bytes``: any other global tensor (e.g. ``rope_freqs``), held by every stage.
    * ``n_kv_heads``/``head_dim``/``n_ctx``: for KV budgets (0 if unknown).
    """

    model_key: ModelKey
    n_layers: int
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    norm_bytes: int = 0
    tied: bool = False
    shared_bytes: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    n_ctx: int = 0
    experts: ExpertLayout | None = None

    def __post_init__(self) -> None:
        if not self.model_key:
            raise ValueError("model_key must be non-empty")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        object.__setattr__(self, "layer_bytes", tuple(int(b) for b in self.layer_bytes))
        if len(self.layer_bytes) != self.n_layers:
            raise ValueError(f"{len(self.layer_bytes)} layer sizes for {self.n_layers} layers")
        for name in ("embed_bytes", "head_bytes", "norm_bytes", "shared_bytes", "n_kv_heads",
                     "head_dim", "n_ctx"):
            _check_nonneg_int(name, getattr(self, name))
        for b in self.layer_bytes:
            _check_nonneg_int("layer_bytes[i]", b)
        if self.tied and self.head_bytes > self.embed_bytes:
            raise ValueError("a tied head cannot be larger than the embedding tensors")
        if self.experts is not None:
            if len(self.experts.expert_bytes) != self.n_layers:
                raise ValueError("experts.expert_bytes needs one entry per layer")
            for i, b in enumerate(self.experts.expert_bytes):
                if b * self.experts.n_experts > self.layer_bytes[i]:
                    raise ValueError(f"layer {i}: experts larger than the layer")

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole model on one node (a tied embedding counted once)."""

        return stage_bytes(self, 0, self.n_layers)

    @property
    def trunk_bytes(self) -> int:
        """The whole model without its routed experts (== total_bytes for a dense model)."""
        return self.total_bytes - (self.experts.total_bytes if self.experts else 0)

    @classmethod
    def from_gguf_meta(cls, meta: GGUFMeta, model_key: ModelKey | None = None) -> ModelLayout:
        """Exact sizes from a GGUF tensor table, with the same stage rules as ``GGUFMeta.stage_tensors``.

        ``model_key`` defaults to the file's ``general.name`` (fine for tests; real callers pass
        :func:`make_model_key`). Tensors of blocks at or past ``block_count`` are not part of any
        stage and are not counted, as in ``GGUFMeta.stage_bytes``.
        """
        n = meta.n_layers
        layer_bytes = [0] * n
        embed = head = norm = shared = 0
        tied = meta.tied_embeddings
        n_exp = meta.expert_count
        expert_bytes = [0] * n
        for t in meta.tensors:
            layer = t.layer
            if layer is not None:
                if layer < n:
                    layer_bytes[layer] += t.n_bytes
                    if n_exp > 1 and "_exps." in t.name:
                        if not t.shape or t.shape[0] != n_exp or t.n_bytes % n_exp:
                            raise ValueError(f"{t.name}: shape {t.shape} does not split into {n_exp} experts")
                        expert_bytes[layer] += t.n_bytes // n_exp
            elif t.name.startswith("token_embd."):
                embed += t.n_bytes
                if tied and t.name == "token_embd.weight":
                    head += t.n_bytes
            elif t.name.startswith("output_norm."):
                norm += t.n_bytes
            elif t.name.startswith("output."):
                head += t.n_bytes
            else:
                shared += t.n_bytes
        experts = None
        if n_exp > 1 and any(expert_bytes):
            experts = ExpertLayout(n_exp, max(1, meta.expert_used_count), tuple(expert_bytes))
        return cls(
            model_key=model_key or meta.name,
            n_layers=n,
            layer_bytes=tuple(layer_bytes),
            embed_bytes=embed,
            head_bytes=head,
            norm_bytes=norm,
            tied=tied,
            shared_bytes=shared,
            n_kv_heads=meta.n_kv_heads,
            head_dim=meta.head_dim,
            n_ctx=meta.n_ctx,
            experts=experts,
        )


# ---------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class StageAssignment:
    """Layers ``[start, end)`` on ``node_id``; ``tensor_bytes`` is exact (see ``capacity.stage_bytes``)."""

    node_id: NodeId
    start: int
    end: int
    tensor_bytes: int

    @property
    def n_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """How one model is served: a single stage (solo) or a pipeline; stage 0 is always the host.

    Plans are authored by the host and ordered by ``epoch``; see :class:`~mesh402.placement.plans.PlanBook`.
    """

    model_key: ModelKey
    epoch: int
    host: NodeId
    stages: tuple[StageAssignment, ...]
    standbys: tuple[NodeId, ...] = ()
    est_token_latency_ms: float = 0.0

    @property
    def is_solo(self) -> bool:
        return len(self.stages) == 1

    @property
    def nodes(self) -> tuple[NodeId, ...]:
        return tuple(s.node_id for s in self.stages)

    def stage_of(self, node_id: NodeId) -> StageAssignment | None:
        return next((s for s in self.stages if s.node_id == node_id), None)

    def same_assignment(self, other: Plan) -> bool:
        """True if ``other`` places the same layers on the same nodes (epochs and estimates ignored)."""
        return (self.model_key, self.host, self.stages) == (other.model_key, other.host, other.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "plan",
            "model_key": self.model_key,
            "epoch": self.epoch,
            "host": self.host,
            "stages": [[s.node_id, s.start, s.end, s.tensor_bytes] for s in self.stages],
            "standbys": list(self.standbys),
            "est_token_latency_ms": self.est_token_latency_ms,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        return cls(
            model_key=str(d["model_key"]),
            epoch=int(d["epoch"]),
            host=str(d["host"]),
            stages=tuple(StageAssignment(str(n), int(s), int(e), int(b)) for n, s, e, b in d["stages"]),
            standbys=tuple(str(x) for x in d.get("standbys", ())),
            est_token_latency_ms=float(d.get("est_token_latency_ms", 0.0)),
        )


@dataclass(frozen=True)
class ExpertShard:
    """What one node holds in an expert split: its experts (sorted) and, on the host, the trunk."""

    node_id: NodeId
    experts: tuple[ExpertId, ...]
    holds_trunk: bool
    tensor_bytes: int


@dataclass(frozen=True)
class ExpertPlan:
    """An MoE model split by experts: the host holds the dense trunk; every expert is on >= 1 node."""

    model_key: ModelKey
    epoch: int
    host: NodeId
    shards: tuple[ExpertShard, ...]
    replicated: tuple[ExpertId, ...] = ()
    standbys: tuple[NodeId, ...] = ()

    @property
    def nodes(self) -> tuple[NodeId, ...]:
        return tuple(s.node_id for s in self.shards)

    def owners(self, expert: ExpertId) -> tuple[NodeId, ...]:
        return tuple(s.node_id for s in self.shards if expert in s.experts)

    def shard_of(self, node_id: NodeId) -> ExpertShard | None:
        return next((s for s in self.shards if s.node_id == node_id), None)


@dataclass(frozen=True)
class WaitingForCapacity:
    """No placement fits now. ``reason`` is for people; the byte figures are for code."""

    model_key: ModelKey
    epoch: int
    reason: str
    host: NodeId | None = None
    needed_bytes: int = 0
    available_bytes: int = 0


PlanLike = Union[Plan, ExpertPlan, WaitingForCapacity]
