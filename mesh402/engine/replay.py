"""Spot-check re-execution: replay a stage's revealed step inputs and compare its committed output.

See docs/verification.md. The validator loads the stage's layer range in the declared mode and runs
the revealed inputs of steps 0..i* through a fresh session (same chunk shapes, same positions), then
compares step i*'s output with what the stage committed to:

    rel_err = ||computed - expected||_2 / max(||expected||_2, 1e-12)

middle stages over the real rows, both rounded to the wire dtype; the last stage over its logits
fingerprint (fp32 logits of the last real row at the request's fingerprint ids).

Bad evidence (byte counts that do not match shapes, positions out of order or beyond the context,
no steps, a malformed expected output) is the stage's fault: ``replay`` returns ``ok=False`` with
the reason in ``detail`` and ``rel_err = inf``; it never raises for it. Only a problem on the
validator's side propagates: :class:`~mesh402.engine.errors.EngineFull` when its engine has no free
session (retry later; the stage is not at fault).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mesh402.engine.sampling import (
    MAX_TOP_LOGPROBS,
    Sampler,
    logprob_from_record,
    parse_decoding,
    token_logprobs,
)

from .activations import WIRE_DTYPES, decode_activations, encode_activations
from .errors import EngineError, EngineFull
from .qkernels import kernel_set

__all__ = ["TOLERANCE", "ReplayResult", "cpu_capability", "device_signature", "fingerprint", "replay"]

# Largest rel_err an honest stage may show, per declared mode. Measured by benchmarks/verify_tolerance.py
# (SmolLM2-135M, stages [15,30) last and [10,20) middle, ~80-token chat prompt + 24 decode steps, wire
# f32/bf16/f16; table in docs/benchmarks.md, "Verification"):
# - same CPU kernels, 1 or 2 validator threads: honest rel_err 0 in both modes (bit-identical replay);
# - validator with ATen/MKL forced down to AVX2 or no SIMD (the stage on AVX-512): exact honest max 1.7e-5
#   (a bf16 wire rounding flipped), fast honest max 2.7e-2 (bf16 activations amplify reordered sums);
# - smallest cheat distance, both modes: 5.4e-3 (perturb 1%), then skip_layer 1.3e-2, requant 6.9e-2.
# exact: 3e-4 is 17x above the worst honest noise on any CPU and 18x below the smallest cheat.
# fast: 3e-4 likewise, but only for a validator on the stage's CPU capability (see cpu_capability()):
# across capabilities honest fast noise (up to 2.7e-2) overlaps a 1% perturbation and a skipped layer,
# so no tolerance separates them; a validator must not judge fast-mode work on other CPU kernels.
TOLERANCE: dict[str, float] = {"exact": 3e-4, "fast": 3e-4}

_NORM_FLOOR = 1e-12


@dataclass
class ReplayResult:
    rel_err: float
    tolerance: float
    ok: bool
    detail: str


class _BadEvidence(ValueError):
    """The revealed evidence cannot be replayed (the stage's fault)."""


@dataclass
class _Step:
    pos: int
    n_real: int
    x: torch.Tensor  # fp32 [T, hidden]


def cpu_capability() -> str:
    """The CPU kernel level torch dispatches to here ("AVX512", "AVX2", "DEFAULT", ...). Fast-mode replay is
    only comparable on the same level: a validator can match a lower one by running the replay in a process
    started with ATEN_CPU_CAPABILITY=<level, lower case> (and MKL_ENABLE_INSTRUCTIONS)."""
    return str(torch.backends.cpu.get_cpu_capability())


def device_signature(device: str | torch.device = "cpu") -> str:
    """What fast-mode numbers depend on: device kind, CPU kernel level (or GPU name), torch version and the
    engine's fast kernel set (qkernels.kernel_set: the native VNNI set or torch's kernels). A validator judges
    fast-mode work only on the same signature (see TOLERANCE)."""
    dev = torch.device(device)
    what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_capability()
    return f"{dev.type}:{what}:torch-{torch.__version__}:{kernel_set(dev.type)}"


def fingerprint(logits: torch.Tensor, ids: list[int]) -> bytes:
    """fp32 little-endian bytes of ``logits[ids]`` (the last stage's per-step commitment)."""
    idx = torch.as_tensor(list(ids), dtype=torch.long, device=logits.device)
    return logits.detach().reshape(-1).index_select(0, idx).to("cpu", torch.float32).numpy().astype("<f4").tobytes()


def _f32(data: bytes, what: str) -> np.ndarray:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _BadEvidence(f"{what}: {type(data).__name__}, not bytes")
    if len(data) % 4:
        raise _BadEvidence(f"{what}: {len(data)} bytes is not a whole number of fp32 values")
    return np.frombuffer(bytes(data), dtype="<f4").astype(np.float64)


def _first_stage_x(rec: dict, T: int, n_real: int, vocab: int) -> torch.Tensor:
    """A first stage's step input: its token ids, padded to the step's row count with 0 as the host pads them
    (engine.activations.forward_tokens), so the replay meets the same kernel shapes."""
    tokens = rec.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != n_real or not all(
            type(t) is int and 0 <= t < vocab for t in tokens):
        raise _BadEvidence(f"first-stage step needs {n_real} token ids in [0, {vocab})")
    return torch.tensor(tokens + [0] * (T - n_real), dtype=torch.long)


def _parse_steps(inputs: list[dict], hidden: int, n_ctx: int, first_vocab: int = 0) -> list[_Step]:
    """Decode and check the revealed inputs: shapes, byte counts, positions a session can take in order.
    `first_vocab` > 0: the stage is the first one (token ids in, `shape` the rows of what it sent)."""
    if not inputs:
        raise _BadEvidence("no step inputs revealed")
    steps: list[_Step] = []
    length = 0  # the KV length the stage's session had before each step
    for i, rec in enumerate(inputs):
        try:
            pos, n_real, dtype = int(rec["pos"]), int(rec["n_real"]), str(rec["dtype"])
            shape = [int(d) for d in rec["shape"]]
            data = rec["data"]
        except (KeyError, TypeError, ValueError) as e:
            raise _BadEvidence(f"step {i}: malformed input record ({e!r})") from None
        if dtype not in WIRE_DTYPES:
            raise _BadEvidence(f"step {i}: unknown wire dtype {dtype!r}")
        if len(shape) != 2 or shape[1] != hidden or shape[0] < 1:
            raise _BadEvidence(f"step {i}: shape {shape} is not [T, {hidden}]")
        T = shape[0]
        if not 1 <= n_real <= T:
            raise _BadEvidence(f"step {i}: n_real {n_real} outside [1, {T}]")
        if not 0 <= pos <= length:  # a session can rewind (truncate) but not skip positions
            raise _BadEvidence(f"step {i}: position {pos} out of order (session length {length})")
        if pos + T > n_ctx:
            raise _BadEvidence(f"step {i}: positions [{pos}, {pos + T}) beyond the model context {n_ctx}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise _BadEvidence(f"step {i}: payload is {type(data).__name__}, not bytes")
        if first_vocab:
            x = _first_stage_x(rec, T, n_real, first_vocab)
            steps.append(_Step(pos, n_real, x))
            length = pos + n_real
            continue
        try:
            x = decode_activations(bytes(data), shape, dtype)
        except ValueError as e:
            raise _BadEvidence(f"step {i}: {e}") from None
        steps.append(_Step(pos, n_real, x))
        length = pos + n_real
    return steps


def _run(engine: Any, steps: list[_Step]) -> tuple[torch.Tensor, int]:
    """Run every step through a fresh session; (last step's output, its n_real)."""
    max_len = max(s.pos + s.x.shape[0] for s in steps)
    session = engine.new_session(max_len)
    try:
        out = None
        for s in steps:
            out = session.forward(s.x, s.pos, s.n_real)
        return out, steps[-1].n_real
    finally:
        session.close()


def _computed_and_expected(out: torch.Tensor, n_real: int, *, last: bool, expected: bytes,
                           expected_dtype: str, expected_shape: list[int] | None, step_shape: list[int],
                           fp_ids: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    if last:
        ids = list(range(out.numel())) if fp_ids is None else [int(i) for i in fp_ids]
        if not ids or min(ids) < 0 or max(ids) >= out.numel():
            raise _BadEvidence(f"fingerprint ids outside [0, {out.numel()})")
        want = _f32(expected, "expected fingerprint")
        if want.size != len(ids):
            raise _BadEvidence(f"expected fingerprint has {want.size} values, {len(ids)} ids")
        return _f32(fingerprint(out, ids), "computed"), want
    shape = list(expected_shape) if expected_shape is not None else list(step_shape)
    if shape != list(out.shape):
        raise _BadEvidence(f"expected output shape {shape} is not the stage's output shape {list(out.shape)}")
    try:
        want = decode_activations(bytes(expected), shape, expected_dtype)
    except (ValueError, TypeError) as e:
        raise _BadEvidence(f"expected output: {e}") from None
    data, _ = encode_activations(out, expected_dtype)  # round like the wire did
    got = decode_activations(data, shape, expected_dtype)
    return got[:n_real].double().numpy().reshape(-1), want[:n_real].double().numpy().reshape(-1)


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return math.inf
    return float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), _NORM_FLOOR))


TOKEN_TIE_MARGIN = 1e-3  # relative logit gap under which two tokens count as tied (cross-kernel noise is ~1e-5)


def token_problem(logits: torch.Tensor, token: int, sampling: dict, history: list[int],
                  allowed: torch.Tensor | None = None) -> str:
    """Why `token` is not a draw these logits allow under the request's sampling ("" if it is). Same
    kernels: the (seed, position)-keyed draw reproduces it exactly. Otherwise an honest draw may differ
    only at a near-tie (greedy) or by the RNG landing on a neighbour of the candidate set (sampling), so
    a token is accepted when it is a near-tied best or a candidate of the draw. `allowed`: the grammar
    mask at this position (rebuilt with `Grammar.matcher(generated tokens so far).allowed()`); a token
    outside it is never a valid draw, and the near-tie is judged among allowed tokens."""
    try:
        params, _, _ = parse_decoding(sampling)
        sampler = Sampler(params)
        if sampler.sample(logits, history, len(history), allowed=allowed) == token:
            return ""
        ids, _ = sampler.candidates(logits, history, allowed)
    except (TypeError, ValueError) as e:
        return f"bad sampling evidence: {e}"
    if not 0 <= token < logits.numel():
        return f"token {token} outside the vocabulary"
    if allowed is not None:
        if not bool(allowed[token]):
            return f"the drawn token {token} is outside the grammar's mask"
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    best = float(logits.max())
    if float(logits[token]) >= best - TOKEN_TIE_MARGIN * max(1.0, abs(best)):
        return ""
    if not sampler.params.greedy and bool((ids == token).any()):
        return ""
    return f"the drawn token {token} is not one the logits allow (best logit {best:.4g}, its {float(logits[token]):.4g})"


LOGPROB_TOLERANCE = 1e-3  # absolute; honest logprobs differ across kernels by ~1e-5


def grammar_mask(engine: Any, sampling: dict, generated: list[int]) -> torch.Tensor | None:
    """The grammar mask the last stage drew under, rebuilt from the sampling evidence's grammar spec and the
    tokens generated before the step (None when the request had no grammar). ValueError: a spec this
    validator cannot rebuild (another library version or vocabulary) or tokens the grammar refuses."""
    _, spec, _ = parse_decoding(sampling)
    if not spec:
        return None
    return engine.grammar_compiler().from_spec(spec).matcher(generated).allowed()


def logprobs_problem(logits: torch.Tensor, token: int, sampling: dict, claimed: str) -> str:
    """Why the logprobs the stage returned (`claimed`, its committed JSON) are not these logits' ("" if they
    are): the drawn token's and each named alternative's within LOGPROB_TOLERANCE, the alternatives the best."""
    import json

    try:
        _, _, top = parse_decoding(sampling)
        got = logprob_from_record(json.loads(claimed), logits.numel(), top if top is not None else MAX_TOP_LOGPROBS + 1)
    except ValueError as e:
        return f"bad logprobs: {e}"
    want = token_logprobs(logits, token, len(got.top))
    full = torch.log_softmax(logits.detach().double().reshape(-1), 0)
    if got.token != token or abs(got.logprob - want.logprob) > LOGPROB_TOLERANCE:
        return f"the returned logprob of token {token} is {got.logprob:.6g}, the logits give {want.logprob:.6g}"
    floor = want.top[-1][1] if want.top else 0.0
    for i, v in got.top:
        if abs(float(full[i]) - v) > LOGPROB_TOLERANCE or float(full[i]) < floor - LOGPROB_TOLERANCE:
            return f"the returned top logprob of token {i} ({v:.6g}) is not the logits' ({float(full[i]):.6g})"
    return ""


def replay(engine: Any, inputs: list[dict], *, last: bool, expected: bytes, expected_dtype: str = "f32",
           expected_shape: list[int] | None = None, fp_ids: list[int] | None = None,
           mode: str | None = None, token: int = -1, sampling: dict | None = None,
           generated: list[int] | None = None, logprobs: str = "") -> ReplayResult:
    """Re-run a stage's revealed steps 0..i* on ``engine`` (its layer range, declared mode) and compare
    step i*'s output with ``expected``.

    Middle stage (``last=False``): ``expected`` is the activation payload the next stage received
    (``expected_dtype``, ``expected_shape``, default the step's input shape); compared over the first
    n_real rows after rounding the computed output to that dtype. Last stage: ``expected`` is the
    fingerprint (fp32 logits at ``fp_ids``; ``None``: the whole row). With ``token`` >= 0 and
    ``sampling``, the last stage's drawn token is checked too (``token_problem``; the history is the
    revealed steps' ``tokens``). With a grammar in ``sampling`` the token is judged under the mask rebuilt
    from ``generated`` (the tokens generated before the step); ``logprobs``: what the stage returned at the
    step (it committed to them), checked against the replayed logits.
    """
    mode = mode or engine.mode
    tol = TOLERANCE.get(mode)
    if tol is None:
        return ReplayResult(math.inf, math.nan, False, f"unknown mode {mode!r}; one of {sorted(TOLERANCE)}")
    if engine.stages[-1].last != bool(last):
        return ReplayResult(math.inf, tol, False, f"engine layers {engine.layers} but last={last}")
    cfg = engine.config
    first = bool(engine.stages[0].first)
    try:
        steps = _parse_steps(inputs, cfg.hidden, cfg.n_ctx, cfg.vocab_size if first else 0)
        try:
            out, n_real = _run(engine, steps)
        except EngineFull:
            raise
        except (EngineError, ValueError, RuntimeError) as e:  # e.g. ContextTooLong, a shape the kernels refuse
            raise _BadEvidence(f"replay failed: {type(e).__name__}: {e}") from None
        got, want = _computed_and_expected(out, n_real, last=last, expected=expected, expected_dtype=expected_dtype,
                                           expected_shape=expected_shape, step_shape=list(steps[-1].x.shape),
                                           fp_ids=fp_ids)
    except _BadEvidence as e:
        return ReplayResult(math.inf, tol, False, f"bad evidence: {e}")
    err = _rel_err(got, want)
    ok = err <= tol
    verdict = "within" if ok else "exceeds"
    detail = f"step {len(steps) - 1}: rel_err {err:.3g} {verdict} tolerance {tol:g} ({mode})"
    if ok and last and token >= 0 and sampling is not None:
        history = [int(t) for r in inputs for t in r.get("tokens", [])]
        try:
            allowed = grammar_mask(engine, sampling, [int(t) for t in generated or []])
        except ValueError as e:  # GrammarError too: the validator cannot rebuild the stage's mask
            return ReplayResult(err, tol, True, f"{detail}; token not judged: {e}")
        problem = token_problem(out, int(token), sampling, history, allowed)
        if not problem and logprobs:
            problem = logprobs_problem(out, int(token), sampling, logprobs)
        if problem:
            return ReplayResult(err, tol, False, f"{detail}; {problem}")
    return ReplayResult(err, tol, ok, detail)



def replay_expert(worker: Any, payload: bytes, expected: bytes, mode: str) -> ReplayResult:
    """Re-run one EXPERT_RUN on ``worker`` (an ExpertShardWorker holding the run's experts, in the node's mode)
    and compare its reply with the one the node sent, over every expert's rows."""
    from mesh402.engine.expert_parallel import decode_reply

    tol = TOLERANCE.get(mode)
    if tol is None:
        return ReplayResult(math.inf, math.nan, False, f"unknown mode {mode!r}; one of {sorted(TOLERANCE)}")
    try:
        got = decode_reply(worker.handle(bytes(payload)))
        want = decode_reply(bytes(expected))
    except (ValueError, KeyError, RuntimeError, struct.error) as e:
        return ReplayResult(math.inf, tol, False, f"bad evidence: {type(e).__name__}: {e}")
    if sorted(got) != sorted(want) or any(got[e].shape != want[e].shape for e in got):
        return ReplayResult(math.inf, tol, False, "the reply does not answer the run's experts and rows")
    if not got:
        return ReplayResult(0.0, tol, True, "a run with no rows")
    g = np.concatenate([got[e].double().numpy().reshape(-1) for e in sorted(got)])
    w = np.concatenate([want[e].double().numpy().reshape(-1) for e in sorted(want)])
    err = _rel_err(g, w)
    ok = err <= tol
    return ReplayResult(err, tol, ok, f"expert run: rel_err {err:.3g} {'within' if ok else 'exceeds'} tolerance "
                                      f"{tol:g} ({mode})")
