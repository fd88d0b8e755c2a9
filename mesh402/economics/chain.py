"""`mesh402 chain dev`: a local anvil chain with the project's own contracts and funded test accounts.

Deploys from anvil's pre-unlocked dev account 0 (via eth_sendTransaction, so no deployer key is handled
here), then generates a fresh key per node / buyer / facilitator, written 0600 under <dir>/keys, funds
them with ETH (gas) and the test token, and writes <dir>/deployment.json for nodes and clients to read.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh402.economics.contracts import compile_contracts
from mesh402.economics.networks import DEPLOYMENT_FILE, Asset, Deployment
from mesh402.economics.toolchain import ToolchainError, anvil_binary, ensure_tools
from mesh402.home import write_atomic, write_private

LOCAL_CHAIN_ID = 31337
MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11"
TOKEN_NAME = "Mesh Test USDC"
TOKEN_SYMBOL = "USDC"


def _write_secret(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, data)


class Anvil:
    """An anvil child process on 127.0.0.1."""

    def __init__(self, port: int, *, chain_id: int = LOCAL_CHAIN_ID, log_path: Path | None = None,
                 block_time: float | None = None) -> None:
        ensure_tools()
        self.port = port
        self.rpc_url = f"http://127.0.0.1:{port}"
        args = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port), "--chain-id", str(chain_id),
                "--accounts", "1", "--balance", "1000000"]
        if block_time:
            args += ["--block-time", str(block_time)]
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        # in the caller's process group (no session of its own): whoever stops that group (a supervisor, a test
        # harness, Ctrl-C in a terminal) stops anvil too, even with a SIGKILL that leaves the caller no chance to
        # stop it itself
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        import httpx
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise ToolchainError(f"anvil exited with {self.proc.returncode} (port {self.port} taken?)")
            try:
                r = httpx.post(self.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
                               timeout=1.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise ToolchainError(f"anvil did not answer on {self.rpc_url} within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if hasattr(self._log, "close"):
            self._log.close()


@dataclass
class DevChainSpec:
    nodes: int = 2
    buyers: int = 2
    eth_each: int = 10  # ETH for gas
    usdc_each: str = "1000"  # test USDC per buyer


def web3_for(rpc_url: str, timeout: float = 30) -> Any:
    from web3 import Web3
    return Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))


def deploy_dev(rpc_url: str, out_dir: Path, spec: DevChainSpec | None = None) -> Deployment:
    """Deploy MeshUSDC (and Multicall3Lite's code at the Multicall3 address), the ERC-8004 registries and
    EpochRewards; create and fund accounts."""
    from eth_account import Account

    spec = spec or DevChainSpec()
    arts = compile_contracts()
    w3 = web3_for(rpc_url)
    chain_id = w3.eth.chain_id
    deployer = w3.eth.accounts[0]

    def send(tx: dict[str, Any]) -> Any:
        h = w3.eth.send_transaction({"from": deployer, **tx})
        rcpt = w3.eth.wait_for_transaction_receipt(h, timeout=30)
        if rcpt["status"] != 1:
            raise ToolchainError(f"transaction failed: {tx}")
        return rcpt

    tok = arts["MeshUSDC"]
    ctor = w3.eth.contract(abi=tok.abi, bytecode=tok.bytecode).constructor(TOKEN_NAME, TOKEN_SYMBOL)
    rcpt = send({"data": ctor.data_in_transaction})
    token_addr = rcpt["contractAddress"]
    token = w3.eth.contract(address=token_addr, abi=tok.abi)
    w3.provider.make_request("anvil_setCode", [MULTICALL3_ADDRESS, arts["Multicall3Lite"].runtime])
    registries = deploy_registries(w3, arts, token_addr, send)
    # Escrow, staking and the spot-check quorum (issue 14); the deployer (anvil account 0) is the treasury.
    from mesh402.economics.workchain import deploy_work_contracts
    registries.update(deploy_work_contracts(w3, arts, token_addr, registries["IdentityRegistry"], send,
                                            treasury=deployer))

    keys_dir = out_dir / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    accounts: dict[str, dict[str, str]] = {}
    names = ["facilitator"] + [f"node-{i}" for i in range(spec.nodes)] + [f"buyer-{i}" for i in range(spec.buyers)]
    asset = Asset(f"eip155:{chain_id}", token_addr, token.functions.name().call(), token.functions.version().call(),
                  token.functions.decimals().call(), TOKEN_SYMBOL)
    for name in names:
        acct = Account.create()
        _write_secret(keys_dir / f"{name}.key", acct.key.hex() if acct.key.hex().startswith("0x") else "0x" + acct.key.hex())
        accounts[name] = {"address": acct.address, "keyFile": f"keys/{name}.key"}
        w3.provider.make_request("anvil_setBalance", [acct.address, hex(spec.eth_each * 10**18)])
        if name.startswith("buyer-"):
            send({"to": token_addr, "data": token.functions.mint(acct.address, asset.to_atomic(spec.usdc_each))
                  ._encode_transaction_data()})
    dep = Deployment(f"eip155:{chain_id}", chain_id, rpc_url, asset,
                     {"MeshUSDC": token_addr, "Multicall3": MULTICALL3_ADDRESS, **registries}, accounts,
                     out_dir / DEPLOYMENT_FILE)
    write_atomic(out_dir / DEPLOYMENT_FILE, json.dumps(dep.to_json(), indent=2))
    return dep


def deploy_registries(w3: Any, arts: dict[str, Any], token_addr: str, send: Any) -> dict[str, str]:
    """ERC-8004 Identity, Reputation and Validation registries, and EpochRewards paying in `token_addr`."""
    def deploy(name: str, *args: Any) -> str:
        a = arts[name]
        data = w3.eth.contract(abi=a.abi, bytecode=a.bytecode).constructor(*args).data_in_transaction
        return send({"data": data})["contractAddress"]

    identity = deploy("IdentityRegistry")
    return {"IdentityRegistry": identity, "ReputationRegistry": deploy("ReputationRegistry", identity),
            "ValidationRegistry": deploy("ValidationRegistry", identity), "EpochRewards": deploy("EpochRewards", token_addr)}


def contract_at(w3: Any, name: str, address: str) -> Any:
    """A web3 contract object for one of the repo's compiled contracts."""
    return w3.eth.contract(address=w3.to_checksum_address(address), abi=compile_contracts()[name].abi)


def token_contract(w3: Any, address: str) -> Any:
    arts = compile_contracts()
    return w3.eth.contract(address=w3.to_checksum_address(address), abi=arts["MeshUSDC"].abi)


ERC20_BALANCE_ABI = [{"type": "function", "name": "balanceOf", "stateMutability": "view",
                      "inputs": [{"name": "a", "type": "address"}], "outputs": [{"name": "", "type": "uint256"}]}]


def erc20_balance(rpc_url: str, token: str, who: str, timeout: float = 5) -> int:
    """`who`'s balance of `token` (any ERC-20: no compiled artifacts needed), with a short RPC timeout."""
    w3 = web3_for(rpc_url, timeout)
    c = w3.eth.contract(address=w3.to_checksum_address(token), abi=ERC20_BALANCE_ABI)
    return int(c.functions.balanceOf(w3.to_checksum_address(who)).call())


def balance_of(rpc_url: str, token: str, who: str) -> int:
    w3 = web3_for(rpc_url)
    return int(token_contract(w3, token).functions.balanceOf(w3.to_checksum_address(who)).call())
