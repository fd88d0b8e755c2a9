"""Test-only cheats a pipeline stage could commit, applied in place to a loaded partial Engine.

- ``skip_layer``: one of the stage's layers contributes nothing (its block is dropped from the stage's
  block list; the KV cache keeps a spare layer, so its indexing stays valid).
- ``perturb``: every forward output of the engine is multiplied elementwise by (1 + 0.01 N(0, 1)): a 1%
  perturbation (hidden states on a middle stage, logits on the last one).
- ``requant``: every linear weight of the stage's layers is replaced by a Q4_0-style round trip of its
  real values (blocks of 32 along the input dim, scale = absmax / 7, round and clamp to [-8, 7]): a
  cheaper quantization substituted for the published one. Exact mode dequantizes the Q4_0 blocks per
  matmul; fast mode packs them for the int4 kernel, like any Q4_0 model.

- ``grammar_escape`` (a worker cheat, not an engine one): as the last stage of a split, the stage draws
  every token unconstrained, whatever grammar the session's grant carries (a hostile last stage that
  answers structured-output requests with free text).

``install(worker)`` is the node-process hook (installed by the test-only entry point tests/support/tamper_node.py): with
``MESH402_TAMPER=<cheat>`` (and optionally ``MESH402_TAMPER_SEED``) every engine the StageWorker loads
is tampered.

A stage can also cheat on its work receipts (``MESH402_RECEIPT_CHEAT``, ``cheat_receipts``), answering the
entry's CLOSE with a chain of its own making instead of passing CLOSE on:
- ``claim_downstream``: it signs its receipt for every layer from its own to the model's last and drops the
  receipts of the stages after it (they never see CLOSE);
- ``forge``: a whole chain signed with throwaway keys (stage 0 included), each claiming 10^9 tokens.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from mesh402.engine.quant import QWeight, pack_fast

CHEATS = ("skip_layer", "perturb", "requant")  # engine cheats: what tamper_engine applies
WORKER_CHEATS = ("grammar_escape",)
ESCAPED = "tamper: grammar_escape drew a constrained token from the whole vocabulary"  # in the cheat's log  # cheats of the stage worker, not of its engine
PERTURB_SCALE = 0.01


def tamper_engine(engine: Any, cheat: str, seed: int = 0, *, layer: int | None = None) -> Any:
    """Apply ``cheat`` to ``engine`` in place and return it. ``layer`` (skip_layer only): the absolute layer
    index to drop; default one of the engine's layers picked by ``seed``."""
    if cheat == "skip_layer":
        _skip_layer(engine, seed, layer)
    elif cheat == "perturb":
        _perturb(engine, seed)
    elif cheat == "requant":
        _requant(engine)
    else:
        raise ValueError(f"unknown cheat {cheat!r}; one of {CHEATS}")
    return engine


RECEIPT_CHEATS = ("claim_downstream", "forge")
FORGED_TOKENS = 10**9


def cheat_receipts(worker: Any, how: str) -> None:
    """Make ``worker`` (a StageWorker) answer CLOSE with a receipt chain of its own making (see above)."""
    import json

    from mesh402.mesh.identity import NodeIdentity
    from mesh402.serving.stage_link import K, dump_json, stage_frame
    from mesh402.work.receipts import Receipt, sign_receipt

    if how not in RECEIPT_CHEATS:
        raise ValueError(f"unknown receipt cheat {how!r}; one of {RECEIPT_CHEATS}")

    async def close(up: Any, down: Any, frame: Any, tally: Any, engine: Any) -> None:
        chain = list(json.loads(frame.params.get("receipts", "[]")))
        n_layers = int(engine.info.n_layers)
        if how == "claim_downstream":
            tally.layer_end = n_layers
            prev = Receipt.from_json(chain[-1]).digest if chain else ""
            chain.append(tally.receipt(worker.signer, len(chain), prev).to_json())
        else:
            first = Receipt.from_json(chain[0]) if chain else None
            cuts = [0, tally.layer_start, n_layers] if tally.layer_start else [0, n_layers]
            chain, prev, h = [], "", "00" * 32
            for stage, (a, b) in enumerate(zip(cuts, cuts[1:])):
                r = sign_receipt(NodeIdentity.generate(), request_id=frame.request_id, stage=stage,
                                 model_hash=first.model_hash if first else tally.model_hash, layer_start=a,
                                 layer_end=b, tokens=FORGED_TOKENS, input_hash=h, output_hash="11" * 32, prev=prev)
                chain.append(r.to_json())
                prev, h = r.digest, r.output_hash
        await up.send(stage_frame(K.STAGE_KIND_RESULT, request_id=frame.request_id,
                                  params={"receipts": dump_json(chain), "evidence": "[]"}))

    worker._close_receipts = close


def install(worker: Any) -> None:
    """Wrap ``worker.loader`` so every engine it loads is tampered with ``$MESH402_TAMPER``, and make its CLOSE
    answer with ``$MESH402_RECEIPT_CHEAT``'s chain (either unset: no-op)."""
    how = os.environ.get("MESH402_RECEIPT_CHEAT", "").strip()
    if how:
        cheat_receipts(worker, how)
    cheat = os.environ.get("MESH402_TAMPER", "").strip()
    if not cheat:
        return
    if cheat not in CHEATS + WORKER_CHEATS:
        raise ValueError(f"MESH402_TAMPER={cheat!r}; one of {CHEATS + WORKER_CHEATS}")
    if cheat == "grammar_escape":
        escape_grammar(worker)
        return
    seed = int(os.environ.get("MESH402_TAMPER_SEED", "0"))
    load = worker.loader

    def tampered(content_hash: str, start: int, end: int) -> Any:
        return tamper_engine(load(content_hash, start, end), cheat, seed)

    worker.loader = tampered


# ---------------------------------------------------------------------------- cheats

def escape_grammar(worker: Any) -> None:
    """The worker's last-stage draws drop the session's grammar matcher (tokens come from the whole
    vocabulary)."""
    honest = worker._draw

    async def unconstrained(engine: Any, sampling: str) -> Any:
        draw = await honest(engine, sampling)
        if draw.matcher is not None:  # a constrained draw escaped: the test checks the host failed it over
            print(ESCAPED, flush=True)
        draw.matcher = None
        return draw

    worker._draw = unconstrained


def _skip_layer(engine: Any, seed: int, layer: int | None) -> None:
    a, b = engine.layers
    li = random.Random(seed).randrange(a, b) if layer is None else int(layer)
    for st in engine.stages:
        s0, s1 = st.layers
        if s0 <= li < s1:
            del st.blocks[li - s0]  # the KV cache still has s1 - s0 layers: block j keeps using kv.k[j]
            st.repacked()
            return
    raise ValueError(f"layer {li} is not in the engine's layers [{a}, {b})")


def _perturb(engine: Any, seed: int) -> None:
    st = engine.stages[-1]  # its output is the engine's output
    forward = st.forward
    gen = torch.Generator().manual_seed(seed)

    def noisy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = forward(*args, **kwargs)
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device)
        return out * (1.0 + PERTURB_SCALE * noise)

    st.forward = noisy


def q4_0_round_trip(w: torch.Tensor) -> QWeight:
    """A Q4_0 QWeight of fp32 ``w`` [rows, cols]: per block of 32 along cols, d = absmax / 7 (f16),
    q = clamp(round(w / d), -8, 7), stored as q + 8 in nibbles (element j low, j + 16 high of byte j)."""
    rows, cols = w.shape
    if cols % 32:
        raise ValueError(f"cols {cols} is not a multiple of 32")
    blocks = w.float().reshape(rows, cols // 32, 32)
    d16 = (blocks.abs().amax(-1) / 7.0).half()
    d = d16.float().unsqueeze(-1)
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1.0)), 0.0).clamp_(-8, 7)
    u = (q + 8).to(torch.uint8)
    qs = (u[..., :16] | (u[..., 16:] << 4)).contiguous()
    return QWeight(2, (rows, cols), {"d": d16.contiguous(), "qs": qs})  # 2 = GGMLQuantizationType.Q4_0


def _requant_linear(lin: Any, weights: list[QWeight], device: torch.device) -> None:
    w = torch.cat([qw.dequant().clone() for qw in weights])  # the real values, rows in the Linear's order
    qw = q4_0_round_trip(w).to(device)
    if lin.fast is not None:
        packed = pack_fast(qw, device)
        if packed is None or packed.kind not in ("int4", "q4x8"):
            raise NotImplementedError("requant in fast mode needs a packed 4-bit CPU kernel")
        lin.fast, lin.exact = [packed], None
    else:
        lin.exact = [qw]


def _requant(engine: Any) -> None:
    src = engine.source
    for st in engine.stages:
        a = st.layers[0]
        for j, L in enumerate(st.blocks):
            i = a + j
            if L.moe is not None:
                raise NotImplementedError("requant of MoE layers")
            load = lambda n: src.load(f"{i}.{n}")  # noqa: E731
            _requant_linear(L.qkv, [load("wq"), load("wk"), load("wv")], st.device)
            _requant_linear(L.wo, [load("wo")], st.device)
            _requant_linear(L.gate_up, [load("w_gate"), load("w_up")], st.device)
            _requant_linear(L.down, [load("w_down")], st.device)
        st.repacked()


# ---------------------------------------------------------------------------- recording a stage's run
# Shared by the replay tests (tests/engine/test_replay.py) and benchmarks/verify_tolerance.py: the evidence a
# stage reveals (its step inputs) and what it committed to per step, as StageWorker produces them.

def request_steps(n_prompt: int, n_total: int, chunk: int) -> list[tuple[int, int]]:
    """(position, n_real) of each step of a request: fixed prefill chunks, then one decode row per step."""
    from mesh402.engine.chunks import prefill_steps

    return prefill_steps(0, n_prompt, chunk) + [(p, 1) for p in range(n_prompt, n_total)]


@torch.inference_mode()
def upstream_inputs(engine0: Any, tokens: list[int], n_prompt: int, wire: str) -> list[dict]:
    """Run ``tokens`` (prompt, then teacher-forced decode tokens) through the first stage ``engine0``;
    the wire records the next stage receives, one per step."""
    from mesh402.engine.activations import forward_tokens

    C = engine0.prefill_chunk
    out: list[dict] = []
    with engine0.new_session(len(tokens) + C) as s:
        for pos, n in request_steps(n_prompt, len(tokens), C):
            kind = 1 if n_prompt > pos else 2
            data, shape = forward_tokens(s, tokens[pos:pos + n], pos, C if kind == 1 else 1, wire)
            out.append({"kind": kind, "pos": pos, "n_real": n, "dtype": wire, "shape": shape, "data": data})
    return out


@torch.inference_mode()
def stage_outputs(engine: Any, inputs: list[dict], *, last: bool, wire: str, fp_ids: list[int]) -> list[bytes]:
    """What a stage running ``engine`` commits to per step: the wire payload it sends (middle stage, in
    ``wire``) or its logits fingerprint (last stage)."""
    from mesh402.engine.replay import fingerprint
    from mesh402.engine.activations import decode_activations, encode_activations

    outs: list[bytes] = []
    with engine.new_session(max(r["pos"] + r["shape"][0] for r in inputs)) as s:
        for r in inputs:
            y = s.forward(decode_activations(r["data"], r["shape"], r["dtype"]), r["pos"], r["n_real"])
            outs.append(fingerprint(y, fp_ids) if last else encode_activations(y, wire)[0])
    return outs
