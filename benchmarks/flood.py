"""Flood benchmark: one peer floods a serving node; how much honest decode throughput is left.

    .venv/bin/python benchmarks/flood.py [--seconds 20] [--streams 64] [--kib 64] [--max-tokens 48] [--batch 4]

The honest node (`mesh402 serve`, the default model, `--threads 1`) runs pinned to one core
(taskset); the attacker runs in its own process pinned to the other core (``os.sched_setaffinity``)
and floods the node with 64 KiB ECHO frames on 64 streams (harness/flood.py). When the node cuts it
off for abuse, it joins again with a fresh identity (the reusable token allows it) and goes on, so
the flood lasts the whole measurement. Honest chat completions go to the node's API one after the
other: without the flood, with it, and without it again, in the same run (the quiet rate is the mean
of the two quiet phases, so a machine whose load drifts during the run does not pass for the flood).

What the attacker can offer is measured first, against a sink that takes everything (a member with the
quotas off that reads and drops every byte, on the node's core before the node starts): frames/s
written by the sender, the same sender and streams as the flood. Under the flood the node's flow
control decides how much the sender gets written. Reported: the sender's rate against the sink, the
frames it wrote and that the node accepted (echoed back) per second under the flood, the identities
it used (and how often the node refused it before the handshake), and the honest decode tokens/s
(wall, and per CPU-second the node process got) in each phase. Prints a table and writes
benchmarks/results/flood.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from harness.mesh_nodes import MeshNodes, wait_until  # noqa: E402
from harness.procs import MESH402  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NODE_CORE, ATTACK_CORE = 1, 0


def sink(seconds: float, home: Path) -> None:
    """Run in the sink process: a member with the quotas off whose ECHO streams read and drop everything.
    Prints its invite token and node id, then how many bytes it took."""
    os.sched_setaffinity(0, {NODE_CORE})
    from mesh402.mesh.config import MeshConfig, MeshTimers
    from mesh402.mesh.framing import StreamType
    from mesh402.mesh.limits import MeshLimits
    from mesh402.mesh.service import MeshService

    async def go() -> None:
        svc = MeshService(MeshConfig(home=home, bind_ip="127.0.0.1", timers=MeshTimers.fast(),
                                     limits=MeshLimits.unlimited()))
        took = 0

        async def drain(peer: bytes, fs) -> None:
            nonlocal took
            while chunk := await fs.recv_stream.read(4 << 20):
                took += len(chunk)

        svc.register_handler(StreamType.ECHO, drain)
        await svc.start()
        print(json.dumps({"token": svc.mint_invite(), "node_id": svc.node_id.hex()}), flush=True)
        await asyncio.sleep(seconds)
        print(json.dumps({"took_mib": round(took / 2**20, 1)}), flush=True)
        await svc.stop(graceful=False)

    asyncio.run(go())


def attacker(token: str, target_hex: str, seconds: float, streams: int, kib: int, home: Path, batch: int) -> dict:
    """Run in the attacker process: flood until ``seconds`` are up, rejoining as a fresh member when cut off."""
    os.sched_setaffinity(0, {ATTACK_CORE})
    from harness.flood import FloodStats, flood
    from mesh402.mesh.config import MeshConfig, MeshTimers
    from mesh402.mesh.service import MeshService

    async def go() -> dict:
        target = bytes.fromhex(target_hex)
        total, identities, admitted, t0 = FloodStats(), 0, 0, time.monotonic()
        flooding = 0.0  # seconds spent flooding, joins (and refused joins) left out
        end = t0 + seconds
        while time.monotonic() < end - 0.5:
            svc = MeshService(MeshConfig(home=home / f"m{identities}", bind_ip="127.0.0.1", timers=MeshTimers.fast()))
            identities += 1
            try:
                await asyncio.wait_for(svc.start(join=token), 10)
                admitted += 1
                st = await flood(svc, target, end - time.monotonic(), streams, kib * 1024, until_cut_off=True,
                                 batch=batch)
                for f in ("frames", "bytes", "replies", "resets", "open_failures"):
                    setattr(total, f, getattr(total, f) + getattr(st, f))
                flooding += st.seconds
            except Exception:
                await asyncio.sleep(0.2)
            finally:
                await svc.stop(graceful=False)
        total.seconds = time.monotonic() - t0
        return {"seconds": round(total.seconds, 2), "offered_frames": total.frames, "accepted_frames": total.replies,
                "offered_frames_per_s": round(total.frames / total.seconds, 1),
                "accepted_frames_per_s": round(total.replies / total.seconds, 1),
                "offered_mib_per_s": round(total.bytes / total.seconds / 2**20, 1),
                # the sender's own rate while it floods (against the sink: its capability, the join not counted)
                "flooding_seconds": round(flooding, 2),
                "sending_frames_per_s": round(total.frames / flooding, 1) if flooding else 0.0,
                "sending_mib_per_s": round(total.bytes / flooding / 2**20, 1) if flooding else 0.0,
                "streams_reset": total.resets, "identities": identities, "admitted": admitted}

    return asyncio.run(go())


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def decode_rate(api: str, model: str, seconds: float, max_tokens: int, pid: int | None = None) -> dict:
    """Honest chat completions one after the other for ``seconds``: completion tokens per second, and
    per second of CPU the node process got (on a shared machine the second says what the node itself
    spent, whatever else ran on its core)."""
    tokens, spent, n, failed = 0, 0.0, 0, 0
    cpu0 = cpu_seconds(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            r = httpx.post(f"{api}/v1/chat/completions", timeout=120, json={
                "model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"Count from {n} upward, one number per line."}]})
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
            spent += time.monotonic() - t0
            n += 1
        except httpx.HTTPError:
            failed += 1
    cpu = cpu_seconds(pid) - cpu0
    return {"requests": n, "failed": failed, "tokens": tokens, "tok_per_s": round(tokens / spent, 2) if spent else 0.0,
            "node_cpu_s": round(cpu, 2), "tok_per_node_cpu_s": round(tokens / cpu, 2) if cpu else 0.0}


def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)


def last_json(proc: subprocess.Popen, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def calibrate(args: argparse.Namespace, root: Path) -> dict:
    """The sender against a sink that takes everything: what it can offer."""
    secs = 6.0
    snk = spawn(["--sink", str(secs + 12), str(root / "sink")])
    assert snk.stdout is not None
    info = json.loads(snk.stdout.readline())
    att = last_json(spawn(["--streams", str(args.streams), "--kib", str(args.kib), "--batch", str(args.batch),
                           "--attacker", info["token"], info["node_id"], str(secs), str(root / "calib")]), 120)
    took = last_json(snk, 60)
    return {**att, **took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--kib", type=int, default=64, help="frame payload")
    ap.add_argument("--batch", type=int, default=4, help="frames the sender hands QUIC per write")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--attacker", nargs=4, metavar=("TOKEN", "NODE", "SECONDS", "HOME"), help=argparse.SUPPRESS)
    ap.add_argument("--sink", nargs=2, metavar=("SECONDS", "HOME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attacker:
        token, node, secs, home = args.attacker
        print(json.dumps(attacker(token, node, float(secs), args.streams, args.kib, Path(home), args.batch)))
        return
    if args.sink:
        sink(float(args.sink[0]), Path(args.sink[1]))
        return
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two cores: one for the node, one for the attacker")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        capacity = calibrate(args, root)
        nodes = MeshNodes(root)
        try:
            node = nodes.start("honest", no_model=False, fast=True, extra=["--threads", "1"], timeout=300,
                               launcher=["taskset", "-c", str(NODE_CORE), *MESH402])
            api = f"http://127.0.0.1:{node.api_port}"
            model = httpx.get(f"{api}/v1/models", timeout=30).json()["data"][0]["id"]
            wait_until(lambda: decode_rate(api, model, 0.1, 4)["requests"] > 0, 600, step=1.0,
                       what="the model loaded (503 while it loads)")
            decode_rate(api, model, 3, args.max_tokens)  # warm-up
            pid = node.proc.proc.pid
            quiet1 = decode_rate(api, model, args.seconds, args.max_tokens, pid)
            proc = spawn(["--streams", str(args.streams), "--kib", str(args.kib), "--batch", str(args.batch),
                          "--attacker", node.token(), node.node_id, str(args.seconds + 4), str(root / "attacker")])
            time.sleep(3)  # the attacker joins and its flood is on
            flooded = decode_rate(api, model, args.seconds, args.max_tokens, pid)
            attack = last_json(proc, 120)
            quiet2 = decode_rate(api, model, args.seconds, args.max_tokens, pid)
            counters = node.counters()
        finally:
            nodes.stop_all()
    load = tuple(round(max(a, b), 2) for a, b in zip(load, os.getloadavg()))
    quiet = {k: round((quiet1[k] + quiet2[k]) / 2, 2) for k in ("tok_per_s", "tok_per_node_cpu_s")}
    ratio = round(flooded["tok_per_s"] / quiet["tok_per_s"], 3) if quiet["tok_per_s"] else 0.0
    cpu_ratio = (round(flooded["tok_per_node_cpu_s"] / quiet["tok_per_node_cpu_s"], 3)
                 if quiet["tok_per_node_cpu_s"] else 0.0)
    res = {"model": model, "node_threads": 1, "streams": args.streams, "frame_kib": args.kib, "batch": args.batch,
           "load_avg_max": load, "sender_capacity": capacity, "quiet_before": quiet1, "flooded": flooded,
           "quiet_after": quiet2, "quiet_mean": quiet, "ratio": ratio, "cpu_ratio": cpu_ratio, "attack": attack,
           "node_counters": {k: v for k, v in counters.items() if k.startswith(("quota.", "admission."))}}
    print(f"sender against a sink that takes everything: {capacity['sending_frames_per_s']:.0f} frames/s of "
          f"{args.kib} KiB on {args.streams} streams while flooding ({capacity['sending_mib_per_s']:.0f} MiB/s; "
          f"{capacity['offered_frames_per_s']:.0f}/s over the whole {capacity['seconds']:.1f} s with its join; "
          f"the sink took {capacity['took_mib']:.0f} MiB)")
    print(f"{'phase':<13} {'honest tok/s':>13} {'tok/node-CPU-s':>15} {'requests':>9} {'written frames/s':>17} "
          f"{'accepted frames/s':>18} {'written MiB/s':>14} {'identities':>11}")
    for name, ph in (("quiet before", quiet1), ("flooded", flooded), ("quiet after", quiet2)):
        cols = ((f"{attack['offered_frames_per_s']:>17.0f} {attack['accepted_frames_per_s']:>18.0f} "
                 f"{attack['offered_mib_per_s']:>14.0f} {attack['admitted']:>5}/{attack['identities']:<5}")
                if ph is flooded else f"{'-':>17} {'-':>18} {'-':>14} {'-':>11}")
        print(f"{name:<13} {ph['tok_per_s']:>13.2f} {ph['tok_per_node_cpu_s']:>15.2f} {ph['requests']:>9} {cols}")
    print(f"flooded / quiet: {ratio:.2f}x tok/s, {cpu_ratio:.2f}x tok per node CPU second (target >= 0.8x); "
          f"load average up to {load[0]:.1f}; node: "
          + ", ".join(f"{k}={v}" for k, v in sorted(res["node_counters"].items())))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flood.json").write_text(json.dumps(res, indent=1))
    print(f"\nwrote {RESULTS / 'flood.json'}")


if __name__ == "__main__":
    main()
