"""Busy splits: concurrent streams through a 2-stage pipeline split against the model served whole.

For each mode (fast, exact) and 1, 2, 4, 8 concurrent streams (each a different prompt, greedy, `--tokens`
tokens; exact mode a quarter of them), side by side in one run:

- solo, turns:   the whole model, `max_batch=1` (requests take turns: main's unbatched path)
- solo, batched: the whole model, continuous batching (`max_batch=8`, serving/scheduler.py)
- split, turns:  stage 0 on the host + a StageWorker for layers [15, 30) over MemoryLink, `max_batch=1`
                 (each session's step runs alone on every stage)
- split, batched: the same split, `max_batch=8`: the host's and the worker's decode rows of all sessions in
                 flight run as one forward per stage (serving/stage_batch.py), and the stages work on
                 different sessions' steps at the same time

Each split stage has its own engine thread (as separate nodes have); all share this machine's cores and the
`--threads` torch threads. Reported: aggregate tok/s (all streams' tokens over the wall time) and per-stream
TTFT p50/p99 (`Finished.ttft_s`), the batch widths the split's stages ran, and the load average. In-process
(the real PipelineStepper and StageWorker over MemoryLink, no QUIC, no processes), so only the compute and
the protocol are measured. Prints a table and writes benchmarks/results/split_batching.json.

    .venv/bin/python benchmarks/split_batching.py [--quick] [--threads 2] [--tokens 32] [--modes fast,exact]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

from batching import PROMPTS, _pct, _stream  # noqa: E402
from split import build_inproc  # noqa: E402

CONFIGS = [("solo", 1, 1), ("solo", 1, 8), ("split", 2, 1), ("split", 2, 8)]  # (name, stages, max_batch)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def _round(model: Any, ids: list[list[int]], n: int) -> dict:
    from mesh402.engine.sampling import SamplingParams

    greedy = SamplingParams(temperature=0, seed=0)
    await _stream(model, ids[0], 2, greedy)  # warm-up (kernel set-up, rope tables, the width probe)
    t0 = time.perf_counter()
    res = await asyncio.gather(*(_stream(model, p, n, greedy) for p in ids))
    dt = time.perf_counter() - t0
    total = sum(r[0] for r in res)
    return {"tok_s": total / dt, "ttft_p50_s": statistics.median(r[1] for r in res),
            "ttft_p99_s": _pct([r[1] for r in res], 0.99), "tokens": total, "wall_s": dt}


def _widths(model: Any) -> dict[str, dict[int, int]]:
    """Batch width -> batches, per batching stage of a split (host, then each worker)."""
    out: dict[str, dict[int, int]] = {}
    if getattr(model, "rows", None) is not None:
        out["host"] = dict(sorted(model.rows.widths.items()))
    for name, w in getattr(model, "bench_workers", {}).items():
        widths: dict[int, int] = {}
        for b in w.batchers.values():
            for k, v in b.widths.items():
                widths[k] = widths.get(k, 0) + v
        if widths:
            out[name] = dict(sorted(widths.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 tokens, streams 1/4/8, fast mode only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--modes", default="fast,exact")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))

    import torch

    from mesh402.engine.runtime_env import configure_torch

    configure_torch(a.threads)
    streams_list = [1, 4, 8] if a.quick else [1, 2, 4, 8]
    modes = ["fast"] if a.quick else a.modes.split(",")
    n = 16 if a.quick else a.tokens
    load_start = _load()
    rows: list[dict] = []
    ex = ThreadPoolExecutor(1)
    stage_ex = [ThreadPoolExecutor(1)]  # the worker stage's own engine thread
    print(f"load average at start: {load_start}; torch threads {a.threads}", flush=True)
    print(f"{'mode':5} {'streams':>7} {'config':15} {'tok/s':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}  widths")
    for mode in modes:
        engines: dict = {}
        tok_n = n if mode == "fast" else max(4, n // 4)
        for streams in streams_list:
            for name, stages, mb in CONFIGS:
                model = build_inproc(mode, stages, ex, engines=engines, max_batch=mb, stage_ex=stage_ex)
                if stages == 1:  # no KV prefix reuse: every stream computes its whole prompt
                    model.prefix_cache = None
                else:
                    model.prefix = None
                tok = model.tokenizer
                ids = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(streams)]
                r = asyncio.run(_round(model, ids, tok_n))
                widths = _widths(model)
                row = {"mode": mode, "streams": streams, "config": f"{name}, {'batched' if mb > 1 else 'turns'}",
                       "stages": stages, "max_batch": mb, "load": _load(), "widths": widths, **r}
                rows.append(row)
                print(f"{mode:5} {streams:7d} {row['config']:15} {r['tok_s']:8.1f} {r['ttft_p50_s'] * 1000:12.0f} "
                      f"{r['ttft_p99_s'] * 1000:12.0f}  {widths}", flush=True)
        engines.clear()
    out = {"threads": a.threads, "torch": torch.__version__, "loadavg_at_start": load_start,
           "loadavg_at_end": _load(), "cpus": os.cpu_count(), "rows": rows,
           "note": "in-process: LocalModel (solo) and PipelineModel + StageWorker over MemoryLink (2-stage split, "
                   "layers [0,15) + [15,30)), greedy, generate() loop; widths = host-stage batch width -> batches"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "split_batching.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'split_batching.json'}")


if __name__ == "__main__":
    main()
