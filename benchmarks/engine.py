"""Engine benchmark: mesh402 (exact and fast modes) vs llama.cpp on the same GGUF, side by side.

    .venv/bin/python benchmarks/engine.py [--model PATH | --synthetic Q4_K|Q8_0] [--threads 1]
                                          [--prompt-tokens 128] [--decode-tokens 64] [--no-exact]
                                          [--device cpu|cuda|cuda:N] [--rounds N]

Each engine runs in its own subprocess so resident memory is measured cleanly: RSS growth from
loading, and the peak during decode. Prints a table and writes benchmarks/results/engine[-NAME].json.
llama.cpp comes from llama-cpp-python (`bash scripts/bench-deps.sh` installs it; a ~4 minute build), on two
paths, both reported, each row naming its path:
- `repack`: its CPU weight repack (AMX/AVX kernels) on, which in 0.3.36 crashes on multi-token batches on CPUs
  with AMX, so prompt and decode are fed one token per eval (n_batch = n_ubatch = 1): its fastest decode here;
- `no-repack`: the repack off (`use_extra_bufts = False`, patched into `llama_model_default_params`, which
  `Llama()` has no switch for), so the prompt is one batched eval.
mesh402's decode is compared with the faster of the two. `--synthetic` writes a ~1B llama-shaped model with
random weights (harness/synthetic_gguf.py) where decode is bound by memory bandwidth: the table then shows GB/s
of weights read per second of decode against the machine's measured read bandwidth.

`--device cuda` (or cuda:N) loads mesh402's engines on that GPU (benchmarks/devices.py): timed regions end with
torch.cuda.synchronize(), the bandwidth is the GPU's, the table adds torch's peak GPU memory beside RSS, the
llama.cpp rows run only where llama-cpp-python is importable (offloaded to the GPU if its build can), and the
results go to engine-cuda[-NAME].json, beside the CPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

import devices  # noqa: E402  # benchmarks/devices.py: the --device check, GPU timing and memory


class PeakRSS:
    """This process's peak RSS over the block: the kernel's high-water mark (Linux: reset through
    /proc/self/clear_refs, read from VmHWM), so nothing runs beside the measured code; elsewhere a side
    thread samples every 5 ms (which perturbs the timing of a 2-thread run on 2 cores: a measured 45% on
    the 1B model, through the GIL and the cores it takes)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._hwm = self._reset_hwm()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _read_hwm() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> "PeakRSS":
        if not self._hwm:
            self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hwm:
            self.peak = max(self.peak, self._read_hwm())
            return
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def prompt_ids(tokenizer_encode, n: int) -> list[int]:
    text = ("The history of the city goes back many centuries, and its people have long traded along the "
            "river, building bridges, markets and libraries that still stand today. ") * 20
    ids = tokenizer_encode(text)
    return ids[:n]


def worker_mesh402(model: str, mode: str, threads: int, n_prompt: int, n_decode: int, device: str = "cpu") -> dict:
    from mesh402.engine import Engine
    from mesh402.engine.runtime_env import configure_torch, warm_up

    configure_torch(threads)
    # Baseline after torch's one-off library set-up (oneDNN/MKL buffers): that is the process's cost,
    # not the model's. Resident = RSS growth from loading + the peak during prefill and decode.
    warm_up()
    gpu = devices.GpuMemory(device) if devices.is_cuda(device) else None  # its baseline: after the CUDA context
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    eng = Engine.load(model, mode=mode, device=device)
    devices.sync(device)  # weights copied to the GPU asynchronously are part of loading
    load_s = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss
    gpu_mem = {"gpu_load_mb": gpu.now_mib(), "gpu_load_peak_mb": gpu.peak_mib()} if gpu else {}
    with PeakRSS() as mem:  # the peak while serving: prefill and decode
        ids = prompt_ids(lambda t: eng.tokenizer.encode(t, add_special=False), n_prompt)
        # warm-up run so one-off allocations are not counted as speed
        s = eng.new_session(len(ids) + n_decode + 1)
        s.prefill(ids[:32])
        s.close()
        s = eng.new_session(len(ids) + n_decode + 1)
        if gpu:
            gpu.reset_peak()  # the peak while serving, as RSS's
        devices.sync(device)  # the warm-up's queued work is not the prefill's
        t0 = time.perf_counter()
        logits = s.prefill(ids)
        tok = int(logits.argmax())
        devices.sync(device)
        ttft = time.perf_counter() - t0
        out = [tok]
        t1 = time.perf_counter()
        for _ in range(n_decode - 1):
            tok = int(s.decode(tok).argmax())
            out.append(tok)
        devices.sync(device)
        decode_s = time.perf_counter() - t1
        s.close()
    if gpu:
        gpu_mem["gpu_peak_mb"] = gpu.peak_mib()
    return {"engine": f"mesh402 {mode}", "load_s": load_s, "prefill_tok_s": len(ids) / ttft, "ttft_s": ttft,
            "decode_tok_s": (n_decode - 1) / decode_s, "rss_load_mb": (rss_loaded - rss0) / 2**20,
            "rss_peak_mb": (mem.peak - rss0) / 2**20, **gpu_mem, "tokens": out, "prompt": ids}


def worker_membw(threads: int, device: str = "cpu") -> dict:
    """The machine's memory read bandwidth: a sum over 1 GiB (far beyond any cache), best of 5. On a GPU, the
    device memory's: 4 GiB (a read takes ~1 ms, so a launch's microseconds do not count), best of 20."""
    import torch

    torch.set_num_threads(threads)
    cuda = devices.is_cuda(device)
    x = torch.ones(2**30 if cuda else 2**28, dtype=torch.float32, device=device)  # 4 GiB on a GPU, else 1 GiB
    x.sum()
    devices.sync(device)
    best = 0.0
    for _ in range(20 if cuda else 5):
        t0 = time.perf_counter()
        x.sum()
        devices.sync(device)
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0))
    return {"read_gb_s": best / 1e9, "threads": threads}


def worker_llamacpp(model: str, threads: int, n_prompt: int, n_decode: int, teacher: list[int] | None,
                    prompt: list[int], repack: bool, device: str = "cpu") -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    from harness.llama_server import no_repack

    if not repack:  # Llama() has no switch for the CPU weight repack: default model params without it
        no_repack()
    batch = 1 if repack else 512  # the repack crashes on multi-token batches: one token per eval
    # On a GPU run, every layer offloaded where llama.cpp was built with GPU support (a CPU build ignores it)
    offload = {"n_gpu_layers": -1} if devices.is_cuda(device) else {}
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=batch,
                n_ubatch=batch, verbose=False, logits_all=False, **offload)
    load_s = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss
    with PeakRSS() as mem:  # the peak while serving: prefill and decode
        ids = prompt[:n_prompt]
        llm.eval(ids[:4])
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(llm._ctx.get_logits()[: llm.n_vocab()]))
        ttft = time.perf_counter() - t0
        out = [tok]
        t1 = time.perf_counter()
        for _ in range(n_decode - 1):
            llm.eval([tok])
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
            out.append(tok)
        decode_s = time.perf_counter() - t1
        agree = None
        if teacher:
            # Teacher-forced: feed mesh402's exact-mode tokens, compare llama.cpp's argmax at each step.
            llm.reset()
            llm.eval(ids)
            hits = 0
            for i, t in enumerate(teacher):
                pred = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
                hits += pred == t
                llm.eval([t])
            agree = hits / len(teacher)
    where = {"llamacpp_gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())} if offload else {}
    return {"engine": f"llama.cpp {'repack' if repack else 'no-repack'}", "load_s": load_s, "prefill_tok_s": len(ids) / ttft, "ttft_s": ttft,
            "decode_tok_s": (n_decode - 1) / decode_s, "rss_load_mb": (rss_loaded - rss0) / 2**20,
            "rss_peak_mb": (mem.peak - rss0) / 2**20, "tokens": out, "top1_vs_exact": agree, **where}


def run_worker(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": args[args.index("--threads") + 1]}
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_mode(mode: str, common: list[str], device: str, failed: dict[str, str]) -> dict | None:
    """One mesh402 mode's worker. On the CPU a failure ends the run, as it always has; on a GPU it is recorded
    and the other rows still run (a GPU machine's minutes are few: one broken mode must not lose the rest)."""
    try:
        return run_worker([mode, *common])
    except RuntimeError as e:
        if device == "cpu":
            raise
        failed[f"mesh402 {mode}"] = str(e)
        print(f"mesh402 {mode} failed on {device}: {str(e)[-1500:]}", flush=True)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M Q4_1)")
    ap.add_argument("--synthetic", choices=["Q4_K", "Q8_0"], default=None,
                    help="benchmark a synthetic ~1B llama-shaped model in this quantization (written once into "
                         "benchmarks/results/)")
    ap.add_argument("--no-exact", action="store_true", help="skip mesh402's exact mode (slow on a 1B model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="torch device of mesh402's engines: cpu (default), cuda or cuda:N")
    ap.add_argument("--rounds", type=int, default=1,
                    help="decode measured this many times for mesh402 fast and llama.cpp's faster path, the two "
                         "alternating (which goes first swaps each round), with the median ratio reported: on a "
                         "machine whose memory bandwidth drifts, one run of each is a coin toss near 1.0x")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error(f"--rounds must be at least 1, not {a.rounds}")
    if a.worker is None:
        devices.require_device(a.device)  # one line here, not a traceback from a worker's engine load
    if a.model is None and a.worker is None and a.synthetic:
        from harness.synthetic_gguf import write_synthetic_llama
        from mesh402.models.catalog import bundled_model_path

        RESULTS.mkdir(parents=True, exist_ok=True)
        a.model = str(write_synthetic_llama(RESULTS / f"synthetic-llama-1b-{a.synthetic.lower()}.gguf",
                                            bundled_model_path(), a.synthetic))
    if a.model is None:
        from mesh402.models.catalog import bundled_model_path

        a.model = str(bundled_model_path())
    if a.worker is not None:
        kind = a.worker[0]
        if kind in ("llamacpp-repack", "llamacpp-norepack"):
            res = worker_llamacpp(a.model, a.threads, a.prompt_tokens, a.decode_tokens,
                                  json.loads(a.teacher) if a.teacher else None, json.loads(a.prompt_ids),
                                  repack=kind == "llamacpp-repack", device=a.device)
        elif kind == "membw":
            res = worker_membw(a.threads, a.device)
            if devices.is_cuda(a.device):  # the card's name and versions, read where CUDA is already set up
                res.update(devices.describe(a.device))
        else:
            res = worker_mesh402(a.model, kind, a.threads, a.prompt_tokens, a.decode_tokens, a.device)
        print(json.dumps(res))
        return
    common = ["--model", a.model, "--threads", str(a.threads), "--prompt-tokens", str(a.prompt_tokens),
              "--decode-tokens", str(a.decode_tokens), "--device", a.device]
    gpu = devices.is_cuda(a.device)
    failed: dict[str, str] = {}  # row -> its worker's stderr (a GPU run goes on without it)
    notes: list[str] = []
    fast = run_mode("fast", common, a.device, failed)
    rows = [fast] if fast else []
    reference = fast  # whose tokens the others are compared with: exact mode's, when it runs
    if not a.no_exact:
        exact = run_mode("exact", common, a.device, failed)
        if exact:
            rows.insert(0, exact)
            reference = exact
            if fast:
                fast["top1_vs_exact"] = (sum(x == y for x, y in zip(exact["tokens"], fast["tokens"]))
                                         / len(exact["tokens"]))
    try:
        import llama_cpp  # noqa: F401

        for path in ("llamacpp-repack", "llamacpp-norepack"):
            if reference is None:  # no mesh402 row to compare with
                break
            try:
                rows.append(run_worker([path, *common, "--teacher", json.dumps(reference["tokens"]),
                                        "--prompt-ids", json.dumps(reference["prompt"])]))
            except RuntimeError as e:  # one path crashing (the repack on batches) must not lose the other
                print(f"{path} failed: {str(e)[-300:]}")
                failed[path] = str(e)
    except ImportError:
        print("llama-cpp-python is not installed: run `bash scripts/bench-deps.sh` for the side-by-side rows")
        notes.append("llama.cpp rows skipped: llama-cpp-python is not importable here")
    file_mb = Path(a.model).stat().st_size / 2**20
    llama_rows = [r for r in rows if r["engine"].startswith("llama.cpp")]
    ref = max(llama_rows, key=lambda r: r["decode_tok_s"]) if llama_rows else None  # llama.cpp's best path
    rounds = more_rounds(a.rounds, fast, ref, common) if fast and ref and a.rounds > 1 else []
    median_ratio = statistics.median(r["ratio"] for r in rounds) if rounds else None
    from harness.synthetic_gguf import weight_bytes_per_token

    per_token = weight_bytes_per_token(Path(a.model))
    membw = run_worker(["membw", "--threads", str(a.threads), "--model", a.model, "--device", a.device])
    bw = membw["read_gb_s"]
    for r in rows:
        r["weights_gb_s"] = per_token * r["decode_tok_s"] / 1e9
        r["of_bandwidth"] = r["weights_gb_s"] / bw
    from rich.console import Console
    from rich.table import Table

    where = f" on {membw['gpu']} ({a.device})" if gpu else ""
    t = Table(title=f"engine benchmark{where}: {Path(a.model).name} ({file_mb:.1f} MiB), {a.threads} thread(s), "
                    f"prompt {a.prompt_tokens}, decode {a.decode_tokens}; memory read {bw:.1f} GB/s, "
                    f"{per_token / 1e6:.0f} MB of weights per token; vs llama.cpp's faster path",
              caption="; ".join([*notes, *(f"{k} failed" for k in failed)]) if gpu else None)
    gpu_cols = ("GPU load MiB", "GPU peak MiB", "GPU peak / file") if gpu else ()
    for col in ("engine", "prefill tok/s", "TTFT ms", "decode tok/s", "decode vs llama.cpp", "weights GB/s",
                "of bandwidth", *gpu_cols, "RSS load MiB", "RSS peak MiB", "peak / file", "top-1 vs ref"):
        t.add_column(col, justify="right")
    for r in rows:
        r["rss_peak_over_file"] = r["rss_peak_mb"] / file_mb
        r["decode_vs_llamacpp"] = r["decode_tok_s"] / ref["decode_tok_s"] if ref else None
        if "gpu_peak_mb" in r:
            r["gpu_peak_over_file"] = r["gpu_peak_mb"] / file_mb
        t.add_row(r["engine"], f"{r['prefill_tok_s']:.1f}", f"{r['ttft_s'] * 1000:.0f}", f"{r['decode_tok_s']:.1f}",
                  f"{r['decode_vs_llamacpp']:.2f}x" if r["decode_vs_llamacpp"] else "-", f"{r['weights_gb_s']:.2f}",
                  f"{r['of_bandwidth']:.0%}", *(gpu_cells(r) if gpu else ()), f"{r['rss_load_mb']:.0f}",
                  f"{r['rss_peak_mb']:.0f}", f"{r['rss_peak_over_file']:.2f}",
                  f"{r['top1_vs_exact']:.2f}" if r.get("top1_vs_exact") is not None else "-")
    Console(width=240 if gpu else 200).print(t)
    if rounds:
        rt = Table(title=f"decode over {len(rounds)} rounds, mesh402 fast vs {ref['engine']} (alternating order)")
        for col in ("round", "first", "mesh402 fast tok/s", "llama.cpp tok/s", "ratio"):
            rt.add_column(col, justify="right")
        for i, r in enumerate(rounds):
            rt.add_row(str(i + 1), r["first"], f"{r['mesh402']:.1f}", f"{r['llamacpp']:.1f}", f"{r['ratio']:.2f}x")
        rt.add_row("median", "", f"{statistics.median(r['mesh402'] for r in rounds):.1f}",
                   f"{statistics.median(r['llamacpp'] for r in rounds):.1f}", f"{median_ratio:.2f}x")
        Console(width=200).print(rt)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.pop("prompt", None)
    out = {"model": a.model, "file_mib": file_mb, "threads": a.threads, "prompt_tokens": a.prompt_tokens,
           "decode_tokens": a.decode_tokens, "cpu": os.cpu_count(), "memory_read_gb_s": bw,
           "weight_bytes_per_token": per_token, "rows": rows, "time": time.time()}
    if rounds:
        out["rounds"] = rounds
        out["decode_vs_llamacpp_median"] = median_ratio
    if gpu:  # a GPU run says where it ran and what it could not run (CPU files keep their keys)
        out.update({k: v for k, v in membw.items() if k not in ("read_gb_s", "threads")})
        out.update({"notes": notes, "failed": failed})
    stem = [devices.tag(a.device), a.synthetic.lower() if a.synthetic else "", f"t{a.threads}"]
    name = RESULTS / ("-".join(["engine", *(x for x in stem if x)]) + ".json")  # engine[-cuda][-q4_k]-t1.json
    name.write_text(json.dumps(out, indent=2))
    print(f"wrote {name}")
    if any(k.startswith("mesh402") for k in failed):
        raise SystemExit(1)


def more_rounds(n: int, fast: dict, ref: dict, common: list[str]) -> list[dict]:
    """Decode speed of mesh402 fast and of llama.cpp's faster path (`ref`) over n rounds: round 1 is the main
    table's; each later round runs both again, in the order opposite to the round before (mesh402 ran first in
    round 1), so a drift of the machine's bandwidth over minutes falls on both equally."""
    path = "llamacpp-repack" if ref["engine"].endswith(" repack") else "llamacpp-norepack"
    teacher = ["--teacher", json.dumps(fast["tokens"]), "--prompt-ids", json.dumps(fast["prompt"])]
    out = [{"first": "mesh402", "mesh402": fast["decode_tok_s"], "llamacpp": ref["decode_tok_s"]}]
    for i in range(1, n):
        first = "llamacpp" if i % 2 else "mesh402"
        got: dict[str, float] = {}
        for who in (first, "mesh402" if first == "llamacpp" else "llamacpp"):
            res = run_worker(["fast", *common] if who == "mesh402" else [path, *common, *teacher])
            got[who] = res["decode_tok_s"]
        out.append({"first": first, **got})
        print(f"round {i + 1}: mesh402 {got['mesh402']:.1f} tok/s, llama.cpp {got['llamacpp']:.1f}", flush=True)
    for r in out:
        r["ratio"] = r["mesh402"] / r["llamacpp"]
    return out


def gpu_cells(r: dict) -> tuple[str, ...]:
    """A GPU row's memory cells: torch's allocated MiB after loading, at the peak of serving, and that peak over
    the file's size; "-" for a row that has none (llama.cpp's)."""
    if "gpu_peak_mb" not in r:
        return ("-", "-", "-")
    return (f"{r['gpu_load_mb']:.0f}", f"{r['gpu_peak_mb']:.0f}", f"{r['gpu_peak_over_file']:.2f}")


if __name__ == "__main__":
    main()
