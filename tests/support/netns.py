"""Two network namespaces joined by a veth pair, for tests that need multicast (mDNS) between
hosts without touching real interfaces. Loopback has no multicast, so this is the only way."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class NetnsPair:
    def __init__(self, tag: str) -> None:
        self.ns = (f"m402{tag}a", f"m402{tag}b")
        self.ips = ("10.77.0.1", "10.77.0.2")
        self.devs = (f"m4{tag}va", f"m4{tag}vb")

    def up(self) -> "NetnsPair":
        for ns in self.ns:
            _ip("netns", "add", ns)
        _ip("link", "add", self.devs[0], "type", "veth", "peer", "name", self.devs[1])
        for ns, dev, ip in zip(self.ns, self.devs, self.ips):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up", "multicast", "on")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)
        return self

    def down(self) -> None:
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i]]


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"m402probe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    pair = NetnsPair(str(os.getpid() % 100000))
    try:
        pair.up()
    except subprocess.CalledProcessError as e:
        pair.down()
        pytest.skip(f"cannot build a veth pair between namespaces: {e.stderr.decode().strip()}")
    try:
        yield pair
    finally:
        pair.down()
