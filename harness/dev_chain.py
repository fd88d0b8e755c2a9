"""A local dev chain (`mesh402 chain dev`: anvil and the repo's contracts), its facilitator, paid nodes, and
the receipts a paid entry keeps. Hand-made payments are in harness/x402_payments.py."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh402.economics.networks import Deployment
from mesh402.home import read_secret_file
from harness.mesh_nodes import MeshNodes
from harness.procs import MESH402, NodeProcess, free_port

# Imported by benchmarks/payments.py too: its node processes run one torch thread each, like the tests'.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def wait_file(path: Path, proc: NodeProcess, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.proc.returncode}:\n{proc.log()[-4000:]}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{path} not written after {timeout}s:\n{proc.log()[-4000:]}")
        time.sleep(0.1)


@dataclass
class DevChain:
    proc: NodeProcess
    dep: Deployment
    dir: Path

    def key(self, account: str) -> str:
        return read_secret_file(self.dep.key_file(account))

    def w3(self) -> Any:
        from mesh402.economics.chain import web3_for
        return web3_for(self.dep.rpc_url)

    def balance(self, who: str) -> int:
        from mesh402.economics.chain import balance_of
        addr = who if who.startswith("0x") else self.dep.address(who)
        return balance_of(self.dep.rpc_url, self.dep.asset.address, addr)

    def transfer(self, sender: str, to: str, amount: int) -> None:
        """Move test USDC between accounts (e.g. a float for a node that pays other nodes)."""
        from mesh402.economics.chain import token_contract
        from mesh402.economics.evm import send_tx
        w3 = self.w3()
        tok = token_contract(w3, self.dep.asset.address)
        send_tx(w3, self.key(sender), tok.functions.transfer(w3.to_checksum_address(self.dep.address(to)), amount))

    def nonce_used(self, payer: str, nonce: str) -> bool:
        from mesh402.economics.chain import token_contract
        w3 = self.w3()
        tok = token_contract(w3, self.dep.asset.address)
        return bool(tok.functions.authorizationState(w3.to_checksum_address(payer), bytes.fromhex(nonce[2:])).call())


def start_chain(tmp: Path, *, buyers: int = 4, nodes: int = 2) -> DevChain:
    d = tmp / "chain"
    proc = NodeProcess([*MESH402, "chain", "dev", "--port", str(free_port()), "--dir", str(d),
                        "--buyers", str(buyers), "--nodes", str(nodes)], tmp / "chain-proc")
    wait_file(d / "deployment.json", proc, timeout=180)
    return DevChain(proc, Deployment.load(d), d)


def start_facilitator(tmp: Path, chain: DevChain) -> tuple[NodeProcess, str]:
    port = free_port()
    proc = NodeProcess([*MESH402, "facilitator", "--port", str(port), "--deployment", str(chain.dir)], tmp / "fac")
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/supported", timeout=60)
    return proc, url


@contextlib.contextmanager
def paid_mesh_env(tmp: Path, *, buyers: int = 4, nodes: int = 2) -> Iterator[tuple[DevChain, str, MeshNodes]]:
    """A dev chain, its facilitator and a MeshNodes under `tmp` for paid mesh scenarios: (chain, the
    facilitator's URL, nodes); every node, the facilitator and the chain are stopped on exit."""
    procs: list[NodeProcess] = []
    mesh = MeshNodes(tmp / "nodes")
    try:
        chain = start_chain(tmp, buyers=buyers, nodes=nodes)
        procs.append(chain.proc)
        fac, fac_url = start_facilitator(tmp, chain)
        procs.append(fac)
        yield chain, fac_url, mesh
    finally:
        mesh.stop_all()
        for p in reversed(procs):
            p.stop()


def start_paid_node(home: Path, chain: DevChain, facilitator: str, *extra: str, port: int | None = None
                    ) -> tuple[NodeProcess, str]:
    port = port or free_port()
    proc = NodeProcess([*MESH402, "serve", "--port", str(port), "--home", str(home), "--deployment", str(chain.dir),
                        "--facilitator", facilitator, *extra], home)
    base = f"http://127.0.0.1:{port}"
    proc.wait_http(base + "/ready", timeout=180)
    return proc, base


def entry_receipts(home: Path, count: int, timeout: float = 60.0) -> tuple[Any, int]:
    """Wait until a paid entry keeps `count` receipts; its ReceiptStore and the epoch of its first request."""
    from mesh402.work.store import ReceiptStore
    db = home / "receipts.sqlite"
    t0 = time.monotonic()
    def kept() -> bool:
        if not db.exists():
            return False
        st = ReceiptStore(db)
        try:
            return st.count() == count
        finally:
            st.close()
    while not kept():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{count} receipts not kept at {home} after {timeout}s")
        time.sleep(0.05)
    st = ReceiptStore(db)
    return st, int(st._db.execute("SELECT epoch FROM requests ORDER BY created_at").fetchone()[0])
