"""Payment test helpers: a local chain (`mesh402 chain dev`), a facilitator, paid nodes, and hand-made
x402 payments (good and deliberately bad) signed with eth-account."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mesh402.economics.networks import Deployment
from mesh402.home import read_secret_file
from tests.procs import MESH402, NodeProcess, free_port


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


def paid_chain(tmp: Path, nodes: int = 2) -> tuple[DevChain, NodeProcess, list[str]]:
    """A dev chain (one buyer, `nodes` node accounts), its facilitator, and the `serve` flags of a paid node
    using them (price 0.01 to node-0). Fails the test when the npm contract toolchain is missing."""
    import pytest

    from mesh402.economics.toolchain import tools_ready
    if not tools_ready():
        pytest.fail("the npm contract toolchain is missing: run bash scripts/setup-dev-extra.sh")
    chain = start_chain(tmp, buyers=1, nodes=nodes)
    fac, fac_url = start_facilitator(tmp, chain)
    return chain, fac, ["--price", "0.01", "--pay-to", "node-0", "--deployment", str(chain.dir), "--facilitator", fac_url]


def start_paid_node(home: Path, chain: DevChain, facilitator: str, *extra: str, port: int | None = None
                    ) -> tuple[NodeProcess, str]:
    port = port or free_port()
    proc = NodeProcess([*MESH402, "serve", "--port", str(port), "--home", str(home), "--deployment", str(chain.dir),
                        "--facilitator", facilitator, *extra], home)
    base = f"http://127.0.0.1:{port}"
    proc.wait_http(base + "/ready", timeout=180)
    return proc, base


# ---- hand-made payments ---------------------------------------------------------------------------

def decode_b64json(value: str) -> dict[str, Any]:
    return json.loads(base64.b64decode(value))


def sign_payment(key: str, required: dict[str, Any], *, value: int | None = None, to: str | None = None,
                 asset: str | None = None, valid_before: int | None = None, nonce: str | None = None,
                 chain_id: int | None = None, tamper_signature: bool = False) -> tuple[str, dict[str, Any]]:
    """A PAYMENT-SIGNATURE header for the first of `required['accepts']`, with any field overridden."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    req = dict(required["accepts"][0])
    acct = Account.from_key(key)
    auth = {"from": acct.address, "to": to or req["payTo"], "value": str(value if value is not None else req["amount"]),
            "validAfter": "0", "validBefore": str(valid_before or int(time.time()) + int(req["maxTimeoutSeconds"])),
            "nonce": nonce or "0x" + secrets.token_hex(32)}
    domain = {"name": req["extra"]["name"], "version": req["extra"]["version"],
              "chainId": chain_id or int(req["network"].split(":")[1]), "verifyingContract": asset or req["asset"]}
    types = {"TransferWithAuthorization": [
        {"name": "from", "type": "address"}, {"name": "to", "type": "address"}, {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"}, {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"}]}
    msg = {**auth, "value": int(auth["value"]), "validAfter": 0, "validBefore": int(auth["validBefore"]),
           "nonce": bytes.fromhex(auth["nonce"][2:])}
    signed = acct.sign_message(encode_typed_data(domain_data=domain, message_types=types, message_data=msg))
    sig = signed.signature.hex()
    sig = sig if sig.startswith("0x") else "0x" + sig
    if tamper_signature:
        sig = sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:]
    accepted = dict(req)
    if asset:
        accepted["asset"] = asset
    payload = {"x402Version": 2, "resource": required.get("resource"), "accepted": accepted,
               "payload": {"signature": sig, "authorization": auth}}
    return base64.b64encode(json.dumps(payload).encode()).decode(), auth


def get_402(base: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.post(base + path, json=body, headers=headers or {}, timeout=60)
    assert r.status_code == 402, r.text
    return decode_b64json(r.headers["PAYMENT-REQUIRED"])


def x402_client(key: str, dep: Deployment, cap: int = 1_000_000) -> Any:
    """The official x402 SDK client, with the local test token allow-listed (its only required change)."""
    from eth_account import Account
    from x402 import x402Client
    from x402.mechanisms.evm.exact import register_exact_evm_client

    c = x402Client()
    register_exact_evm_client(c, Account.from_key(key))
    c.set_spend_controls({"allowed_assets": [{"network": dep.network, "asset": dep.asset.address,
                                              "max_amount_per_payment": str(cap)}]})
    return c


os.environ.setdefault("OMP_NUM_THREADS", "1")


def buy_chat(chain: DevChain, api_port: int, body: dict[str, Any], buyer: str = "buyer-0") -> int:
    """One chat completion bought from a paid node with the official x402 SDK client; the HTTP status."""
    import asyncio

    from x402.http.clients import x402HttpxClient

    async def buy() -> int:
        async with x402HttpxClient(x402_client(chain.key(buyer), chain.dep), timeout=180) as client:
            r = await client.post(f"http://127.0.0.1:{api_port}/v1/chat/completions", json=body)
            return r.status_code
    return asyncio.run(buy())


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
