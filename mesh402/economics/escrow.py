"""Escrow and cumulative vouchers (contracts/MeshEscrow.sol): how an entry pays workers without being trusted.

The entry deposits into its escrow account (or names its vault, `vault_of(entry)`, as x402 `payTo` and
`sweep`s it), locks part of it for each worker, and signs EIP-712 cumulative vouchers "worker W may redeem up
to T from entry E". A worker works only while the voucher it will get stays within `coverage(entry, worker)`
(`check_voucher` says whether one does) and redeems whenever it likes; it must redeem within `unlock_delay`
of an `UnlockRequested` for its channel (`unlock_requests` finds them). Pure chain-side: no HTTP, no node code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh402.economics.contractcall import BoundContract

DOMAIN_NAME, DOMAIN_VERSION = "mesh402 Escrow", "1"
VOUCHER_TYPES = {"Voucher": [{"name": "entry", "type": "address"}, {"name": "worker", "type": "address"},
                             {"name": "cumulativeAmount", "type": "uint256"}]}
RELEASE_TYPES = {"Release": [{"name": "entry", "type": "address"}, {"name": "worker", "type": "address"},
                             {"name": "amount", "type": "uint256"}, {"name": "nonce", "type": "uint256"},
                             {"name": "deadline", "type": "uint256"}]}


def _domain(chain_id: int, escrow: str) -> dict[str, Any]:
    return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": int(chain_id), "verifyingContract": escrow}


def _typed(chain_id: int, escrow: str, types: dict[str, Any], message: dict[str, Any]) -> Any:
    from eth_account.messages import encode_typed_data
    return encode_typed_data(domain_data=_domain(chain_id, escrow), message_types=types, message_data=message)


def checksum_address(addr: str) -> str:
    from eth_utils import to_checksum_address
    return to_checksum_address(addr)


@dataclass(frozen=True)
class Voucher:
    """'`worker` may redeem up to `cumulative` (atomic token units, all requests so far) from `entry`'s escrow.'"""
    entry: str
    worker: str
    cumulative: int
    signature: bytes

    def as_tuple(self) -> tuple[str, str, int, bytes]:
        return (self.entry, self.worker, self.cumulative, self.signature)

    def to_json(self) -> dict[str, str]:
        return {"entry": self.entry, "worker": self.worker, "cumulativeAmount": str(self.cumulative),
                "signature": "0x" + self.signature.hex()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Voucher":
        try:
            sig = str(d["signature"])
            return cls(checksum_address(str(d["entry"])), checksum_address(str(d["worker"])), int(d["cumulativeAmount"]),
                       bytes.fromhex(sig[2:] if sig.startswith("0x") else sig))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a voucher: {e}") from None


def sign_voucher(entry_key: str, chain_id: int, escrow: str, worker: str, cumulative: int) -> Voucher:
    """The entry's EIP-712 voucher for `worker` over `cumulative` (bound to this chain and escrow contract)."""
    from eth_account import Account
    if cumulative < 0:
        raise ValueError("a voucher's cumulative amount cannot be negative")
    acct = Account.from_key(entry_key)
    msg = {"entry": acct.address, "worker": checksum_address(worker), "cumulativeAmount": int(cumulative)}
    sig = acct.sign_message(_typed(chain_id, checksum_address(escrow), VOUCHER_TYPES, msg)).signature
    return Voucher(acct.address, checksum_address(worker), int(cumulative), bytes(sig))


def voucher_signer(v: Voucher, chain_id: int, escrow: str) -> str | None:
    """The address that signed the voucher as it reads (None for a malformed signature)."""
    from eth_account import Account
    msg = {"entry": v.entry, "worker": v.worker, "cumulativeAmount": int(v.cumulative)}
    try:
        return Account.recover_message(_typed(chain_id, checksum_address(escrow), VOUCHER_TYPES, msg), signature=v.signature)
    except Exception:
        return None


def sign_release(worker_key: str, chain_id: int, escrow: str, entry: str, amount: int, nonce: int,
                 deadline: int) -> bytes:
    """The worker's consent to give `amount` of its channel back to `entry` at once (see MeshEscrow.release).
    Sign only what exceeds every voucher still unredeemed, and until `deadline` (unix time) count the channel's
    coverage as `amount` lower: the entry may submit it any time before then."""
    from eth_account import Account
    acct = Account.from_key(worker_key)
    msg = {"entry": checksum_address(entry), "worker": acct.address, "amount": int(amount), "nonce": int(nonce),
           "deadline": int(deadline)}
    return bytes(acct.sign_message(_typed(chain_id, checksum_address(escrow), RELEASE_TYPES, msg)).signature)


@dataclass(frozen=True)
class ChannelState:
    balance: int  # locked for the worker, unredeemed
    redeemed: int  # cumulative, already paid out
    pending_unlock: int  # the entry asked this much back (0: nothing pending)
    unlock_at: int  # unix time the pending unlock may complete
    release_nonce: int

    @property
    def coverage(self) -> int:
        """The largest cumulative voucher that stays redeemable even if the pending unlock completes."""
        return self.redeemed + self.balance - min(self.pending_unlock, self.balance)


@dataclass(frozen=True)
class VoucherCheck:
    ok: bool
    reason: str  # "" when ok
    channel: ChannelState | None = None
    cumulative: int = 0  # the voucher checked

    @property
    def headroom(self) -> int:
        """How much more work (atomic units) the channel covers beyond the voucher checked: a worker takes
        a request only while its price fits."""
        return 0 if self.channel is None else max(0, self.channel.coverage - self.cumulative)


class Escrow(BoundContract):
    """MeshEscrow at `address`. Amounts are atomic token units; keys are 0x-hex private keys."""
    NAME = "MeshEscrow"

    # ---- the entry ----------------------------------------------------------------------------

    def deposit(self, key: str, amount: int, *, entry: str | None = None) -> Any:
        """Approve (if needed) and deposit into `entry`'s free balance (default: the key's own account)."""
        from mesh402.economics.evm import account_of
        self.approve(key, amount)
        return self.send(key, self.fn.deposit(checksum_address(entry or account_of(key).address), int(amount)))

    def withdraw(self, key: str, amount: int) -> Any:
        return self.send(key, self.fn.withdraw(int(amount)))

    def lock(self, key: str, amounts: Mapping[str, int]) -> Any:
        """Lock free balance per worker: {worker address: amount}, one transaction."""
        workers = [checksum_address(w) for w in amounts]
        return self.send(key, self.fn.lock(workers, [int(a) for a in amounts.values()]))

    def request_unlock(self, key: str, worker: str, amount: int) -> Any:
        return self.send(key, self.fn.requestUnlock(checksum_address(worker), int(amount)))

    def cancel_unlock(self, key: str, worker: str) -> Any:
        return self.send(key, self.fn.cancelUnlock(checksum_address(worker)))

    def finalize_unlock(self, key: str, worker: str) -> Any:
        return self.send(key, self.fn.finalizeUnlock(checksum_address(worker)))

    def release(self, key: str, worker: str, amount: int, deadline: int, worker_signature: bytes) -> Any:
        return self.send(key, self.fn.release(checksum_address(worker), int(amount), int(deadline), bytes(worker_signature)))

    def sweep(self, key: str, entry: str) -> Any:
        """Move what `entry`'s vault received into its free balance (anyone may send this)."""
        return self.send(key, self.fn.sweep(checksum_address(entry)))

    def sign(self, entry_key: str, worker: str, cumulative: int) -> Voucher:
        return sign_voucher(entry_key, self.chain_id, self.address, worker, cumulative)

    # ---- the worker ---------------------------------------------------------------------------

    def redeem(self, key: str, voucher: Voucher) -> Any:
        """Pay `voucher.worker` what the voucher adds to what it redeemed; any key may send it."""
        return self.send(key, self.fn.redeem(voucher.as_tuple()))

    def redeem_batch(self, key: str, vouchers: Sequence[Voucher]) -> Any:
        """Redeem several vouchers at once (all or nothing); vouchers to one worker are grouped together."""
        ordered = sorted(vouchers, key=lambda v: v.worker)
        return self.send(key, self.fn.redeemBatch([v.as_tuple() for v in ordered]))

    def check_voucher(self, v: Voucher, *, worker: str | None = None) -> VoucherCheck:
        """Whether a worker may rely on `v`: signed by its entry for this chain and escrow, for `worker`, above
        what was redeemed, and within the channel's coverage. A worker refuses work the answer does not cover."""
        if worker is not None and checksum_address(worker) != v.worker:
            return VoucherCheck(False, f"voucher is for {v.worker}, not {checksum_address(worker)}")
        if voucher_signer(v, self.chain_id, self.address) != v.entry:
            return VoucherCheck(False, "voucher signature is not the entry's")
        ch = self.channel(v.entry, v.worker)
        if v.cumulative < ch.redeemed:
            return VoucherCheck(False, f"voucher {v.cumulative} is below what was redeemed ({ch.redeemed})", ch,
                                v.cumulative)
        if v.cumulative > ch.coverage:
            return VoucherCheck(False, f"voucher {v.cumulative} exceeds the escrow's coverage {ch.coverage}", ch,
                                v.cumulative)
        return VoucherCheck(True, "", ch, v.cumulative)

    def unlock_requests(self, worker: str, *, from_block: int = 0) -> list[dict[str, Any]]:
        """UnlockRequested events on `worker`'s channels: redeem before each one's `unlockAt`."""
        return self.logs("UnlockRequested", from_block=from_block, worker=checksum_address(worker))

    # ---- views --------------------------------------------------------------------------------

    @property
    def chain_id(self) -> int:
        if not hasattr(self, "_chain_id"):
            self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    @property
    def unlock_delay(self) -> int:
        return int(self.fn.unlockDelay().call())

    def vault_of(self, entry: str) -> str:
        return str(self.fn.vaultOf(checksum_address(entry)).call())

    def vault_balance(self, entry: str) -> int:
        """What `entry`'s vault received and nobody swept yet (tokens at its address; 0 before it exists)."""
        return int(self.token().functions.balanceOf(self.vault_of(entry)).call())

    def free_balance(self, entry: str) -> int:
        return int(self.fn.freeBalance(checksum_address(entry)).call())

    def channel(self, entry: str, worker: str) -> ChannelState:
        return ChannelState(*(int(x) for x in self.fn.channel(checksum_address(entry), checksum_address(worker)).call()))

    def coverage(self, entry: str, worker: str) -> int:
        return int(self.fn.coverage(checksum_address(entry), checksum_address(worker)).call())
