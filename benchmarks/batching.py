"""Continuous batching and speculative decoding on the bundled model, in-process serving loop.

For each mode and 1, 2, 4, 8, 16 concurrent streams (each a different prompt, `--tokens` tokens greedy):
aggregate tok/s and per-stream TTFT p50/p99, with batching off (`max_batch=1`: requests take turns, the
unbatched step path of main) and on (`max_batch=16`), side by side in one run. Then speculative decoding
(prompt-lookup drafts) against plain decoding on one stream: tok/s and the draft acceptance rate. First,
the engine alone: one batched decode step (`Engine.decode_batch`) at widths 1, 2, 4, 8, 16 (ms per step and
rows per second), the ceiling the serving loop's own work (prefill, sampling, scheduling) is measured against.

What it drives is `serving.generation.generate` over `LocalModel` (the loop `mesh402 serve` runs per model),
not HTTP, and not a 2-stage split (benchmarks/split_batching.py). Last, llama.cpp side by side when
llama-cpp-python is installed (`bash scripts/bench-deps.sh`): the same token ids and token counts, N sequences
decoded as one batch per step through its low-level API, weight repack off (the path that can batch). All torch work runs on one engine thread,
as in a node. Prints a table and writes
benchmarks/results/batching.json.

    .venv/bin/python benchmarks/batching.py [--quick] [--threads 2] [--modes fast,exact]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ["Tell me a story about a dragon.", "The capital of France is", "Write a haiku about the sea.",
           "1, 2, 3, 4,", "def fib(n):", "Explain photosynthesis simply.", "Once upon a time",
           "List three colors:", "What is 7 times 8?", "The best way to learn is", "Hello, my name is",
           "Describe a sunset.", "Why is the sky blue?", "Give me a recipe for pancakes.", "import numpy as np\n",
           "Q: Who wrote Hamlet?\nA:"]
SPEC_PROMPT = ("Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape. "
               "Again: apple, banana, cherry, date, elderberry, fig, grape. Again:")


async def _stream(lm, ids: list[int], n: int, sampling) -> tuple[int, float, int, int]:
    from mesh402.serving.generation import Finished, GenerationRequest, generate

    st = await lm.open(len(ids) + n + 1, sampling)
    t0 = time.perf_counter()
    ttft = 0.0
    k = 0
    async for ev in generate(GenerationRequest(ids, n, sampling), st, lm.tokenizer, []):
        if isinstance(ev, Finished):
            k, ttft = ev.completion_tokens, ev.ttft_s
    del t0
    return k, ttft, getattr(st, "accepted", 0), getattr(st, "drafted", 0)  # drafts (a split does not draft)


def _step_ms(eng, prompt: list[int], width: int, n: int) -> float:
    """ms per batched decode step of `width` sessions (engine thread)."""
    ss = [eng.new_session(len(prompt) + n + 8) for _ in range(width)]
    try:
        for s in ss:
            s.prefill(prompt)
        eng.decode_batch(ss, [42] * width)
        t0 = time.perf_counter()
        for _ in range(n):
            eng.decode_batch(ss, [42] * width)
        return (time.perf_counter() - t0) / n * 1000
    finally:
        for s in ss:
            s.close()


def _llamacpp_worker(spec: dict) -> list[dict]:
    """llama.cpp decoding N sequences batched (llama-cpp-python's low-level API: one `llama_decode` per step
    with a row per sequence, as llama-server's --parallel N does), greedy, the same token ids. The prompts go
    in as one batch; the weight repack is off (in 0.3.36 it crashes on multi-token batches)."""
    import numpy as np

    import llama_cpp as L
    from harness.llama_server import no_repack

    no_repack()
    L.llama_backend_init()
    model = L.llama_model_load_from_file(spec["model"].encode(), L.llama_model_default_params())
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    prompts, n, threads = spec["prompts"], spec["tokens"], spec["threads"]
    out = []
    for streams in spec["streams"]:
        ps = [prompts[i % len(prompts)] for i in range(streams)]
        per_seq = (max(len(p) for p in ps) + n + 8 + 255) // 256 * 256
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = per_seq * streams, streams, False
        cp.n_batch = cp.n_ubatch = max(512, sum(len(p) for p in ps))
        cp.n_threads = cp.n_threads_batch = threads
        ctx = L.llama_init_from_model(model, cp)
        batch = L.llama_batch_init(cp.n_batch, 0, 1)

        def submit(entries: list[tuple[int, int, int, bool]]) -> None:
            for i, (tok, pos, seq, logits) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, logits
            batch.n_tokens = len(entries)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        def argmax(i: int) -> int:
            return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))

        submit([(ps[0][0], 0, 0, True)])  # warm-up, then a clean memory
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        entries = [(t, j, s, j == len(p) - 1) for s, p in enumerate(ps) for j, t in enumerate(p)]
        submit(entries)
        last = [i for i, e in enumerate(entries) if e[3]]
        toks = [argmax(i) for i in last]
        ttft = time.perf_counter() - t0
        pos = [len(p) for p in ps]
        for _ in range(n - 1):
            submit([(toks[s], pos[s], s, True) for s in range(streams)])
            toks = [argmax(s) for s in range(streams)]
            pos = [q + 1 for q in pos]
        dt = time.perf_counter() - t0
        out.append({"what": "llamacpp_streams", "engine": "llama.cpp no-repack, batched", "streams": streams,
                    "tok_s": streams * n / dt, "ttft_s": ttft, "tokens": streams * n})
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    L.llama_model_free(model)
    return out


def _llamacpp_rows(model: str, prompts: list[list[int]], tokens: int, threads: int, streams: list[int]) -> list[dict]:
    """_llamacpp_worker in its own process (its thread pool apart from torch's); [] when not installed."""
    import subprocess

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: run `bash scripts/bench-deps.sh` for the llama.cpp rows")
        return []
    spec = {"model": model, "prompts": prompts, "tokens": tokens, "threads": threads, "streams": streams}
    r = subprocess.run([sys.executable, __file__, "--llamacpp-worker"], input=json.dumps(spec), text=True,
                       capture_output=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, streams 1/4/8, fast mode only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--modes", default="fast,exact")
    ap.add_argument("--llamacpp-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.llamacpp_worker:
        print(json.dumps(_llamacpp_worker(json.loads(sys.stdin.read()))))
        return

    import torch

    from mesh402.engine import Engine
    from mesh402.engine.runtime_env import configure_torch
    from mesh402.engine.sampling import SamplingParams
    from mesh402.models.catalog import bundled_model_path
    from mesh402.serving.generation import LocalModel

    # Every torch op on one thread, as in a node (node.py loads and steps on its one engine thread): a second
    # thread running torch ops gets its own OpenMP team, and two teams on 2 cores made each 1-row step ~2x
    # slower (7.5 -> 15-20 ms, measured), for the thread that loaded the model as well.
    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    ex.submit(configure_torch, a.threads).result()
    streams_list = [1, 4, 8] if a.quick else [1, 2, 4, 8, 16]
    modes = ["fast"] if a.quick else a.modes.split(",")
    n = 16 if a.quick else a.tokens
    greedy = SamplingParams(temperature=0, seed=0)
    rows: list[dict] = []
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    for mode in modes:
        eng = ex.submit(Engine.load, bundled_model_path(), mode=mode, max_sessions=32).result()
        ids = [eng.tokenizer.encode(p) for p in PROMPTS]
        tok_n = n if mode == "fast" else max(4, n // 4)
        for width in ([1, 8] if a.quick else [1, 2, 4, 8, 16]):
            ms = ex.submit(_step_ms, eng, ids[0], width, 10 if mode == "fast" else 3).result()
            rows.append({"what": "engine_step", "mode": mode, "width": width, "step_ms": ms, "rows_s": width * 1000 / ms})
            print(f"{mode:5} engine step width={width:2}  {ms:7.2f} ms  {width * 1000 / ms:7.1f} rows/s", flush=True)

        async def run(max_batch: int, streams: int, spec: int = 0, prompts=None, tokens=tok_n, eng=eng, ids=ids,
                      row_cost=None):
            lm = LocalModel(eng, ex, prefix_cache=None, max_batch=max_batch, speculative_k=spec,
                            draft_row_cost=row_cost)
            ps = prompts or [ids[i % len(ids)] for i in range(streams)]
            await _stream(lm, ps[0], 2, greedy)  # warm-up (kernel set-up, rope tables, the width probe)
            t0 = time.perf_counter()
            res = await asyncio.gather(*(_stream(lm, p, tokens, greedy) for p in ps))
            dt = time.perf_counter() - t0
            total = sum(r[0] for r in res)
            return {"tok_s": total / dt, "ttft_p50_s": statistics.median(r[1] for r in res),
                    "ttft_p99_s": _pct([r[1] for r in res], 0.99), "tokens": total, "accepted": sum(r[2] for r in res),
                    "drafted": sum(r[3] for r in res),
                    "steps": lm.scheduler.steps if lm.scheduler else None}

        for streams in streams_list:
            for mb in (1, 16):
                r = asyncio.run(run(mb, streams))
                rows.append({"what": "streams", "mode": mode, "streams": streams, "max_batch": mb, **r})
                print(f"{mode:5} streams={streams:2} max_batch={mb:2}  {r['tok_s']:7.1f} tok/s  "
                      f"TTFT p50 {r['ttft_p50_s'] * 1000:7.0f} ms  p99 {r['ttft_p99_s'] * 1000:7.0f} ms", flush=True)
        # plain; every n-gram draft verified (draft_row_cost=0); as many as pay (the default policy);
        # on a prompt that repeats itself and on one that does not
        for which, text in (("repetitive", SPEC_PROMPT), ("story", PROMPTS[0])):
            for label, k, cost in (("plain", 0, None), ("fixed k=4", 4, 0.0), ("adaptive k<=4", 4, None)):
                r = asyncio.run(run(1 if k == 0 else 16, 1, spec=k, prompts=[eng.tokenizer.encode(text)],
                                    tokens=2 * tok_n, row_cost=cost))
                rows.append({"what": "speculative", "mode": mode, "prompt": which, "policy": label,
                             "draft_tokens": k, **r})
                print(f"{mode:5} speculative {which:10} {label:13} {r['tok_s']:7.1f} tok/s  accepted "
                      f"{r['accepted']}/{r['drafted']} drafts ({r['tokens'] - r['accepted']} forwards for "
                      f"{r['tokens']} tokens)", flush=True)
        del eng
    # llama.cpp side by side: the same prompts' token ids, the same number of greedy tokens per stream
    for r in _llamacpp_rows(str(bundled_model_path()), ids, n, a.threads, streams_list):  # ids: one vocabulary
        rows.append(r)
        print(f"llama.cpp streams={r['streams']:2} batched  {r['tok_s']:7.1f} tok/s  TTFT {r['ttft_s'] * 1000:7.0f} ms",
              flush=True)
    out = {"threads": a.threads, "torch": torch.__version__, "loadavg_at_start": load, "rows": rows,
           "note": "in-process serving loop (LocalModel + generate), greedy; max_batch=1 is the unbatched path"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batching.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'batching.json'}")


if __name__ == "__main__":
    main()
