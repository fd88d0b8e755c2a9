"""Mixture-of-experts feed-forward (mixtral, qwen2moe, qwen3moe, olmoe).

A MoE layer replaces the dense FFN with a router (``{i}.moe_router`` [E, hidden]),
``E`` experts (SwiGLU MLPs ``{i}.exp_gate/exp_up/exp_down``, kept quantized per
expert exactly like dense weights) and, for qwen2moe, a shared expert
(``{i}.sh_gate/sh_up/sh_down``) scaled by ``sigmoid(x @ {i}.sh_router)``.

Routing, as transformers implements it for all four: ``softmax(x @ Wr^T)`` in
fp32, top-k of the probabilities, renormalised to sum 1 when the model says so
(mixtral always; ``norm_topk_prob`` / ``expert_weights_norm`` otherwise).
Softmax-then-renormalise equals mixtral's softmax over the top-k logits.

Experts are computed by an :class:`ExpertRunner`: the stage asks it for the
outputs of expert ``e`` on the rows routed to ``e`` (unweighted), and combines
them itself in ascending expert order (``out.index_add_(rows, y_e * w)``). A
runner may hold all experts locally (:class:`LocalExperts`) or forward the rows
to the nodes holding them; since every expert sees exactly the same rows and
the sum is formed in the same order on the host, split results are
bit-identical to solo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, Protocol

import torch
import torch.nn.functional as F

from .quant import Workspace
from .weights import ModelConfig, WeightSource

if TYPE_CHECKING:  # pragma: no cover
    from .model import Linear

__all__ = ["ExpertRunner", "ExpertBank", "LocalExperts", "MoEFFN", "route", "moe_layers"]

ExpertId = tuple[int, int]  # (layer, expert)


def moe_layers(source: WeightSource, layers: tuple[int, int] | None = None) -> list[int]:
    """The MoE layers of a model (qwen2moe/qwen3moe may keep some layers dense)."""
    cfg = source.config
    if not cfg.is_moe:
        return []
    a, b = layers or (0, cfg.n_layers)
    return [i for i in range(a, b) if source.has(f"{i}.moe_router")]


class ExpertRunner(Protocol):
    def run_experts(self, layer: int, x: torch.Tensor,
                    groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``groups[e]``: row indices of ``x`` routed to expert ``e``; returns ``{e: [len(rows), hidden]}``
        fp32, each expert applied to ``x[rows]`` (not weighted)."""
        ...


class _Expert:
    __slots__ = ("gate_up", "down")

    def __init__(self, gate_up: "Linear", down: "Linear"):
        self.gate_up, self.down = gate_up, down

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def __call__(self, x: torch.Tensor, ws: Workspace | None) -> torch.Tensor:
        gu = self.gate_up(x, ws)
        ff = gu.shape[-1] // 2
        return self.down(F.silu(gu[:, :ff]) * gu[:, ff:], ws)


class ExpertBank:
    """Expert weights for a set of ``(layer, expert)`` pairs, kept quantized (exact) or packed (fast)."""

    def __init__(self, source: WeightSource, experts: Iterable[ExpertId], *, mode: str = "exact",
                 device: str | torch.device = "cpu", reuse: "ExpertBank | None" = None):
        """``reuse``: a bank whose experts (same model, mode and device) are shared instead of loaded again."""
        from .model import Linear

        self.device = torch.device(device)
        self.mode = mode
        by_layer: dict[int, list[int]] = {}
        self.experts: dict[ExpertId, _Expert] = {}
        for li, e in experts:
            key = (int(li), int(e))
            if reuse is not None and key in reuse.experts:
                self.experts[key] = reuse.experts[key]
            else:
                by_layer.setdefault(key[0], []).append(key[1])
        for li in sorted(by_layer):
            es = sorted(set(by_layer[li]))
            g = source.load_experts(f"{li}.exp_gate", es)
            u = source.load_experts(f"{li}.exp_up", es)
            d = source.load_experts(f"{li}.exp_down", es)
            for e in es:
                self.experts[(li, e)] = _Expert(Linear([g[e], u[e]], None, mode, self.device),
                                                Linear([d[e]], None, mode, self.device))
        biggest = max((w.shape[0] * w.shape[1] for ex in self.experts.values()
                       for lin in (ex.gate_up, ex.down) for w in (lin.exact or [])), default=0)
        self.ws = Workspace(min(biggest, 1 << 18), device=self.device)

    @property
    def ids(self) -> list[ExpertId]:
        return sorted(self.experts)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.experts.values())

    def has(self, layer: int, e: int) -> bool:
        return (layer, e) in self.experts

    @torch.inference_mode()
    def run(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        ex = self.experts.get((layer, e))
        if ex is None:
            raise KeyError(f"expert {e} of layer {layer} is not held here")
        return ex(x.to(self.device, torch.float32), self.ws)


class LocalExperts:
    """An :class:`ExpertRunner` over a local :class:`ExpertBank` (solo inference)."""

    def __init__(self, bank: ExpertBank):
        self.bank = bank

    def run_experts(self, layer, x, groups):
        return {e: self.bank.run(layer, e, x[rows]) for e, rows in groups.items()}


def route(logits: torch.Tensor, k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids [T, k] and gate weights [T, k] (fp32) from router logits [T, E]."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if norm:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w


class MoEFFN:
    """The MoE block of one layer: router, shared expert (if any); experts via an :class:`ExpertRunner`."""

    def __init__(self, source: WeightSource, layer: int, cfg: ModelConfig, mode: str, device: torch.device):
        from .model import Linear

        self.layer = layer
        self.k = cfg.n_experts_used
        self.n_experts = cfg.n_experts
        self.norm = cfg.norm_topk
        # the router decides which experts run: always fp32, whatever the mode
        self.router = source.load(f"{layer}.moe_router").dequant().to(device).contiguous()
        self.shared = None
        self.shared_gate = None
        if source.has(f"{layer}.sh_gate"):
            self.shared = _Expert(Linear([source.load(f"{layer}.sh_gate"), source.load(f"{layer}.sh_up")],
                                         None, mode, device),
                                  Linear([source.load(f"{layer}.sh_down")], None, mode, device))
            if source.has(f"{layer}.sh_router"):
                self.shared_gate = source.load(f"{layer}.sh_router").dequant().reshape(1, -1).to(device)
        self.usage = torch.zeros(self.n_experts, dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        n = self.router.numel() * 4 + (self.shared.nbytes if self.shared is not None else 0)
        return n + (self.shared_gate.numel() * 4 if self.shared_gate is not None else 0)

    def __call__(self, x: torch.Tensor, runner: ExpertRunner, ws: Workspace | None,
                 n_real: int | None = None) -> torch.Tensor:
        T = x.shape[0]
        idx, w = route(x @ self.router.t(), self.k, self.norm)
        # Only real rows go to the experts: a prefill chunk's padding rows are discarded anyway, so
        # running them would cost expert nodes work (and wire) and be paid for nothing.
        real = idx[:T if n_real is None else n_real]
        self.usage += torch.bincount(real.reshape(-1).cpu(), minlength=self.n_experts)
        hit = torch.unique(real).tolist()  # ascending
        groups, kpos = {}, {}
        for e in hit:
            rows, pos = torch.where(real == e)
            groups[e], kpos[e] = rows, pos
        ys = runner.run_experts(self.layer, x, groups)
        out = torch.zeros_like(x)
        for e in hit:
            rows = groups[e]
            out.index_add_(0, rows, ys[e].to(out.device) * w[rows, kpos[e], None])
        if self.shared is not None:
            s = self.shared(x, ws)
            if self.shared_gate is not None:
                s = torch.sigmoid(x @ self.shared_gate.t()) * s
            out = out + s
        return out
