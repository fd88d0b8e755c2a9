"""Pipeline split benchmark: solo vs 2- and 3-stage, loopback and with delay between nodes.

    .venv/bin/python benchmarks/split.py [--quick] [--no-procs] [--no-delay] [--no-wire] [--trace] [--device cuda]
    .venv/bin/python benchmarks/split.py --model PATH.gguf [--quick] [--trace]   # solo vs 2-stage on that model

Prints a table and writes benchmarks/results/split.json. Everything runs on this machine; nothing
reaches the network (delay rows run in private network namespaces with no route out).

- in-process: solo engine vs stage-0 + StageWorkers over MemoryLink (the real PipelineStepper and
  StageWorker code, no QUIC, no processes), so protocol cost is separated from transport cost.
  Per decode step wall time measured around `stepper.decode`, TTFT around `stepper.prefill`.
- processes, loopback: real `mesh402 serve` nodes (one torch thread each), solo and split with
  `--max-vram 0.08` (2 stages) / `0.05` (3 stages), in `--mode fast` and `--mode exact`. Measured
  client-side with streaming chat completions sent to the host node: TTFT = request sent to first
  content chunk; decode tok/s = (completion tokens - 1) / (last chunk - first chunk). Each setting
  is repeated and the median reported; the HTTP/SSE cost is in the solo row as well, so the
  difference is the pipeline's.
- per-hop overhead per token = (split step time - solo step time) / (stages - 1), against the
  solo row of the same kind (in-process or processes).
- delay: each node in its own network namespace, joined through benchmarks/netdelay.py (TUN
  devices and a forwarder adding 5 or 20 ms each way: 10 / 40 ms RTT). The nodes bind and
  announce only their namespace address (`--bind-ip`), so they dial each other through the delay.
  Bound = 1 / (solo step time + (stages - 1) x measured RTT); the solo step comes from a solo node
  on loopback whose requests alternate with the delayed ones (same minutes of machine load).
- trace (`--trace`): a 2-stage fast split on loopback with `serve --trace-hops` on both nodes; each
  decode step's hand-offs (host send -> stage arrival -> engine call -> engine done -> reply sent ->
  host arrival) timed on the machine's one monotonic clock, medians over every traced step.
- another model (`--model`, e.g. the synthetic 1B of `benchmarks/engine.py --synthetic Q4_K`): only the
  loopback node processes, solo vs 2-stage (each stage's budget 1.2 x the larger half's bytes), fast mode, the
  frame round trip (hot, and after each side idles 2, 4, 8 and 12 ms: the split's processes idle while the
  other computes), and with `--trace` the traced hand-offs; writes benchmarks/results/split-<model>.json.
- wire dtype: teacher-forced agreement of f16 / bf16 activations against f32 (every step fed the
  f32 trajectory): greedy-token agreement and max |dlogit|, plus the free-running identical
  prefix through the real pipeline over MemoryLink.
- device (`--device cuda` or cuda:N; default cpu): every in-process engine loads there and every node
  serves with `--device` (benchmarks/devices.py); in-process timed regions end with
  torch.cuda.synchronize(); torch's peak GPU memory of the in-process engines and each node's GPU memory
  (nvidia-smi, where it can tell) are recorded; results go to split-cuda.json / split-<model>-cuda.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402

import devices  # noqa: E402
import netdelay  # noqa: E402
from harness.procs import free_port  # noqa: E402
from harness.reference import ready_plan  # noqa: E402
from harness.sse import json_events  # noqa: E402

PY = sys.executable
MODEL = "smollm2-135m-instruct"
MODEL_ARGS: list[str] = []  # `--model PATH`: every node serves that file (set in main)
DEVICE = "cpu"  # `--device`: where in-process engines load (set in main)
DEVICE_ARGS: list[str] = []  # and what every node is told: `--device DEV`, or nothing on the CPU (set in main)
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
AGREE_PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
                 "Explain in two sentences why the sky is blue.", "List three uses of copper."]
SPLITS = {1: [0, 30], 2: [0, 15, 30], 3: [0, 10, 20, 30]}
VRAM = {2: "0.08", 3: "0.05"}


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ============================================================================ in-process

def _engine(mode: str, layers: tuple[int, int] | None = None, tok: bool = True) -> Any:
    from mesh402.engine import Engine
    from mesh402.models.catalog import bundled_model_path

    return Engine.load(bundled_model_path(), mode=mode, layers=layers, load_tokenizer=tok, device=DEVICE)


class _Failover:
    async def alive(self, node: str) -> bool:
        return True

    async def replace(self, chain: Any, dead: set[str]) -> Any:
        raise RuntimeError("no failover in the benchmark")


def build_inproc(mode: str, stages: int, ex: ThreadPoolExecutor, wire: str = "f32",
                 engines: dict | None = None, max_batch: int = 8,
                 stage_ex: list[ThreadPoolExecutor] | None = None) -> Any:
    """A LocalModel (stages == 1) or a PipelineModel whose remote stages are StageWorkers over MemoryLink.
    `max_batch`: decode rows per engine call (1: each request's step alone); `stage_ex`: an engine thread per
    remote stage, as separate nodes have (default: every stage on `ex`)."""
    from mesh402.serving.generation import LocalModel
    from mesh402.serving.pipeline import Chain, PipelineModel
    from mesh402.serving.stage_link import Hop, MemoryLink
    from mesh402.serving.stage_worker import StageKey, StageWorker

    engines = engines if engines is not None else {}
    sp = SPLITS[stages]

    def eng(a: int, b: int) -> Any:
        if (mode, a, b) not in engines:
            engines[(mode, a, b)] = _engine(mode, (a, b), tok=(a == 0))
        return engines[(mode, a, b)]

    if stages == 1:
        return LocalModel(eng(0, 30), ex, max_batch=max_batch)
    from mesh402.mesh.identity import NodeIdentity

    workers: dict[str, StageWorker] = {}
    host = NodeIdentity.generate()  # assigns the ranges and signs the session grants

    async def connect(node: str, caller: str = host.node_id_hex) -> MemoryLink:
        client, server = MemoryLink.pair()
        asyncio.get_running_loop().create_task(workers[node].handle(caller, server))
        return client

    hops = []
    for i, (a, b) in enumerate(zip(sp[1:], sp[2:])):
        node = f"w{i}"
        w = StageWorker(node, stage_ex[i] if stage_ex else ex, lambda h, a, b: eng(a, b),
                        lambda t, me=node: connect(t, me), max_batch=max_batch)
        w.engines[StageKey("h", a, b)] = eng(a, b)
        w.assigners[StageKey("h", a, b)] = host.node_id_hex
        workers[node] = w
        hops.append(Hop(node, a, b))
    chain = Chain(MODEL, "h", 1, sp[1], tuple(hops))
    model = PipelineModel(eng(0, sp[1]), chain, connect, _Failover(), ex, wire_dtype=wire,  # type: ignore[arg-type]
                          signer=host, max_batch=max_batch)
    model.bench_workers = workers  # type: ignore[attr-defined]  # the stages' counters, for the report
    return model


async def _timed_run(model: Any, ids: list[int], n: int) -> tuple[float, list[float]]:
    from mesh402.engine.sampling import SamplingParams

    st = await model.open(len(ids) + n + 1, SamplingParams(temperature=0, seed=0))
    try:
        devices.sync(DEVICE)  # each clock read below waits for the GPU's queued work (nothing on the CPU)
        t0 = time.perf_counter()
        tok = await st.prefill(ids)
        devices.sync(DEVICE)
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(n):
            t0 = time.perf_counter()
            tok = await st.decode(tok)
            devices.sync(DEVICE)
            steps.append(time.perf_counter() - t0)
        return ttft, steps
    finally:
        st.release()


def bench_inproc(modes: list[str], n: int, reps: int, gpu_peak: dict[str, float] | None = None) -> list[dict]:
    """`gpu_peak` (a GPU run): filled with torch's peak GPU memory per mode, MiB, every engine of the
    mode's solo, 2- and 3-stage models loaded at once."""
    from mesh402.engine.runtime_env import configure_torch

    configure_torch(1)
    rows = []
    ex = ThreadPoolExecutor(1)
    engines: dict = {}
    for mode in modes:
        mem = devices.GpuMemory(DEVICE) if gpu_peak is not None else None
        solo = _engine(mode)
        ids = solo.tokenizer.encode(solo.chat_template.render([{"role": "user", "content": PROMPT}]),
                                    add_special=False)
        engines[(mode, 0, 30)] = solo
        models = {k: build_inproc(mode, k, ex, engines=engines) for k in (1, 2, 3)}
        res: dict[int, dict[str, list[float]]] = {k: {"ttft": [], "step": []} for k in models}
        for k, m in models.items():  # warm-up
            asyncio.run(_timed_run(m, ids, 4))
        for _ in range(reps):  # interleaved, so drifting machine load hits every row alike
            for k, m in models.items():
                ttft, steps = asyncio.run(_timed_run(m, ids, n))
                res[k]["ttft"].append(ttft)
                res[k]["step"].append(med(steps))
        for k in models:
            rows.append(_row("in-process, MemoryLink", mode, k, 0.0, med(res[k]["ttft"]), med(res[k]["step"]),
                             raw={"ttft_s": res[k]["ttft"], "step_s": res[k]["step"], "prompt_tokens": len(ids)}))
        if mem is not None and gpu_peak is not None:
            gpu_peak[mode] = mem.peak_mib()
        engines.clear()
    ex.shutdown()
    return rows


def _row(kind: str, mode: str, stages: int, rtt_ms: float, ttft: float, step: float, **extra: Any) -> dict:
    return {"kind": kind, "mode": mode, "stages": stages, "rtt_ms": rtt_ms, "ttft_ms": ttft * 1000,
            "step_ms": step * 1000, "decode_tps": 1.0 / step if step > 0 else float("nan"), **extra}


# ============================================================================ wire dtype agreement

def bench_wire(mode: str, n: int) -> dict:
    """Teacher-forced agreement and max |dlogit| of f16/bf16 vs f32; free-running prefix via the real pipeline."""
    import torch

    from mesh402.engine.activations import decode_activations, forward_tokens

    solo = _engine(mode)
    e0, e1 = _engine(mode, (0, 15), tok=False), _engine(mode, (15, 30), tok=False)
    engines = {(mode, 0, 15): e0, (mode, 15, 30): e1}
    ex = ThreadPoolExecutor(1)
    out: dict[str, Any] = {"mode": mode, "prompts": len(AGREE_PROMPTS), "tokens_per_prompt": n}
    stats = {d: {"agree": 0, "total": 0, "max_dlogit": 0.0, "prefix": 0, "f32_exact": True}
             for d in ("f32", "f16", "bf16")}
    with torch.inference_mode():
        for p in AGREE_PROMPTS:
            ids = solo.tokenizer.encode(solo.chat_template.render([{"role": "user", "content": p}]), add_special=False)
            s = solo.new_session(len(ids) + n + 1)
            ref_logits = [s.prefill(ids)]
            ref = [int(ref_logits[-1].argmax())]
            while len(ref) < n:
                ref_logits.append(s.decode(ref[-1]))
                ref.append(int(ref_logits[-1].argmax()))
            s.close()
            for d, st in stats.items():
                s0, s1 = e0.new_session(len(ids) + n + 1), e1.new_session(len(ids) + n + 1)
                C, pos, lg = e0.prefill_chunk, 0, []
                steps = [(ids[i:i + C], C) for i in range(0, len(ids), C)] + [([t], 1) for t in ref[:-1]]
                for chunk, pad in steps:
                    payload, shape = forward_tokens(s0, chunk, pos, pad, d)
                    logits = s1.forward(decode_activations(payload, shape, d), pos, len(chunk))
                    pos += len(chunk)
                    if pad == 1 or pos == len(ids):
                        lg.append(logits)
                s0.close()
                s1.close()
                st["agree"] += sum(int(a.argmax()) == t for a, t in zip(lg, ref))
                st["total"] += n
                st["max_dlogit"] = max(st["max_dlogit"], max(float((a - b).abs().max()) for a, b in zip(lg, ref_logits)))
                if d == "f32":
                    st["f32_exact"] = st["f32_exact"] and all(torch.equal(a, b) for a, b in zip(lg, ref_logits))
                model = build_inproc(mode, 2, ex, wire=d, engines=engines)

                async def free_run() -> list[int]:
                    from mesh402.engine.sampling import SamplingParams

                    stp = await model.open(len(ids) + n + 1, SamplingParams(temperature=0, seed=0))
                    toks = [await stp.prefill(ids)]
                    while len(toks) < n:
                        toks.append(await stp.decode(toks[-1]))
                    stp.release()
                    return toks

                got = asyncio.run(free_run())
                st["prefix"] += next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), n)
    ex.shutdown()
    for d, st in stats.items():
        st["agreement"] = st["agree"] / st["total"]
        st["bytes_per_token"] = 576 * (4 if d == "f32" else 2)
    out["dtypes"] = stats
    return out


# ============================================================================ node processes

class Node:
    """A `mesh402 serve` process, on loopback or inside a DelayNet namespace."""

    def __init__(self, name: str, root: Path, args: list[str], net: netdelay.DelayNet | None = None) -> None:
        self.name, self.net = name, net
        self.home = root / name
        self.home.mkdir(parents=True)
        self.api_port, self.console_port = free_port(), free_port()
        ip = net.ip(name) if net else "127.0.0.1"
        cmd = [PY, "-m", "mesh402.cli", "serve", "--home", str(self.home), "--port", str(self.api_port),
               "--console", str(self.console_port), "--bind-ip", ip, *MODEL_ARGS, *DEVICE_ARGS, *args]
        self.log_path = self.home / "node.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        kw = dict(stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        self.proc = net.popen(name, cmd, **kw) if net else subprocess.Popen(cmd, **kw)
        self._id: str | None = None

    def http(self, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        """Run fn where this node's loopback services are reachable (its namespace, if any)."""
        return self.net.call(self.name, fn, *a, **kw) if self.net else fn(*a, **kw)

    def get(self, path: str, api: bool = False, timeout: float = 5.0) -> httpx.Response:
        port = self.api_port if api else self.console_port
        return self.http(httpx.get, f"http://127.0.0.1:{port}{path}", timeout=timeout)

    def status(self) -> dict:
        return self.get("/api/status").json()

    @property
    def node_id(self) -> str:
        if self._id is None:
            self._id = self.status()["node_id"]
        return self._id

    def token(self) -> str:
        port = self.console_port
        from mesh402.node.mesh_runtime import read_console_token

        r = self.http(httpx.post, f"http://127.0.0.1:{port}/api/invite", json={"expires": "1h"}, timeout=5.0,
                      headers={"Authorization": f"Bearer {read_console_token(self.home)}"})
        r.raise_for_status()
        return r.json()["token"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, pred: Callable[[], bool], timeout: float, what: str) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited:\n{self.log()[-3000:]}")
            try:
                if pred():
                    return time.monotonic() - t0
            except (httpx.HTTPError, KeyError, ValueError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{what} not reached in {timeout}s on {self.name}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


def start_mesh(stages: int, mode: str, root: Path, net: netdelay.DelayNet | None = None,
               names: list[str] | None = None, extra: list[str] | None = None) -> tuple[list[Node], Node, dict | None]:
    """Nodes forming a solo (stages == 1) or split mesh (`extra`: more `mesh402 serve` flags for every node);
    returns (nodes, host, plan)."""
    names = names or [chr(ord("a") + i) for i in range(stages)]
    args = ["--mode", mode] + (["--max-vram", VRAM[stages]] if stages > 1 else []) + list(extra or [])
    first = Node(names[0], root, args, net)
    nodes = [first]
    try:
        first.wait(lambda: first.get("/api/status").status_code == 200, 120, "console up")
        if stages == 1:
            first.wait(lambda: first.get("/ready", api=True).status_code == 200, 120, "model ready")
            return nodes, first, None
        tok = first.token()
        nodes += [Node(nm, root, args + ["--join", tok], net) for nm in names[1:]]
        for n in nodes:
            n.wait(lambda n=n: ready_plan(n) is not None, 240, f"a ready {stages}-stage plan")
        plan = ready_plan(first)
        assert plan is not None and len(plan["stages"]) == stages, plan
        host = next(n for n in nodes if n.node_id == plan["host"])
        host.wait(lambda: host.get("/ready", api=True).status_code == 200, 120, "host ready")
        return nodes, host, plan
    except BaseException:
        for n in nodes:
            n.stop()
        raise


def stream_once(port: int, max_tokens: int, prompt: str = PROMPT) -> dict:
    """One streaming chat completion, timed client-side."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    times: list[float] = []
    usage = None
    t0 = time.perf_counter()
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for ev in json_events(r):
            if "error" in ev:
                raise RuntimeError(f"stream error: {ev['error']}")
            if ev.get("usage"):
                usage = ev["usage"]
            if any(ch.get("delta", {}).get("content") for ch in ev.get("choices", [])):
                times.append(time.perf_counter())
    n = int(usage["completion_tokens"]) if usage else len(times)
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {"ttft_s": times[0] - t0, "tokens": n, "step_s": span / max(1, n - 1)}


def measure_host(host: Node, max_tokens: int, reps: int) -> dict[str, list[float]]:
    host.http(stream_once, host.api_port, 8)  # warm-up: sessions, links, allocator
    runs = [host.http(stream_once, host.api_port, max_tokens) for _ in range(reps)]
    return {k: [r[k] for r in runs] for k in ("ttft_s", "step_s", "tokens")}


def bench_procs(modes: list[str], max_tokens: dict[str, int], reps: int,
                stage_counts: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    """Per mode, solo, 2-stage and 3-stage meshes all up at once; requests interleaved round-robin so
    the machine's drifting load hits every setting alike (idle nodes cost next to nothing)."""
    rows = []
    for mode in modes:
        root = Path(tempfile.mkdtemp(prefix=f"split-{mode}-"))
        meshes: dict[int, tuple[list[Node], Node, dict | None, float]] = {}
        gpu_mib: dict[int, dict[str, float] | None] = {}
        try:
            for stages in stage_counts:
                t0 = time.monotonic()
                names = [f"s{stages}{chr(ord('a') + i)}" for i in range(stages)]
                nodes, host, plan = start_mesh(stages, mode, root, names=names)
                meshes[stages] = (nodes, host, plan, time.monotonic() - t0)
            res: dict[int, list[dict]] = {k: [] for k in meshes}
            for k, (_, host, _, _) in meshes.items():
                stream_once(host.api_port, 8)  # warm-up
            for _ in range(reps):
                for k, (_, host, _, _) in meshes.items():
                    res[k].append(stream_once(host.api_port, max_tokens[mode]))
            if DEVICE_ARGS:  # each node's GPU memory after serving (its CUDA context included)
                gpu_mib = {k: nodes_gpu_mib(nodes) for k, (nodes, *_) in meshes.items()}
        finally:
            for nodes, *_ in meshes.values():
                for n in nodes:
                    n.stop()
            shutil.rmtree(root, ignore_errors=True)
        for k, (_, _, plan, formed) in meshes.items():
            m = {f: [r[f] for r in res[k]] for f in ("ttft_s", "step_s", "tokens")}
            gpu = {"gpu_mib": gpu_mib.get(k)} if DEVICE_ARGS else {}
            rows.append(_row("processes, loopback", mode, k, 0.0, med(m["ttft_s"]), med(m["step_s"]),
                             raw=m, ready_s=formed, plan=plan and [st[1:3] for st in plan["stages"]], **gpu))
            print(f"  {mode} {k}-stage processes: {1 / med(m['step_s']):.1f} tok/s (ready {formed:.0f}s)", flush=True)
    return rows


def nodes_gpu_mib(nodes: list[Node]) -> dict[str, float] | None:
    """Each node's GPU memory by name (nvidia-smi), or None where it cannot tell."""
    used = devices.process_gpu_mib([n.proc.pid for n in nodes])
    return used and {n.name: used[n.proc.pid] for n in nodes if n.proc.pid in used}


def bench_trace(mode: str, max_tokens: int, reps: int) -> dict:
    """A 2-stage loopback split with `--trace-hops` on both nodes: each decode step's hand-offs timed on the
    machine's one monotonic clock (serving/hop_trace.py), medians over every complete step of `reps` answers."""
    from mesh402.serving.hop_trace import breakdown

    root = Path(tempfile.mkdtemp(prefix=f"split-trace-{mode}-"))
    traces = {n: root / f"{n}.trace" for n in ("ta", "tb")}
    nodes: list[Node] = []
    try:
        first = Node("ta", root, ["--mode", mode, "--max-vram", VRAM[2], "--trace-hops", str(traces["ta"])])
        nodes.append(first)
        first.wait(lambda: first.get("/api/status").status_code == 200, 120, "console up")
        nodes.append(Node("tb", root, ["--mode", mode, "--max-vram", VRAM[2], "--trace-hops", str(traces["tb"]),
                                       "--join", first.token()]))
        for n in nodes:
            n.wait(lambda n=n: ready_plan(n) is not None, 240, "a ready 2-stage plan")
        plan = ready_plan(first)
        assert plan is not None
        host = next(n for n in nodes if n.node_id == plan["host"])
        stage = next(n for n in nodes if n is not host)
        host.wait(lambda: host.get("/ready", api=True).status_code == 200, 120, "host ready")
        stream_once(host.api_port, 8)  # warm-up
        for _ in range(reps):
            stream_once(host.api_port, max_tokens)
        return breakdown(traces[host.name].read_text().splitlines(), traces[stage.name].read_text().splitlines())
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(root, ignore_errors=True)


def bench_transport(n: int, sizes: tuple[int, ...] = (64, 2304), idle_ms: tuple[float, ...] = (0.0,)) -> dict:
    """Frame round trip carrying one token's f32 activations (2304 B on the bundled model; 4 x its width on
    another) to a node process over QUIC: the transport's share of a hop, without any model work. For each
    `idle_ms` above 0, both sides idle that long before each round trip, as a split's processes do while the
    other computes (results under echo_<size>B_idle<idle>ms; without idling echo_<size>B)."""
    import mesh as meshbench  # benchmarks/mesh.py: its node-process and in-process service helpers

    from mesh402.mesh.framing import StreamType, make_frame
    from mesh402.mesh.limits import MeshLimits
    from mesh402.mesh.proto import mesh_pb2 as pb

    lim = MeshLimits()
    root = Path(tempfile.mkdtemp(prefix="split-echo-"))
    remote = meshbench.Proc(root, "echo-remote")
    out: dict = {}
    try:
        remote.wait_up()
        settle(remote.p.pid)  # a node answers its status before its start-up work is done: round trips
        # measured meanwhile share the CPU with it (the first ~2 s were 1.5-2.5x slower here)

        async def run() -> None:
            me = meshbench.svc(root, "echo-local")
            await me.start(join=remote.token())
            try:
                fs = await me.open_stream(me.connected_peers()[0], StreamType.ECHO)
                for size in sizes:
                    for idle in idle_ms:
                        payload, lat, began = b"x" * size, [], time.monotonic()
                        for i in range(n + 20):
                            if idle:
                                time.sleep(idle / 1000)  # the whole process idles, the event loop too
                            t0 = time.perf_counter()
                            await fs.send(make_frame(echo=pb.Echo(payload=payload)))
                            await fs.recv(5)
                            if i >= 20:
                                lat.append((time.perf_counter() - t0) * 1000)
                        key = f"echo_{size}B_idle{idle:g}ms" if idle else f"echo_{size}B"
                        out[key] = {"median": med(lat), "p90": sorted(lat)[int(0.9 * (len(lat) - 1))], "n": n,
                                    "size_B": size, "idle_ms": idle}
                        # the echo node holds this (unentitled) peer to its sustained frame rate beyond a burst
                        # (mesh.quota): rest until a block's frames are earned back, or a later block is reset
                        time.sleep(max(0.0, (n + 20) / lim.frames_per_s - (time.monotonic() - began)))
                await fs.finish()
            finally:
                await me.stop()

        asyncio.run(run())
    finally:
        remote.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


IDLE_SWEEP_MS = (2.0, 4.0, 8.0, 12.0)


def settle(pid: int, quiet: float = 0.05, window_s: float = 0.5, timeout_s: float = 30.0) -> None:
    """Wait until process `pid` uses under `quiet` of a CPU over `window_s` (at most `timeout_s`)."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        c0 = cpu()
        time.sleep(window_s)
        if cpu() - c0 < quiet * window_s:
            return


def print_transport(transport: dict) -> None:
    for v in transport.values():
        idle = f" after {v['idle_ms']:g} ms idle" if v["idle_ms"] else ""
        print(f"QUIC frame round trip to a node process, {v['size_B']}B Echo on one stream{idle}: "
              f"median {v['median']:.3f} ms, p90 {v['p90']:.3f} ms")


def bench_delay(delays_ms: list[float], stage_counts: list[int], mode: str, max_tokens: int, reps: int) -> list[dict]:
    """Split meshes inside namespaces at each delay; a solo node on loopback is measured interleaved
    with every run, so the bound's compute term comes from the same minutes of machine load."""
    rows = []
    sroot = Path(tempfile.mkdtemp(prefix="split-delay-solo-"))
    snodes, solo, _ = start_mesh(1, mode, sroot, names=["solo"])
    try:
        stream_once(solo.api_port, 8)
        for d in delays_ms:
            for stages in stage_counts:
                names = [chr(ord("a") + i) for i in range(stages)]
                root = Path(tempfile.mkdtemp(prefix=f"split-delay{d:g}-{stages}-"))
                with netdelay.DelayNet(names, d) as net:
                    rtt = med(netdelay.udp_rtt(net, "a", "b", n=20))
                    t0 = time.monotonic()
                    nodes, host, plan = start_mesh(stages, mode, root, net=net, names=names)
                    formed = time.monotonic() - t0
                    try:
                        st = host.status()  # evidence the nodes talk over the namespace addresses
                        addrs = {"host": st.get("addrs"), **{p["node_id"][:8]: {
                            "addrs": (p.get("announcement") or {}).get("addrs"), "mesh_rtt_ms": p.get("rtt_ms")}
                            for p in st.get("peers", [])}}
                        host.http(stream_once, host.api_port, 8)  # warm-up
                        runs, solo_runs = [], []
                        for _ in range(reps):
                            solo_runs.append(stream_once(solo.api_port, max_tokens))
                            runs.append(host.http(stream_once, host.api_port, max_tokens))
                    finally:
                        for n in nodes:
                            n.stop()
                shutil.rmtree(root, ignore_errors=True)
                m = {f: [r[f] for r in runs] for f in ("ttft_s", "step_s", "tokens")}
                solo_step = med([r["step_s"] for r in solo_runs])
                rows.append(_row(f"processes, {2 * d:g} ms RTT", mode, stages, rtt, med(m["ttft_s"]),
                                 med(m["step_s"]), raw=m, solo_step_ms=solo_step * 1000,
                                 solo_raw_step_s=[r["step_s"] for r in solo_runs], ready_s=formed,
                                 peer_addrs=addrs, plan=[s[1:3] for s in plan["stages"]]))
                print(f"  {mode} {stages}-stage, RTT {rtt:.1f} ms: {1 / med(m['step_s']):.1f} tok/s "
                      f"(solo alongside {1 / solo_step:.1f} tok/s)", flush=True)
    finally:
        for n in snodes:
            n.stop()
        shutil.rmtree(sroot, ignore_errors=True)
    return rows


# ============================================================================ report

def derive(rows: list[dict]) -> None:
    """Ratios against the solo row of the same kind and mode; bounds for delay rows."""
    solo = {(r["kind"], r["mode"]): r for r in rows if r["stages"] == 1}
    for r in rows:
        r["step_best_ms"] = min(r["raw"]["step_s"]) * 1000  # least disturbed run: robust to load spikes
    for r in rows:
        if r["stages"] == 1:
            continue
        hops = r["stages"] - 1
        base = solo.get((r["kind"], r["mode"]))
        if base is not None:
            r["vs_solo"] = r["decode_tps"] / base["decode_tps"]
            r["per_hop_ms"] = (r["step_ms"] - base["step_ms"]) / hops
            r["per_hop_best_ms"] = (r["step_best_ms"] - base["step_best_ms"]) / hops
        elif "solo_step_ms" in r:  # delay rows: against the solo node measured alongside
            s_ms = r["solo_step_ms"]
            r["vs_solo"] = s_ms / r["step_ms"]
            r["bound_tps"] = 1000.0 / (s_ms + hops * r["rtt_ms"])
            r["vs_bound"] = r["decode_tps"] / r["bound_tps"]
            r["per_hop_ms"] = (r["step_ms"] - s_ms - hops * r["rtt_ms"]) / hops  # beyond the RTT


def print_report(rows: list[dict], wire: list[dict], where: str = "") -> None:
    """`where`: the GPU a run used, appended to the title ("" on the CPU)."""
    from rich.console import Console
    from rich.table import Table

    def f(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    t = Table(title="Pipeline split: decode speed, TTFT, per-hop overhead (medians)" + where)
    for c in ("setting", "mode", "stages", "TTFT ms", "step ms", "decode tok/s", "vs solo", "per-hop ms",
              "best-run per-hop ms", "bound tok/s", "vs bound"):
        t.add_column(c, justify="left" if c in ("setting", "mode") else "right")
    for r in rows:
        t.add_row(r["kind"], r["mode"], str(r["stages"]), f(r["ttft_ms"], ".0f"), f(r["step_ms"], ".2f"),
                  f(r["decode_tps"], ".1f"), f(r.get("vs_solo"), ".2f"), f(r.get("per_hop_ms"), ".2f"),
                  f(r.get("per_hop_best_ms"), ".2f"),
                  f(r.get("bound_tps"), ".1f"), f(r.get("vs_bound"), ".2f"))
    c = Console(width=170)
    c.print(t)
    if wire:
        w = Table(title="Wire dtype vs solo (2 stages, teacher-forced on the f32 trajectory)")
        for col in ("mode", "wire", "bytes/token", "greedy agreement", "max |dlogit|", "free-run identical prefix",
                    "bit-identical"):
            w.add_column(col, justify="left" if col in ("mode", "wire") else "right")
        for res in wire:
            for d, st in res["dtypes"].items():
                w.add_row(res["mode"], d, str(st["bytes_per_token"]), f"{st['agree']}/{st['total']} "
                          f"({st['agreement']:.1%})", f"{st['max_dlogit']:.4f}", f"{st['prefix']}/{st['total']}",
                          ("yes" if st["f32_exact"] else "no") if d == "f32" else "")
        c.print(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats, fast mode only (~2 min)")
    ap.add_argument("--no-procs", action="store_true", help="skip node processes (in-process rows only)")
    ap.add_argument("--no-delay", action="store_true", help="skip the network-namespace delay rows")
    ap.add_argument("--no-wire", action="store_true", help="skip wire dtype agreement")
    ap.add_argument("--trace", action="store_true",
                    help="also time each hand-off of a 2-stage loopback split's steps (`serve --trace-hops`)")
    ap.add_argument("--model", default=None,
                    help="a GGUF file: only solo vs 2-stage node processes on it (fast mode) and the frame round trip")
    ap.add_argument("--device", default="cpu",
                    help="torch device of the in-process engines and every node: cpu (default), cuda or cuda:N")
    args = ap.parse_args()
    use_device(args.device)
    if args.model:
        return main_model(Path(args.model), args.quick, args.trace)
    q = args.quick
    modes = ["fast"] if q else ["fast", "exact"]
    t_start = time.monotonic()
    rows: list[dict] = []
    wire: list[dict] = []
    notes: list[str] = []
    transport: dict = {}
    trace: dict = {}
    gpu_peak: dict[str, float] | None = {} if DEVICE_ARGS else None
    print("in-process pipelines over MemoryLink ...", flush=True)
    rows += bench_inproc(modes, n=16 if q else 24, reps=3, gpu_peak=gpu_peak)
    if not args.no_wire:
        print("wire dtype agreement ...", flush=True)
        wire = [bench_wire(m, 12 if q else 16) for m in modes]
    if not args.no_procs:
        print("node processes on loopback ...", flush=True)
        rows += bench_procs(modes, max_tokens={"fast": 40 if q else 64, "exact": 24}, reps=3 if q else 5)
        print("QUIC frame round trip to a node process ...", flush=True)
        transport = bench_transport(200 if q else 500)
        if args.trace:
            print("hand-offs of a 2-stage split, traced ...", flush=True)
            trace = bench_trace("fast", max_tokens=64, reps=3)
        if not args.no_delay:
            why = netdelay.can_create()
            if why:
                notes.append(f"delay rows skipped: {why}")
                print(f"delay rows skipped: {why}", flush=True)
            else:
                print("node processes in namespaces with delay ...", flush=True)
                rows += bench_delay([5.0, 20.0], [2] if q else [2, 3], "fast", max_tokens=40 if q else 64,
                                    reps=2 if q else 3)
    derive(rows)
    gpu = device_info()
    print_report(rows, wire, gpu_where(gpu))
    print_transport(transport)
    if gpu_peak:
        print("torch's peak GPU memory of the in-process engines (solo, 2- and 3-stage at once): "
              + ", ".join(f"{m} {v:.0f} MiB" for m, v in gpu_peak.items()))
    if trace:
        steps = int(trace.pop("steps"))
        print(f"hand-offs of a 2-stage fast split on loopback, median ms over {steps} traced steps: "
              + ", ".join(f"{k} {v:.3f}" for k, v in trace.items()))
        trace["steps"] = steps
    for n in notes:
        print(n)
    took = time.monotonic() - t_start
    print(f"took {took:.0f}s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": q, "took_s": took,
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "load_avg": os.getloadavg()},
           "method": {"in-process": "wall time around stepper.decode / stepper.prefill, median step per run, "
                                    "median over runs",
                      "processes": "client-side streaming to the host node: TTFT to first content chunk; "
                                   "step = (last chunk - first chunk) / (completion tokens - 1); median over runs",
                      "per_hop_ms": "(split step - solo step) / (stages - 1); delay rows subtract the RTTs too; "
                                    "per_hop_best_ms uses the fastest run of each setting instead of the median",
                      "bound": "1 / (solo step + (stages - 1) x measured UDP RTT), the solo step from a loopback "
                                "solo node measured interleaved with the delayed runs"},
           "rows": rows, "wire": wire, "transport": transport, "trace_ms": trace, "notes": notes}
    if gpu:  # a GPU run says where it ran (CPU files keep their keys)
        out["machine"].update(gpu)
        out["gpu_inproc_peak_mib"] = gpu_peak
    dest = RESULTS / result_name("split")
    dest.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {dest}")


def use_device(device: str) -> None:
    """Check `--device` before anything loads or starts (one line, not a traceback from inside a node), then
    point the in-process engines and every node at it."""
    global DEVICE
    devices.require_device(device)
    DEVICE = device
    DEVICE_ARGS[:] = [] if device == "cpu" else ["--device", device]  # the CPU's node command lines unchanged


def device_info() -> dict:
    """The GPU and versions a GPU run records; {} on the CPU."""
    return devices.describe(DEVICE) if devices.is_cuda(DEVICE) else {}


def gpu_where(gpu: dict) -> str:
    return f" on {gpu['gpu']} ({gpu['device']})" if gpu else ""


def result_name(stem: str) -> str:
    """split[-MODEL].json on the CPU (as before), split[-MODEL]-cuda.json on a GPU: one never overwrites the other."""
    tag = devices.tag(DEVICE)
    return f"{stem}-{tag}.json" if tag else f"{stem}.json"


def main_model(path: Path, quick: bool, trace_hops: bool) -> None:
    """Solo vs a 2-stage split of another model on loopback (issue 19: the ratio on a bandwidth-bound model)."""
    global MODEL
    from mesh402.models.catalog import resolve_model
    from mesh402.models.gguf_meta import read_gguf_meta

    src = resolve_model(str(path))
    MODEL = src.model_id
    MODEL_ARGS[:] = ["--model", str(src.path)]
    # each stage's budget: its half of the layers plus what a first or last stage holds besides (a tied
    # model's embedding on one and its head on the other), with room for the planner's headroom: well short
    # of the whole model, so the planner splits it (0.6 x the file was too little for a small model whose
    # embedding is most of it: no plan formed for the bundled model)
    meta = read_gguf_meta(src.path)
    half = meta.n_layers // 2
    need = max(meta.stage_bytes(0, half), meta.stage_bytes(half, meta.n_layers))
    if 1.2 * need >= meta.stage_bytes(0, meta.n_layers):
        raise SystemExit(f"{MODEL}: half its layers take nearly the whole model; a 2-stage split says nothing")
    VRAM[2] = f"{1.2 * need / 1e9:.3f}"
    t_start = time.monotonic()
    print(f"node processes on loopback, {MODEL}: solo and 2 stages (budget {VRAM[2]} GB each) ...", flush=True)
    rows = bench_procs(["fast"], max_tokens={"fast": 32 if quick else 48}, reps=3 if quick else 5, stage_counts=(1, 2))
    print("QUIC frame round trip to a node process ...", flush=True)
    width = meta.hidden  # a token's f32 activations: 4 x width bytes
    transport = bench_transport(200 if quick else 500, (64, 2304, 4 * width))
    # the model's frames after idling 2-12 ms (~one stage's compute): what a split's deliveries meet. On a VM
    # the round trip grows with the idle time before it (a woken vCPU runs cold); this sweep shows how much.
    transport.update(bench_transport(100 if quick else 200, (4 * width,), idle_ms=IDLE_SWEEP_MS))
    trace: dict = {}
    if trace_hops:
        print("hand-offs of a 2-stage split, traced ...", flush=True)
        trace = bench_trace("fast", max_tokens=48, reps=3)
    derive(rows)
    gpu = device_info()
    print_report(rows, [], gpu_where(gpu))
    print_transport(transport)
    if trace:
        print(f"hand-offs of a 2-stage fast split on loopback, median ms over {int(trace['steps'])} traced steps: "
              + ", ".join(f"{k} {v:.3f}" for k, v in trace.items() if k != "steps"))
    took = time.monotonic() - t_start
    print(f"took {took:.0f}s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": MODEL, "quick": quick, "took_s": took,
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
           "method": {"processes": "client-side streaming to the host node, one torch thread per node; step = (last "
                                   "chunk - first chunk) / (completion tokens - 1); median over runs",
                      "per_hop_ms": "(split step - solo step) / (stages - 1)"},
           "rows": rows, "transport": transport, "trace_ms": trace}
    if gpu:
        out["machine"].update(gpu)
    dest = RESULTS / result_name(f"split-{MODEL}")
    dest.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
