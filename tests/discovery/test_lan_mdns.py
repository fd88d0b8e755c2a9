"""LAN discovery (mDNS) between two network namespaces joined by a veth pair: an open mesh is
found and joined by an `--auto --discover-lan` node with no token; the TXT record never carries
the invite token or the mesh secret; a private mesh is listed but not joined."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.procs import MESH402, REPO, NodeProcess, free_port
from tests.support.netns import NetnsPair

BROWSE = """
import asyncio, json
from dataclasses import asdict
from mesh402.discovery.lan import browse
print(json.dumps([asdict(x) for x in asyncio.run(browse(1.5))]))
"""
RAW_TXT = """
import asyncio, json
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncZeroconf, AsyncServiceBrowser, AsyncServiceInfo
from mesh402.discovery.lan import SERVICE
async def main():
    names = set()
    azc = AsyncZeroconf()
    b = AsyncServiceBrowser(azc.zeroconf, [SERVICE], handlers=[lambda zeroconf, service_type, name, state_change: names.add(name)])
    await asyncio.sleep(1.5)
    out = []
    for n in names:
        i = AsyncServiceInfo(SERVICE, n)
        await i.async_request(azc.zeroconf, 1500)
        out.append({k.decode(): (v or b"").decode() for k, v in (i.properties or {}).items()})
    await b.async_cancel(); await azc.async_close()
    print(json.dumps(out))
asyncio.run(main())
"""


def in_ns(pair: NetnsPair, i: int, code: str, timeout: float = 20) -> str:
    r = subprocess.run([*pair.prefix(i), sys.executable, "-c", code], capture_output=True, timeout=timeout,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return r.stdout.decode()


def status(pair: NetnsPair, i: int, console: int) -> dict:
    return json.loads(in_ns(pair, i, f"import httpx; print(httpx.get('http://127.0.0.1:{console}/api/status').text)"))


def start(pair: NetnsPair, i: int, home: Path, *extra: str) -> tuple[NodeProcess, int]:
    console = free_port()
    args = [*pair.prefix(i), *MESH402, "serve", "--no-model", "--home", str(home), "--port", str(free_port()),
            "--console", str(console), "--bind-ip", pair.ips[i], "--mesh-fast-timers", "--discover-lan", *extra]
    return NodeProcess(args, home), console


def wait(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return time.monotonic() - t0
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(0.3)
    raise AssertionError(f"{what} not reached in {timeout}s ({last!r})")


def seen(pair: NetnsPair, code: str, ok, timeout: float = 45) -> list[dict]:
    """What `code` (BROWSE or RAW_TXT) finds from namespace 1, browsing again until `ok(found)` or the
    timeout: a node registers its record in the background after it is up (with ~0.75 s of probing), so
    one browse of 1.5 s may come too soon on a loaded machine. The last result, for the test's asserts."""
    t0 = time.monotonic()
    while True:
        found = json.loads(in_ns(pair, 1, code))
        if ok(found) or time.monotonic() - t0 > timeout:
            return found


def test_lan_open_mesh_join_and_private_mesh_not_leaked(netns_pair: NetnsPair, tmp_path: Path) -> None:
    pair = netns_pair
    a, ca = start(pair, 0, tmp_path / "a", "--mesh-policy", "open")
    procs = [a]
    try:
        wait(lambda: status(pair, 0, ca)["mesh_id"], 60, "node A up")
        mesh_a = status(pair, 0, ca)["mesh_id"]
        found = seen(pair, BROWSE, lambda f: [x["mesh_id"] for x in f] == [mesh_a])
        assert [x["mesh_id"] for x in found] == [mesh_a] and found[0]["policy"] == "open"
        raw = seen(pair, RAW_TXT, bool)
        assert raw and all(not any(v.startswith("m402") for v in txt.values()) for txt in raw)
        assert raw[0]["tok_fp"] and raw[0]["addrs"].startswith(pair.ips[0])

        t0 = time.monotonic()
        b, cb = start(pair, 1, tmp_path / "b", "--auto", "--auto-interval", "100")
        procs.append(b)
        wait(lambda: status(pair, 1, cb)["mesh_id"] == mesh_a and any(
            p["state"] == "alive" for p in status(pair, 1, cb)["peers"]), 60, "B joined A over the LAN")
        print(f"\nLAN --auto join: {time.monotonic() - t0:.2f}s from B's start")
        a.stop()
        b.stop()
        procs.clear()

        # a private (secret) mesh: listed without its token or secret, and not joined
        p, cp = start(pair, 0, tmp_path / "p")
        procs.append(p)
        wait(lambda: status(pair, 0, cp)["policy"] == "secret", 60, "private node up")
        secret = (tmp_path / "p" / "mesh.secret").read_text().strip()
        raw = seen(pair, RAW_TXT, lambda r: bool(r) and r[0]["policy"] == "private")
        assert raw and raw[0]["policy"] == "private"
        blob = json.dumps(raw)
        assert secret not in blob and "m402" not in blob
        q, cq = start(pair, 1, tmp_path / "q", "--auto", "--auto-interval", "100")
        procs.append(q)
        wait(lambda: status(pair, 1, cq)["mesh_id"], 60, "Q up")
        assert status(pair, 1, cq)["mesh_id"] != status(pair, 0, cp)["mesh_id"]
    finally:
        for pr in procs:
            pr.stop()
