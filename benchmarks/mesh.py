"""Mesh benchmark: join time, gossip convergence (3-8 nodes), frame round trip, bulk throughput.

    .venv/bin/python benchmarks/mesh.py [--quick] [--no-procs]

Everything runs on loopback. Prints a table and writes benchmarks/results/mesh.json.

- join: a fresh node presents a token; time until start() returns admitted with the
  inviter's announcement (in-process), and for a `mesh402 client --join` process, from
  process start until its /api/status lists the inviter as alive.
- down detection: kill -9 one of three node processes; time until both others mark it
  down (fast test timers and production timers).
- convergence: N nodes (3..8) each join through the token of a random earlier member;
  time from the last join until every node is directly connected to every other
  (formation), then time for one node's new announcement to reach all others (update).
  In-process nodes share one Python thread, so these are upper bounds; --procs runs
  N node processes as well (N=3 and 8, production timers).
- frame RTT: Ping/Pong on a fresh stream (what heartbeats do), and Echo frames on one
  persistent stream, to a node in another process.
- throughput: 1 MiB Echo frames over one stream to a node process, upload (payload
  discarded) and echo (payload returned); upload also with the stock iroh binding
  (per-byte copy) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from mesh402.mesh import iroh_fastcopy  # noqa: E402
from mesh402.mesh.config import MeshConfig, MeshTimers  # noqa: E402
from mesh402.mesh.framing import MAX_FRAME_SIZE, StreamType, make_frame  # noqa: E402
from mesh402.mesh.proto import mesh_pb2 as pb  # noqa: E402
from mesh402.mesh.service import MeshService  # noqa: E402
from harness.procs import free_port  # noqa: E402

PY = sys.executable


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def svc(root: Path, name: str) -> MeshService:
    return MeshService(MeshConfig(home=root / name, bind_ip="127.0.0.1", timers=MeshTimers.fast(), kind="client"))


async def wait(pred, timeout=30.0, step=0.002) -> float:
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(step)
    return time.perf_counter() - t0


def full_mesh(nodes: list[MeshService]) -> bool:
    ids = {n.node_id for n in nodes}
    return all(set(n.connected_peers()) == ids - {n.node_id} for n in nodes)


# ------------------------------------------------------------------ node processes


class Proc:
    def __init__(self, root: Path, name: str, join: str | None = None, kind: str = "serving", fast: bool = False):
        self.home = root / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.console = free_port()
        cmd = ["client"] if kind == "client" else ["serve", "--no-model"]
        args = [PY, "-m", "mesh402.cli", *cmd, "--home", str(self.home), "--port", str(free_port()),
                "--console", str(self.console), "--bind-ip", "127.0.0.1"]
        if fast:
            args.append("--mesh-fast-timers")
        if join:
            args += ["--join", join]
        self.log = open(self.home / "node.log", "wb")
        self.t_start = time.perf_counter()
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def status(self) -> dict | None:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.console}/api/status", timeout=2).json()
        except Exception:
            return None

    def wait_up(self, timeout=60.0) -> dict:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.p.poll() is not None:
                raise RuntimeError((self.home / "node.log").read_text()[-2000:])
            st = self.status()
            if st:
                return st
            time.sleep(0.02)
        raise TimeoutError("node did not come up")

    def token(self) -> str:
        import httpx

        from mesh402.node.mesh_runtime import read_console_token

        auth = {"Authorization": f"Bearer {read_console_token(self.home)}"}
        return httpx.post(f"http://127.0.0.1:{self.console}/api/invite", json={"expires": "1h"}, headers=auth,
                          timeout=5).json()["token"]

    def stop(self) -> None:
        if self.p.poll() is None:
            import os

            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
        self.log.close()


# ------------------------------------------------------------------ benchmarks


async def bench_join_inprocess(root: Path, trials: int) -> dict:
    a = svc(root, "join-a")
    await a.start()
    times = []
    for i in range(trials):
        b = svc(root, f"join-b{i}")
        tok = a.invite_token
        t0 = time.perf_counter()
        await b.start(join=tok)
        times.append((time.perf_counter() - t0) * 1000)
        await b.stop()  # one joiner at a time: the mesh stays two nodes
        await asyncio.sleep(0.05)
    await a.stop()
    return {"trials": trials, "median_ms": statistics.median(times), "p90_ms": pct(times, 90), "min_ms": min(times)}


def bench_join_process(root: Path) -> dict:
    a = Proc(root, "pjoin-a")
    a.wait_up()
    tok = a.token()
    a_id = a.status()["node_id"]
    b = Proc(root, "pjoin-b", join=tok, kind="client")
    try:
        t_up = None
        while True:
            st = b.status()
            if st and t_up is None:
                t_up = time.perf_counter() - b.t_start
            if st and any(p["node_id"] == a_id and p["state"] == "alive" for p in st["peers"]):
                break
            if time.perf_counter() - b.t_start > 60:
                raise TimeoutError
            time.sleep(0.01)
        total = time.perf_counter() - b.t_start
    finally:
        b.stop()
        a.stop()
    return {"process_start_to_peer_visible_s": total, "process_start_to_console_up_s": t_up}


async def bench_convergence_inprocess(root: Path, n: int, rng: random.Random) -> dict:
    nodes = [svc(root, f"conv{n}-0")]
    await nodes[0].start()
    for i in range(1, n):
        via = rng.choice(nodes)
        x = svc(root, f"conv{n}-{i}")
        if i == n - 1:
            t0 = time.perf_counter()
        await x.start(join=via.invite_token)
        nodes.append(x)
    formation = await wait(lambda: full_mesh(nodes))
    formation_total = time.perf_counter() - t0
    # update propagation: one node changes its announcement
    src = nodes[rng.randrange(n)]
    src.update_local(name="changed")
    seq = src.self_announcement().seq
    t1 = time.perf_counter()
    await wait(lambda: all(m.gossip.get(src.node_id) is not None and m.gossip.get(src.node_id).seq >= seq
                           for m in nodes if m is not src))
    update = time.perf_counter() - t1
    await asyncio.gather(*(m.stop(graceful=False) for m in nodes))
    return {"n": n, "last_join_to_full_mesh_ms": formation_total * 1000, "update_all_nodes_ms": update * 1000}


def bench_convergence_procs(root: Path, n: int, rng: random.Random) -> dict:
    procs = [Proc(root, f"pconv{n}-0")]
    procs[0].wait_up()
    ids = [procs[0].status()["node_id"]]
    try:
        for i in range(1, n):
            via = rng.choice(procs)
            p = Proc(root, f"pconv{n}-{i}", join=via.token())
            st = p.wait_up()
            ids.append(st["node_id"])
            procs.append(p)
        t_last = procs[-1].t_start
        t_up = time.perf_counter()  # the last node's console answers
        t0 = time.perf_counter()
        while True:
            sts = [p.status() for p in procs]
            if all(st and {q["node_id"] for q in st["peers"] if q["connected"] and q["state"] == "alive"} == set(ids) - {st["node_id"]}
                   for st in sts):
                break
            if time.perf_counter() - t0 > 60:
                raise TimeoutError("no full mesh")
            time.sleep(0.02)
        now = time.perf_counter()
        return {"n": n, "last_process_start_to_full_mesh_s": now - t_last, "last_node_up_to_full_mesh_s": now - t_up}
    finally:
        for p in procs:
            p.stop()


async def bench_rtt_and_throughput(root: Path, quick: bool) -> dict:
    remote = Proc(root, "echo-remote", fast=True)
    remote.wait_up()
    me = svc(root, "echo-local")
    await me.start(join=remote.token())
    rid = me.connected_peers()[0]
    out: dict = {}
    try:
        # frame RTT, Ping/Pong on a fresh stream each (heartbeat path)
        n = 200 if quick else 1000
        for _ in range(20):
            await me.ping(rid, 5)
        rtts = [await me.ping(rid, 5) for _ in range(n)]
        out["ping_new_stream_ms"] = {"median": statistics.median(rtts), "p99": pct(rtts, 99), "n": n}
        # Echo frames, 64 B, one persistent stream
        fs = await me.open_stream(rid, StreamType.ECHO)
        lat = []
        payload = b"x" * 64
        for i in range(n + 20):
            t0 = time.perf_counter()
            await fs.send(make_frame(echo=pb.Echo(payload=payload)))
            f = await fs.recv(5)
            if i >= 20:
                lat.append((time.perf_counter() - t0) * 1000)
            assert f.echo.payload == payload
        await fs.finish()
        out["echo_64B_same_stream_ms"] = {"median": statistics.median(lat), "p99": pct(lat, 99), "n": n}

        async def transfer(total_mib: int, discard: bool) -> float:
            fs = await me.open_stream(rid, StreamType.ECHO, max_frame=MAX_FRAME_SIZE)
            chunk = b"\xa5" * (1 << 20)
            pending = 0
            window = 8

            async def reader(count: int) -> None:
                for _ in range(count):
                    f = await fs.recv(60)
                    assert f is not None

            t0 = time.perf_counter()
            rd = asyncio.ensure_future(reader(total_mib))
            for i in range(total_mib):
                await fs.send(make_frame(echo=pb.Echo(payload=chunk, discard=discard)))
            await rd
            await fs.finish()
            dt = time.perf_counter() - t0
            return total_mib * (1 << 20) / dt / 1e6

        big = 16 if quick else 64
        out["upload_MBps_patched"] = await transfer(big, True)
        out["echo_MBps_patched"] = await transfer(big // 2, False)
        iroh_fastcopy.revert()
        try:
            out["upload_MBps_stock"] = await transfer(8 if quick else 16, True)
        finally:
            iroh_fastcopy.apply()
        out["bulk_sizes_MiB"] = {"upload_patched": big, "echo_patched": big // 2, "upload_stock": 8 if quick else 16}
    finally:
        await me.stop()
        remote.stop()
    return out


def bench_down_detection(root: Path, fast: bool) -> dict:
    """kill -9 one of three node processes; time until both others list it as down."""
    a = Proc(root, f"down{fast}-a", fast=fast)
    a.wait_up()
    b = Proc(root, f"down{fast}-b", join=a.token(), fast=fast)
    b.wait_up()
    c = Proc(root, f"down{fast}-c", join=a.token(), fast=fast)
    c_id = c.wait_up()["node_id"]
    try:
        t0 = time.perf_counter()
        while True:
            sts = [a.status(), b.status()]
            if all(st and any(p["node_id"] == c_id and p["state"] == "alive" and p["connected"] for p in st["peers"]) for st in sts):
                break
            if time.perf_counter() - t0 > 30:
                raise TimeoutError("no mesh")
            time.sleep(0.02)
        time.sleep(0.5)
        import os

        os.killpg(c.p.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        while True:
            sts = [a.status(), b.status()]
            if all(st and any(p["node_id"] == c_id and p["state"] == "down" for p in st["peers"]) for st in sts):
                break
            if time.perf_counter() - t0 > 60:
                raise TimeoutError("not marked down")
            time.sleep(0.02)
        return {"timers": "fast" if fast else "production", "kill9_to_down_on_both_s": time.perf_counter() - t0}
    finally:
        for p in (a, b, c):
            p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials, smaller transfers")
    ap.add_argument("--no-procs", action="store_true", help="skip the node-process measurements")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    res: dict = {"machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                             "platform": platform.platform()}, "timers": "MeshTimers.fast()"}

    async def inproc() -> None:
        res["join_inprocess"] = await bench_join_inprocess(root, 5 if args.quick else 20)
        res["convergence_inprocess"] = [await bench_convergence_inprocess(root, n, rng) for n in range(3, 9)]
        res["rtt_throughput"] = await bench_rtt_and_throughput(root, args.quick)

    asyncio.run(inproc())
    if not args.no_procs:
        res["join_process"] = bench_join_process(root)
        res["convergence_procs"] = [bench_convergence_procs(root, n, rng) for n in ((3,) if args.quick else (3, 8))]
        res["down_detection"] = [bench_down_detection(root, fast) for fast in (True, False)]

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mesh.json").write_text(json.dumps(res, indent=1))
    print_table(res)
    print(f"\nwrote {RESULTS / 'mesh.json'}")


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="mesh402 mesh benchmark (loopback)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    j = res["join_inprocess"]
    t.add_row("join, token -> admitted with peers (in-process), median / p90", f"{j['median_ms']:.1f} / {j['p90_ms']:.1f} ms")
    if "join_process" in res:
        jp = res["join_process"]
        t.add_row("join, `client --join` process start -> peer visible", f"{jp['process_start_to_peer_visible_s']:.2f} s")
    for c in res["convergence_inprocess"]:
        t.add_row(f"{c['n']} nodes: last join -> full mesh / update reaches all (in-process)",
                  f"{c['last_join_to_full_mesh_ms']:.0f} / {c['update_all_nodes_ms']:.0f} ms")
    for c in res.get("convergence_procs", []):
        t.add_row(f"{c['n']} node processes: last process start (console up) -> full mesh",
                  f"{c['last_process_start_to_full_mesh_s']:.2f} s ({c['last_node_up_to_full_mesh_s']:.2f} s)")
    for d in res.get("down_detection", []):
        t.add_row(f"kill -9 -> down on both other nodes ({d['timers']} timers)", f"{d['kill9_to_down_on_both_s']:.2f} s")
    r = res["rtt_throughput"]
    t.add_row("frame RTT, Ping/Pong on a new stream, median / p99", f"{r['ping_new_stream_ms']['median']:.3f} / {r['ping_new_stream_ms']['p99']:.3f} ms")
    t.add_row("frame RTT, 64 B Echo on one stream, median / p99", f"{r['echo_64B_same_stream_ms']['median']:.3f} / {r['echo_64B_same_stream_ms']['p99']:.3f} ms")
    t.add_row("bulk upload, 1 MiB frames (patched iroh)", f"{r['upload_MBps_patched']:.0f} MB/s")
    t.add_row("bulk echo, 1 MiB frames both ways (patched)", f"{r['echo_MBps_patched']:.0f} MB/s")
    t.add_row("bulk upload, stock iroh binding (per-byte copy)", f"{r['upload_MBps_stock']:.1f} MB/s")
    Console().print(t)


if __name__ == "__main__":
    main()
