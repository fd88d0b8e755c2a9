"""What the escrow, staking and quorum wrappers share: one contract bound to a web3 connection, transactions
whose reverts come back as `ChainCallError` naming the contract's custom error and its arguments, token
allowances, and event reading. Pure chain-side: no HTTP, no node code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ChainCallError(RuntimeError):
    """A contract call refused by the contract: `error` is its custom error name, `args` its arguments."""

    def __init__(self, error: str, args: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.error = error
        self.error_args = args


def decode_revert(exc: BaseException, abi: list[dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """(custom error name, {argument: value}) for a revert carrying one of the ABI's errors, else None."""
    from eth_abi import decode
    from eth_utils import keccak
    data = getattr(exc, "data", None)
    if not (isinstance(data, str) and data.startswith("0x") and len(data) >= 10):
        return None
    for item in abi:
        if item.get("type") != "error":
            continue
        types = [i["type"] for i in item["inputs"]]
        if keccak(text=f"{item['name']}({','.join(types)})").hex()[:8] == data[2:10]:
            values = decode(types, bytes.fromhex(data[10:])) if types else ()
            return item["name"], {i["name"]: v for i, v in zip(item["inputs"], values)}
    return None


def _fmt(v: Any) -> str:
    return "0x" + v.hex() if isinstance(v, bytes) else str(v)


@dataclass
class BoundContract:
    """One deployed contract of this repository (by its Solidity name) and the connection to reach it."""
    w3: Any
    address: str
    NAME = ""

    def __post_init__(self) -> None:
        from mesh402.economics.chain import contract_at
        self.contract = contract_at(self.w3, self.NAME, self.address)
        self.address = self.contract.address
        self.fn = self.contract.functions

    def send(self, key: str, fn: Any) -> Any:
        """Send `fn` from `key`; its receipt. A refusal raises ChainCallError before anything is broadcast."""
        from web3.exceptions import ContractLogicError

        from mesh402.economics.evm import send_tx
        try:
            return send_tx(self.w3, key, fn)
        except ContractLogicError as e:
            decoded = decode_revert(e, self.contract.abi)
            if decoded is None:
                raise ChainCallError("", {}, f"{self.NAME}: reverted: {e}") from None
            name, args = decoded
            detail = ", ".join(f"{k}={_fmt(v)}" for k, v in args.items())
            raise ChainCallError(name, args, f"{self.NAME}: {name}({detail})") from None

    def events(self, rcpt: Any, name: str) -> list[dict[str, Any]]:
        """The args of every `name` event this contract emitted in the receipt."""
        from web3.logs import DISCARD
        return [dict(e["args"]) for e in getattr(self.contract.events, name)().process_receipt(rcpt, errors=DISCARD)]

    def logs(self, name: str, *, from_block: int = 0, **filters: Any) -> list[dict[str, Any]]:
        """Past `name` events (args plus blockNumber and transactionHash), filtered on indexed arguments."""
        ev = getattr(self.contract.events, name)
        found = ev.get_logs(from_block=from_block, argument_filters=filters or None)
        return [{**dict(e["args"]), "blockNumber": e["blockNumber"], "transactionHash": e["transactionHash"]}
                for e in found]

    def token(self) -> Any:
        from mesh402.economics.chain import token_contract
        return token_contract(self.w3, self.fn.token().call())

    def approve(self, key: str, amount: int) -> Any | None:
        """Let this contract pull `amount` of its token from `key`'s account (skipped when already allowed)."""
        from mesh402.economics.evm import account_of, send_tx
        if amount <= 0:
            return None
        tok = self.token()
        if tok.functions.allowance(account_of(key).address, self.address).call() >= amount:
            return None
        return send_tx(self.w3, key, tok.functions.approve(self.address, amount))


def as_bytes32(value: bytes | str) -> bytes:
    """32 bytes from bytes or 0x-hex; anything else is an error, not a silent pad."""
    b = bytes.fromhex(value[2:] if value.startswith("0x") else value) if isinstance(value, str) else bytes(value)
    if len(b) != 32:
        raise ValueError(f"expected 32 bytes, got {len(b)}")
    return b
