"""Schemas of the announcement labels a node reads from its peers: typed, bounded parsing at the boundary.

A peer's labels are its own claims (its announcement is signed, so they are at least its claims). They are
parsed here, once, into typed values: a malformed value (`capacity_bytes: "lots"`, a `model:*` label that
is a JSON list, a plan naming another host) becomes "no claim", never an exception deeper in placement,
routing or payment code. Which claims are then believed is decided where they are used (docs/security.md):
capacity never displaces an incumbent, a plan claim counts only for the host it names and, on a node that
holds the model, only after that host proved it holds the tensors; validators count only when the operator
named them.

| label | value | parsed by |
|---|---|---|
| `capacity_bytes` | decimal integer, 0..MAX_CAPACITY | `capacity` |
| `model:<id>` | JSON object: ctx, params, tags, tools, tok_s | `model_facts` |
| `model:<id>` with `backend: true` | JSON object: backend, verified (false), ready, ctx | `backend_models` |
| `plan:<model>@<hash>` | JSON object: host, ready, epoch, stages, ... | `plan_claim` |
| `verified:<hash>` | JSON list of node ids this node saw prove they hold the model | `verified_holders` |
| `validator`, `validator_device` | EVM address; device signature | `validator_address`, `validator_device` |
| `x402` | JSON offer | `mesh402.economics.charging.HostOffer.from_label` |
| `erc8004` | `eip155:<chain>:<registry>/<agent id>` | `mesh402.economics.erc8004.parse_label` |
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CAPACITY_LABEL = "capacity_bytes"
MODEL_LABEL = "model:"
PLAN_LABEL = "plan:"
VERIFIED_LABEL = "verified:"
VALIDATOR_LABEL = "validator"
VALIDATOR_DEVICE_LABEL = "validator_device"

MAX_CAPACITY = 2**50  # 1 PB of weights: any larger claim is read as this much (it still ranks first, never more)
MAX_EPOCH = 2**62
MAX_JSON = 256 * 1024  # a label value longer than this is not parsed at all
MAX_STAGES = 1024
MAX_VERIFIED = 64  # node ids one verified: label lists
MAX_BACKEND_MODELS = 16  # backend models one node announces and peers read from it (an announcement holds 64 labels)
_NODE_ID = re.compile(r"[0-9a-f]{64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")  # a backend's ids may hold "/" (org/name)


def node_id_ok(value: Any) -> bool:
    """A node id as the mesh writes it: 64 lower-case hex digits (an Ed25519 public key)."""
    return isinstance(value, str) and _NODE_ID.fullmatch(value) is not None


def _json(raw: Optional[str]) -> Any:
    if not raw or len(raw) > MAX_JSON:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def capacity(labels: Mapping[str, str]) -> int:
    """The weight bytes a node says it offers: 0 when absent or malformed, at most MAX_CAPACITY."""
    raw = labels.get(CAPACITY_LABEL, "")
    if not isinstance(raw, str) or not raw.isdigit() or len(raw) > 20:
        return 0
    return min(int(raw), MAX_CAPACITY)


class ModelFactsLabel(BaseModel):
    """`model:<id>`: what a host says about a model it serves (routing metadata, observed speed)."""
    model_config = ConfigDict(extra="ignore")
    ctx: int = Field(0, ge=0, le=2**31)
    params: int = Field(0, ge=0, le=2**50)
    tags: list[str] = Field(default_factory=list, max_length=32)
    tools: bool = False
    tok_s: Optional[float] = Field(None, ge=0, le=1e6)


class BackendModelLabel(BaseModel):
    """`model:<id>` of a model the announcer answers through its own OpenAI-compatible server
    (`serve --backend`): no layers, no plan, nobody can spot-check it, so it is always `verified: false`."""
    model_config = ConfigDict(extra="ignore", strict=True)
    backend: bool
    verified: bool = False
    ready: bool = False  # the backend answered its last health probe
    ctx: int = Field(0, ge=0, le=2**31)


def backend_label(ready: bool, context_length: int = 0) -> str:
    """The `model:<id>` label value a node announces for one of its backend models."""
    d: dict[str, Any] = {"backend": True, "verified": False, "ready": ready}
    if context_length:
        d["ctx"] = context_length
    return json.dumps(d, separators=(",", ":"))


def backend_models(labels: Mapping[str, str]) -> dict[str, BackendModelLabel]:
    """model id -> what the announcer says about a backend model it fronts (a label that is not a
    well-formed backend claim, or names a malformed id, is skipped; at most MAX_BACKEND_MODELS)."""
    out: dict[str, BackendModelLabel] = {}
    for label, value in labels.items():
        if len(out) >= MAX_BACKEND_MODELS:
            break
        model_id = label[len(MODEL_LABEL):]
        if not label.startswith(MODEL_LABEL) or _MODEL_ID.fullmatch(model_id) is None:
            continue
        if not isinstance(value, str) or len(value) > 1024 or '"backend"' not in value:
            continue
        try:
            b = BackendModelLabel.model_validate_json(value)
        except ValidationError:
            continue
        if b.backend and not b.verified:  # a "verified backend" is a contradiction: not believed
            out[model_id] = b
    return out


def model_facts(raw: Optional[str]) -> ModelFactsLabel:
    """A `model:*` label's facts; defaults (nothing known) when absent or malformed."""
    d = _json(raw)
    if isinstance(d, dict):
        try:
            facts = ModelFactsLabel.model_validate(d)
            facts.tags = [t[:64] for t in facts.tags]
            return facts
        except ValidationError:
            pass
    return ModelFactsLabel()


class _PlanLabel(BaseModel):
    model_config = ConfigDict(extra="allow")
    host: str = Field(..., max_length=64)
    ready: bool = False
    epoch: int = Field(0, ge=0, le=MAX_EPOCH)
    stages: list[tuple[str, int, int, int]] = Field(default_factory=list, max_length=MAX_STAGES)
    waiting: str = Field("", max_length=1000)


@dataclass(frozen=True)
class PlanClaim:
    """A `plan:<key>` label: the host it names, whether that host serves it now, its epoch, and the whole
    (validated) label for status pages."""
    host: str
    ready: bool
    epoch: int
    data: dict[str, Any]


def plan_claim(raw: Optional[str], announcer: str) -> Optional[PlanClaim]:
    """A plan claim, or None when malformed or when it names a host other than `announcer` (the node whose
    signed announcement carries it): a node can only claim plans of its own."""
    d = _json(raw)
    if not isinstance(d, dict):
        return None
    try:  # strict: "7" is not an epoch, 1.0 not a layer (the raw dict is handed on as the plan)
        p = _PlanLabel.model_validate_json(raw or "", strict=True)
    except ValidationError:
        return None
    if p.host != announcer:
        return None
    return PlanClaim(p.host, p.ready, p.epoch, d)


def plan_claims(labels: Mapping[str, str], announcer: str) -> dict[str, PlanClaim]:
    """model key -> the announcer's own plan claim for it."""
    out = {}
    for label, value in labels.items():
        if label.startswith(PLAN_LABEL):
            c = plan_claim(value, announcer)
            if c is not None:
                out[label[len(PLAN_LABEL):]] = c
    return out


def verified_holders(labels: Mapping[str, str], content_hash: str) -> frozenset[str]:
    """The node ids a node says proved to it that they hold the model `content_hash` (its vouch)."""
    d = _json(labels.get(VERIFIED_LABEL + content_hash))
    if not isinstance(d, list):
        return frozenset()
    return frozenset(x for x in d[:MAX_VERIFIED] if node_id_ok(x))


def validator_address(labels: Mapping[str, str]) -> Optional[str]:
    """The EVM address a node announces as a validator's, if well formed."""
    v = labels.get(VALIDATOR_LABEL, "")
    return v if isinstance(v, str) and _ADDRESS.fullmatch(v) else None


def validator_device(labels: Mapping[str, str]) -> str:
    v = labels.get(VALIDATOR_DEVICE_LABEL, "")
    return v if isinstance(v, str) and len(v) <= 200 else ""
