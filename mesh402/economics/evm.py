"""Small helpers for sending contract transactions from a local private key (web3.py)."""

from __future__ import annotations

from typing import Any


class TxFailed(RuntimeError):
    pass


def account_of(key: str) -> Any:
    from eth_account import Account
    return Account.from_key(key)


def send_tx(w3: Any, key: str, fn: Any, *, value: int = 0, timeout: float = 60.0) -> Any:
    """Sign and send a contract function call from `key`; the receipt, or TxFailed if it reverted.

    Gas is estimated first, so a call that would revert raises web3's ContractLogicError (with the
    decoded custom error) before anything is broadcast."""
    acct = account_of(key)
    tx = fn.build_transaction({"from": acct.address, "value": value,
                               "nonce": w3.eth.get_transaction_count(acct.address, "pending"),
                               "chainId": w3.eth.chain_id})
    # The estimate is the least gas that succeeds in simulation; a refund-heavy call (a validation answered
    # 0 writes zeros) can still run out at exactly that limit. Gas used, and so the fee, is unchanged.
    tx["gas"] = int(tx["gas"] * 6 // 5) + 10_000
    signed = acct.sign_transaction(tx)
    h = w3.eth.send_raw_transaction(signed.raw_transaction)
    rcpt = w3.eth.wait_for_transaction_receipt(h, timeout=timeout)
    if rcpt["status"] != 1:
        raise TxFailed(f"transaction {h.hex()} reverted")
    return rcpt


def tx_hex(h: Any) -> str:
    """A transaction hash as 0x-prefixed hex, whatever web3 returned it as."""
    s = h.hex() if hasattr(h, "hex") else str(h)
    return s if s.startswith("0x") else "0x" + s


def revert_reason(exc: BaseException, abi: list[dict[str, Any]]) -> str:
    """The custom error name a revert carries (from the contract ABI), or the exception text."""
    from eth_utils import keccak
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        sel = data[2:10]
        for item in abi:
            if item.get("type") == "error":
                sig = f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
                if keccak(text=sig).hex()[:8] == sel:
                    return item["name"]
    return str(exc)
