"""Spot-check tolerances and verification overhead (docs/verification.md).

    .venv/bin/python benchmarks/verify_tolerance.py [--quick]

Prints tables and writes benchmarks/results/verify_tolerance.json.

One realistic request on the bundled SmolLM2-135M: a chat prompt (~80 tokens, fixed prefill chunks) then
24 greedy decode steps (tokens from a solo exact run, teacher-forced). The stage under test receives what
layers [0, a) in exact mode send, encoded in the wire dtype; it commits its per-step output (middle stage:
the wire payload it sends on; last stage: the logits fingerprint at 256 ids). The validator replays the
revealed inputs with `mesh402.engine.replay.replay` on a separately loaded engine at sampled steps (the
first and last prefill chunk and decode steps 1, 12, 24) and we record rel_err:
- honest: the stage and the validator run the same mode; the validator with the same torch thread count
  (1) and with a different one (2); wire f32 / bf16 / f16; and a validator "on another CPU": a process
  with ATen's kernels and MKL forced down to AVX2, and to no SIMD (ATEN_CPU_CAPABILITY,
  MKL_ENABLE_INSTRUCTIONS), against the stage on this machine's native capability (AVX-512 here);
- cheats (harness/tamper.py): the stage runs a tampered engine (skip_layer at its first, middle and last
  layer, perturb 1%, requant to Q4_0), the validator an honest one; wire f32.
Stages: [15, 30) (last stage) and [10, 20) (middle stage), exact and fast mode.

Overhead:
(a) stage side, per step: blake2b of the input payload (and of the output payload on a middle stage), or
    fingerprint extraction + the last-stage step hash, plus keeping a copy of the input record; as a
    share of that step's forward time on the stage;
(b) validator: the expected replay time of one audited request (i* uniform over its steps, from the
    measured per-step replay times; the validator keeps the engine loaded) as a share of the request's
    inference time on that stage; at audit_rate 0.1 the expected cost per request is 0.1 x that share.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from mesh402.work.evidence import fingerprint_ids, last_step_hash  # noqa: E402
from mesh402.engine import Engine  # noqa: E402
from mesh402.engine.replay import TOLERANCE, fingerprint, replay  # noqa: E402
from mesh402.engine.activations import activation_hash, decode_activations, encode_activations  # noqa: E402
from mesh402.models.catalog import bundled_model_path  # noqa: E402
from harness.tamper import stage_outputs, tamper_engine, upstream_inputs  # noqa: E402

PATH = bundled_model_path()
STAGES = {"last [15,30)": (15, 30), "middle [10,20)": (10, 20)}
WIRES = ("f32", "bf16", "f16")
N_DECODE = 24
SYSTEM = ("You are a careful assistant for a small public library. Answer in plain English, keep answers short, "
          "and say when you are not sure about a fact instead of guessing.")
QUESTION = "Which three books would you suggest to someone who wants to start reading about the history of science?"


def load(a: int, b: int, mode: str) -> Engine:
    return Engine.load(PATH, mode=mode, layers=(a, b), load_tokenizer=False)


def request_tokens(quick: bool) -> tuple[list[int], int]:
    """(prompt + greedy decode tokens, prompt length) from a solo exact run."""
    solo = Engine.load(PATH, mode="exact")
    text = solo.chat_template.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    ids = solo.tokenizer.encode(text, add_special=False)
    n_dec = 8 if quick else N_DECODE
    toks = list(ids)
    with solo.new_session(len(ids) + n_dec) as s:
        logits = s.prefill(ids)
        for _ in range(n_dec):
            toks.append(int(logits.argmax()))
            logits = s.decode(toks[-1])
    return toks[:len(ids) + n_dec], len(ids)


def sampled_steps(inputs: list[dict]) -> list[int]:
    n_prefill = sum(1 for r in inputs if r["kind"] == 1)
    n = len(inputs)
    return sorted({0, n_prefill - 1, n_prefill, n_prefill + (n - n_prefill) // 2, n - 1})


def rel_errs(validator: Engine, inputs: list[dict], outs: list[bytes], steps: list[int], *, last: bool, wire: str,
             fp: list[int], threads: int) -> list[float]:
    torch.set_num_threads(threads)
    try:
        return [replay(validator, inputs[:i + 1], last=last, expected=outs[i], expected_dtype=wire, fp_ids=fp).rel_err
                for i in steps]
    finally:
        torch.set_num_threads(1)


def honest_rows(stage: str, mode: str, up: dict[str, list[dict]], fp: list[int], quick: bool,
                jobs: list[dict]) -> list[dict]:
    """Honest stage vs honest validator in this process (1 and 2 threads); appends the same cases to
    ``jobs`` for a validator process on another CPU capability."""
    a, b = STAGES[stage]
    last = b == 30
    worker, validator = load(a, b, mode), load(a, b, mode)
    rows = []
    for wire in (("f32", "bf16") if quick else WIRES):
        outs = stage_outputs(worker, up[wire], last=last, wire=wire, fp_ids=fp)
        steps = sampled_steps(up[wire])
        jobs.append({"stage": stage, "mode": mode, "wire": wire, "last": last, "inputs": up[wire], "outs": outs,
                     "steps": steps, "fp": fp})
        for threads in (1, 2):
            errs = rel_errs(validator, up[wire], outs, steps, last=last, wire=wire, fp=fp, threads=threads)
            rows.append(_row(stage, mode, "honest", f"wire {wire}, {threads} thread(s)", wire, steps, errs))
    return rows


def _row(stage: str, mode: str, kind: str, case: str, wire: str, steps: list[int], errs: list[float]) -> dict:
    return {"stage": stage, "mode": mode, "kind": kind, "case": case, "wire": wire, "steps": steps,
            "rel_err": errs, "max": max(errs), "min": min(errs)}


# A validator on another CPU: ATen's vectorized kernels (the fast-mode int4/int8 matmuls, softmax, norms)
# and MKL's sgemm (exact mode) forced down to an older instruction set, in a fresh process (both are read
# at start-up). This machine's native capability is the stage's.
CPU_PROXIES = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
               "no-simd": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}}


def cross_cpu_rows(jobs: list[dict]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "jobs.pkl"
        path.write_bytes(pickle.dumps(jobs))
        for name, env in CPU_PROXIES.items():
            res = subprocess.run([sys.executable, __file__, "--replay-jobs", str(path)], env={**os.environ, **env},
                                 capture_output=True, text=True, check=True)
            out = json.loads(res.stdout.strip().splitlines()[-1])
            for job, errs in zip(jobs, out["errs"]):
                rows.append(_row(job["stage"], job["mode"], "honest",
                                 f"wire {job['wire']}, validator {name} ({out['capability']})", job["wire"],
                                 job["steps"], errs))
    return rows


def replay_jobs(path: str) -> None:
    """The validator process of cross_cpu_rows: replay every job, print the rel_errs as JSON."""
    torch.set_num_threads(1)
    jobs = pickle.loads(Path(path).read_bytes())
    engines: dict[tuple[str, str], Engine] = {}
    errs = []
    for j in jobs:
        key = (j["stage"], j["mode"])
        if key not in engines:
            engines[key] = load(*STAGES[j["stage"]], j["mode"])
        errs.append(rel_errs(engines[key], j["inputs"], j["outs"], j["steps"], last=j["last"], wire=j["wire"],
                             fp=j["fp"], threads=1))
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "errs": errs}))


def cheat_rows(stage: str, mode: str, up: dict[str, list[dict]], fp: list[int], quick: bool) -> list[dict]:
    a, b = STAGES[stage]
    last = b == 30
    validator = load(a, b, mode)
    cheats: list[tuple[str, dict]] = [("perturb", {}), ("requant", {})]
    for li in ((a, b - 1) if quick else (a, (a + b) // 2, b - 1)):
        cheats.append((f"skip_layer {li}", {"layer": li}))
    rows = []
    wire = "f32"
    steps = sampled_steps(up[wire])
    for name, kw in cheats:
        cheater = tamper_engine(load(a, b, mode), name.split()[0], seed=1, **kw)
        outs = stage_outputs(cheater, up[wire], last=last, wire=wire, fp_ids=fp)
        errs = rel_errs(validator, up[wire], outs, steps, last=last, wire=wire, fp=fp, threads=1)
        rows.append(_row(stage, mode, "cheat", name, wire, steps, errs))
    return rows


# ---------------------------------------------------------------------------- overhead

def _best(fn: Any, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


@torch.inference_mode()
def forward_times(engine: Engine, inputs: list[dict]) -> tuple[list[float], list[torch.Tensor]]:
    """Per-step forward time of the stage over the whole request, and each step's output."""
    ts, outs = [], []
    with engine.new_session(max(r["pos"] + r["shape"][0] for r in inputs)) as s:
        for r in inputs:
            x = decode_activations(r["data"], r["shape"], r["dtype"])
            t0 = time.perf_counter()
            outs.append(s.forward(x, r["pos"], r["n_real"]))
            ts.append(time.perf_counter() - t0)
    return ts, outs


def record_cost(r: dict, out: torch.Tensor, *, last: bool, fp: list[int], wire: str) -> float:
    """Stage-side cost of one step's verification records: input hash, output hash or fingerprint +
    last-step hash, a copy of the input record."""
    payload = None if last else encode_activations(out, wire)[0]  # the stage encodes it anyway to send it

    def work() -> None:
        activation_hash(r["data"])
        _ = dict(r, data=bytes(r["data"]))
        if last:
            last_step_hash(7, fingerprint(out, fp))  # the token is drawn anyway
        else:
            activation_hash(payload)

    return _best(work, 20)


def overhead_row(stage: str, mode: str, up: dict[str, list[dict]], fp: list[int]) -> dict:
    a, b = STAGES[stage]
    last = b == 30
    inputs = up["f32"]
    eng = load(a, b, mode)
    forward_times(eng, inputs)  # warm up
    ts, outs = forward_times(eng, inputs)
    rec = [record_cost(r, o, last=last, fp=fp, wire="f32") for r, o in zip(inputs, outs)]
    dec = [i for i, r in enumerate(inputs) if r["kind"] == 2]
    pre = [i for i, r in enumerate(inputs) if r["kind"] == 1]
    # replay(i*) = fixed cost (fresh session, decoding, compare) + the forwards of steps 0..i*: time a few
    # i*, fit the fixed part, and average over i* uniform as the entry draws it
    replay_t = {}
    for i in sorted({0, len(ts) // 2, len(ts) - 1}):
        want = fingerprint(outs[i], fp) if last else encode_activations(outs[i], "f32")[0]
        replay_t[i] = _best(lambda i=i, want=want: replay(eng, inputs[:i + 1], last=last, expected=want, fp_ids=fp), 2)
    prefix = [sum(ts[:i + 1]) for i in range(len(ts))]
    fixed = statistics.median(t - prefix[i] for i, t in replay_t.items())
    expected_replay = statistics.mean(fixed + p for p in prefix)
    inference = sum(ts)
    return {
        "stage": stage, "mode": mode,
        "decode_step_ms": 1e3 * statistics.median(ts[i] for i in dec),
        "prefill_step_ms": 1e3 * statistics.median(ts[i] for i in pre),
        "record_decode_us": 1e6 * statistics.median(rec[i] for i in dec),
        "record_prefill_us": 1e6 * statistics.median(rec[i] for i in pre),
        "record_share_decode": statistics.median(rec[i] / ts[i] for i in dec),
        "record_share_prefill": statistics.median(rec[i] / ts[i] for i in pre),
        "record_share_request": sum(rec) / inference,
        "inference_ms": 1e3 * inference,
        "replay_timed_ms": {str(i): 1e3 * t for i, t in replay_t.items()},
        "replay_fixed_ms": 1e3 * fixed,
        "replay_expected_ms": 1e3 * expected_replay,
        "replay_share": expected_replay / inference,
        "share_at_audit_0_1": 0.1 * expected_replay / inference,
    }


# ---------------------------------------------------------------------------- report

def summary(rows: list[dict]) -> list[dict]:
    out = []
    for mode in ("exact", "fast"):
        for what, other in (("honest max, same CPU", False), ("honest max, other CPU", True)):
            hon = [r for r in rows if r["mode"] == mode and r["kind"] == "honest"
                   and ("validator" in r["case"]) == other]
            if hon:
                worst = max(hon, key=lambda r: r["max"])
                out.append({"mode": mode, "what": what, "rel_err": worst["max"],
                            "where": f"{worst['stage']}, {worst['case']}"})
        for cheat in ("skip_layer", "perturb", "requant"):
            ch = [r for r in rows if r["mode"] == mode and r["kind"] == "cheat" and r["case"].startswith(cheat)]
            if ch:
                least = min(ch, key=lambda r: r["min"])
                out.append({"mode": mode, "what": f"{cheat} min", "rel_err": least["min"],
                            "where": f"{least['stage']}, {least['case']}"})
        out.append({"mode": mode, "what": "TOLERANCE", "rel_err": TOLERANCE[mode], "where": "mesh402/engine/replay.py"})
    return out


def print_report(rows: list[dict], summ: list[dict], over: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=170)
    t = Table(title="Replay rel_err at sampled steps (validator honest, 1 thread unless said)")
    for col in ("stage", "mode", "kind", "case", "min", "max", "per step"):
        t.add_column(col, justify="right" if col in ("min", "max") else "left")
    for r in rows:
        t.add_row(r["stage"], r["mode"], r["kind"], r["case"], f"{r['min']:.3g}", f"{r['max']:.3g}",
                  " ".join(f"{e:.2g}" for e in r["rel_err"]))
    c.print(t)
    s = Table(title="Tolerance: honest maximum vs smallest cheat distance")
    for col in ("mode", "what", "rel_err", "where"):
        s.add_column(col, justify="right" if col == "rel_err" else "left")
    for r in summ:
        s.add_row(r["mode"], r["what"], f"{r['rel_err']:.3g}", r["where"])
    c.print(s)
    o = Table(title="Verification overhead (1 thread; whole request on the stage, f32 wire)")
    for col in ("stage", "mode", "decode step ms", "record us/decode step", "share decode", "share prefill",
                "inference ms", "E[replay] ms", "replay share", "at audit 0.1"):
        o.add_column(col, justify="left" if col in ("stage", "mode") else "right")
    for r in over:
        o.add_row(r["stage"], r["mode"], f"{r['decode_step_ms']:.1f}", f"{r['record_decode_us']:.1f}",
                  f"{r['record_share_decode']:.2%}", f"{r['record_share_prefill']:.2%}", f"{r['inference_ms']:.0f}",
                  f"{r['replay_expected_ms']:.0f}", f"{r['replay_share']:.2f}", f"{r['share_at_audit_0_1']:.1%}")
    c.print(o)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 decode steps, fewer cases (~2 min)")
    ap.add_argument("--replay-jobs", help=argparse.SUPPRESS)  # internal: the other-CPU validator process
    args = ap.parse_args()
    if args.replay_jobs:
        return replay_jobs(args.replay_jobs)
    torch.set_num_threads(1)
    t0 = time.time()
    tokens, n_prompt = request_tokens(args.quick)
    fp = fingerprint_ids("verify-tolerance-bench", 49152)
    rows: list[dict] = []
    over: list[dict] = []
    jobs: list[dict] = []
    ups: dict[int, dict[str, list[dict]]] = {}
    for a, _ in STAGES.values():
        e0 = load(0, a, "exact")
        ups[a] = {w: upstream_inputs(e0, tokens, n_prompt, w) for w in WIRES}
    for mode in ("exact", "fast"):
        for stage, (a, _) in STAGES.items():
            rows += honest_rows(stage, mode, ups[a], fp, args.quick, jobs)
            rows += cheat_rows(stage, mode, ups[a], fp, args.quick)
            over.append(overhead_row(stage, mode, ups[a], fp))
    rows += cross_cpu_rows(jobs)
    summ = summary(rows)
    print_report(rows, summ, over)
    out = {"model": PATH.name, "prompt_tokens": n_prompt, "decode_steps": len(tokens) - n_prompt,
           "steps": len(ups[15]["f32"]), "machine": platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "load_avg": os.getloadavg(), "seconds": time.time() - t0,
           "tolerance": TOLERANCE, "summary": summ, "rows": rows, "overhead": over}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "verify_tolerance.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
