"""A delayed private network between network namespaces, for benchmarks and tests (needs root).

This kernel has no netem, so delay comes from a small user-space forwarder: every namespace gets
one TUN device (`IFF_TUN | IFF_NO_PI`, raw IPv4 packets) with an address in 10.77.0.0/24; a
forwarder process holds all the TUN file descriptors and writes each packet into the TUN of the
namespace that owns its destination address after `delay_ms` (one way), so the RTT between any
two namespaces is 2 x delay_ms plus the forwarder's own cost. Nothing else is routed: a namespace
holds only `lo` and its TUN, so no traffic can leave the machine.

    with DelayNet(["a", "b"], delay_ms=5) as net:      # 10 ms RTT between a and b
        net.popen("a", [python, "-m", "mesh402.cli", "serve", "--bind-ip", net.ip("a"), ...])
        net.call("a", httpx.get, "http://127.0.0.1:3131/api/status")   # HTTP inside a's namespace

    python benchmarks/netdelay.py --selftest          # RTT of a UDP echo through 0, 5 and 20 ms

`net.call` runs a function on a fresh thread that has entered the namespace (setns is per
thread), so the caller can talk to loopback services inside it. Namespaces are deleted on exit,
on SIGINT/SIGTERM, and at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import fcntl
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SUBNET = "10.77.0"

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace behind fd (Python 3.11 has no os.setns)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class _InNs:
    """Context manager: the calling thread is inside a namespace, and back in its own on exit."""

    def __init__(self, ns: str) -> None:
        self.ns = ns

    def __enter__(self) -> None:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/var/run/netns/{self.ns}", os.O_RDONLY)
        try:
            setns(fd)
        finally:
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        try:
            setns(self._home)
        finally:
            os.close(self._home)


def open_tun(ns: str, name: str) -> int:
    """Create TUN device `name` inside namespace `ns`; returns its (non-blocking) packet fd."""
    with _InNs(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def can_create() -> str | None:
    """None when namespaces and TUN devices can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_NET_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if subprocess.run(["ip", "-V"], capture_output=True).returncode != 0:
        return "iproute2 (ip) is not installed"
    probe = f"m4probe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except OSError as e:
        return f"cannot create a network namespace: {e}"
    try:
        os.close(open_tun(probe, "tun0"))
    except OSError as e:
        return f"cannot create a TUN device in a namespace: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# ------------------------------------------------------------------------- the forwarder process

def forward(fds: dict[str, int], delay_s: float) -> None:
    """Route IPv4 packets between TUN fds by destination address, each delayed by delay_s."""
    loop = asyncio.new_event_loop()
    by_ip = {socket.inet_aton(ip): fd for ip, fd in fds.items()}

    def write(fd: int, pkt: bytes) -> None:
        try:
            os.write(fd, pkt)
        except OSError:
            pass  # namespace going away, or the TUN queue full: a lost packet, as on a real link

    def readable(fd: int) -> None:
        for _ in range(64):  # drain a burst, then let timers run
            try:
                pkt = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                loop.remove_reader(fd)
                return
            if len(pkt) < 20 or pkt[0] >> 4 != 4:
                continue  # IPv6 router solicitations and the like: dropped
            dst = by_ip.get(pkt[16:20])
            if dst is None:
                continue
            if delay_s > 0:
                loop.call_later(delay_s, write, dst, pkt)
            else:
                write(dst, pkt)

    for fd in fds.values():
        loop.add_reader(fd, readable, fd)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    loop.run_forever()


def _forwarder_main(namespaces: list[str], delay_ms: float) -> None:
    fds: dict[str, int] = {}
    for i, ns in enumerate(namespaces):
        ip = f"{SUBNET}.{i + 1}"
        fds[ip] = open_tun(ns, "tun0")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "tun0")
        _ip("-n", ns, "link", "set", "tun0", "up")
    forward(fds, delay_ms / 1000.0)


# ------------------------------------------------------------------------- the public object

class DelayNet:
    """Namespaces `names` joined through one delaying forwarder; `ip(name)` is each one's address."""

    def __init__(self, names: list[str], delay_ms: float, prefix: str = "m402") -> None:
        self.tag = f"{prefix}{uuid.uuid4().hex[:5]}"
        self.names = list(names)
        self.delay_ms = delay_ms
        self.ns = {n: f"{self.tag}-{n}" for n in names}
        self._fwd: subprocess.Popen | None = None
        self._procs: list[subprocess.Popen] = []
        self._closed = False

    def ip(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def start(self) -> "DelayNet":
        atexit.register(self.close)
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, self._on_signal(prev))
        for n in self.names:
            _ip("netns", "add", self.ns[n])
            _ip("-n", self.ns[n], "link", "set", "lo", "up")
        self._fwd = subprocess.Popen([sys.executable, __file__, "--forward", str(self.delay_ms),
                                      *[self.ns[n] for n in self.names]],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self._fwd.stdout.readline() if self._fwd.stdout else ""
        if line.strip() != "ready":
            err = self._fwd.stderr.read() if self._fwd.stderr else ""
            self.close()
            raise OSError(f"delay forwarder failed to start: {err.strip()[-500:]}")
        return self

    def _on_signal(self, prev: Any) -> Callable[..., None]:
        def handler(signum: int, frame: Any) -> None:
            self.close()
            if callable(prev):
                prev(signum, frame)
            else:
                raise KeyboardInterrupt
        return handler

    def __enter__(self) -> "DelayNet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def popen(self, name: str, args: list[str], **kw: Any) -> subprocess.Popen:
        """Start a process inside namespace `name` (it is stopped when the net closes)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[name], *args], **kw)
        self._procs.append(p)
        return p

    def call(self, name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """fn(*args, **kw) on a thread inside namespace `name`; its sockets live there."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                fd = os.open(f"/var/run/netns/{self.ns[name]}", os.O_RDONLY)
                try:
                    setns(fd)
                finally:
                    os.close(fd)
                box["v"] = fn(*args, **kw)
            except BaseException as e:  # handed to the caller
                box["e"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join()
        if "e" in box:
            raise box["e"]
        return box.get("v")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self._fwd is not None and self._fwd.poll() is None:
            self._fwd.terminate()
            try:
                self._fwd.wait(5)
            except subprocess.TimeoutExpired:
                self._fwd.kill()
        for n in self.names:
            subprocess.run(["ip", "netns", "pids", self.ns[n]], capture_output=True)
            subprocess.run(["ip", "netns", "del", self.ns[n]], capture_output=True)


# ------------------------------------------------------------------------- self test

def udp_rtt(net: DelayNet, a: str, b: str, n: int = 20) -> list[float]:
    """UDP echo from a to b: per-packet round trips in ms."""
    ready = threading.Event()

    def echo() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((net.ip(b), 9999))
        s.settimeout(5)
        ready.set()
        try:
            for _ in range(n):
                data, addr = s.recvfrom(2048)
                s.sendto(data, addr)
        except OSError:
            pass
        s.close()

    srv = threading.Thread(target=net.call, args=(b, echo), daemon=True)
    srv.start()
    ready.wait(5)

    def client() -> list[float]:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            s.sendto(b"x" * 64, (net.ip(b), 9999))
            s.recvfrom(2048)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    try:
        return net.call(a, client)
    finally:
        srv.join(6)


def _selftest() -> None:
    why = can_create()
    if why:
        print(f"skipped: {why}")
        return
    for d in (0, 5, 20):
        with DelayNet(["a", "b"], d) as net:
            rtts = udp_rtt(net, "a", "b")
            print(f"delay {d:>2} ms each way: UDP RTT median {statistics.median(rtts):.2f} ms "
                  f"(min {min(rtts):.2f}, max {max(rtts):.2f})")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--forward":
        _forwarder_main(sys.argv[3:], float(sys.argv[2]))
    elif sys.argv[1:] == ["--selftest"]:
        _selftest()
    else:
        print(__doc__)
