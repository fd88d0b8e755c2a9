"""The chain side of spot-check verification (docs/verification.md, section 4): ERC-8004 validation
requests and responses, reputation feedback for a failed check, and the payout condition.

A stage node's work in an epoch is summarised in a **statement** (canonical JSON); its keccak256 is the
ValidationRegistry `requestHash`. The node's agent owner requests validation by the named validator, the
validator answers 0..100, and `mesh402 payout` pays the node only when the answer is PASS_SCORE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh402.economics.chain import contract_at, web3_for
from mesh402.economics.erc8004 import registered_agents
from mesh402.economics.evm import account_of, revert_reason, send_tx, tx_hex
from mesh402.work.evidence import PASS_SCORE, statement  # noqa: F401  (statement: re-exported for callers)

SPOT_CHECK_TAG = "mesh402-spot-check"
FEEDBACK_TAGS = ("mesh402", "spot-check-failed")
ZERO32 = b"\0" * 32


class RegistryError(RuntimeError):
    """A registry call that the contract refuses, with the reason in words."""


# ---- statements ----------------------------------------------------------------------------------



def _b32(value: bytes | str | int) -> bytes:
    """A bytes32 argument from bytes, "0x…" hex or an int (0 is the zero hash)."""
    if isinstance(value, int):
        return value.to_bytes(32, "big")
    raw = bytes.fromhex(value[2:] if value.startswith("0x") else value) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes, got {len(raw)}")
    return raw


def _hex(b: bytes) -> str:
    return "0x" + bytes(b).hex()


# ---- identity ------------------------------------------------------------------------------------

def agent_of_node(w3: Any, identity_registry: str, node_id_hex: str, *, agents: list[Any] | None = None) -> int | None:
    """The agent whose node binding verifies for this node (the newest, if several), or None.

    Pass `agents` (identity.registered_agents) to look up many nodes with one scan of the registry."""
    if agents is None:
        agents = registered_agents(w3, w3.to_checksum_address(identity_registry))
    ids = [a.agent_id for a in agents if a.node_id == node_id_hex.lower()]
    return max(ids) if ids else None


# ---- transactions --------------------------------------------------------------------------------

_REASONS = {
    "NotAgentOperator": "{who} is not the owner or an operator of agent {agent}: only they may request its validation",
    "ZeroValidator": "the validator address is zero",
    "RequestExists": "a validation request with hash {hash} already exists",
    "UnknownRequest": "no validation request with hash {hash}",
    "NotValidator": "{who} is not the validator named in request {hash}",
    "ResponseOutOfRange": "a validation response must be 0..100",
    "SelfFeedback": "{who} owns or operates agent {agent}: an agent's owner cannot give it feedback",
    "BadValue": "feedback value or decimals out of range",
}


def _send(w3: Any, key: str, fn: Any, **ctx: Any) -> Any:
    """send_tx, with a contract refusal turned into a RegistryError that says why."""
    from web3.exceptions import ContractLogicError

    try:
        return send_tx(w3, key, fn)
    except ContractLogicError as e:
        name = revert_reason(e, fn.contract_abi)
        text = _REASONS.get(name)
        raise RegistryError(text.format(who=account_of(key).address, **ctx) if text else f"reverted: {name}") from None


def _validation(w3: Any, address: str) -> Any:
    return contract_at(w3, "ValidationRegistry", address)


def request_validation(w3: Any, owner_key: str, validation_registry: str, validator_address: str, agent_id: int,
                       request_uri: str, request_hash: bytes | str) -> Any:
    """ValidationRegistry.validationRequest from the agent's owner (or operator) key; the tx receipt."""
    h = _b32(request_hash)
    fn = _validation(w3, validation_registry).functions.validationRequest(
        w3.to_checksum_address(validator_address), int(agent_id), request_uri, h)
    return _send(w3, owner_key, fn, agent=int(agent_id), hash=_hex(h))


def respond_validation(w3: Any, validator_key: str, validation_registry: str, request_hash: bytes | str, response: int,
                       response_uri: str = "", response_hash: bytes | str | int = 0, tag: str = SPOT_CHECK_TAG) -> Any:
    """ValidationRegistry.validationResponse from the named validator's key; the tx receipt."""
    h = _b32(request_hash)
    fn = _validation(w3, validation_registry).functions.validationResponse(
        h, int(response), response_uri, _b32(response_hash), tag)
    return _send(w3, validator_key, fn, hash=_hex(h))


def post_feedback(w3: Any, client_key: str, reputation_registry: str, agent_id: int, value: int,
                  tag1: str = FEEDBACK_TAGS[0], tag2: str = FEEDBACK_TAGS[1], *, value_decimals: int = 0,
                  endpoint: str = "", feedback_uri: str = "", feedback_hash: bytes | str | int = 0) -> Any:
    """ReputationRegistry.giveFeedback (value / 10^value_decimals) from a client key; the tx receipt."""
    fn = contract_at(w3, "ReputationRegistry", reputation_registry).functions.giveFeedback(
        int(agent_id), int(value), int(value_decimals), tag1, tag2, endpoint, feedback_uri, _b32(feedback_hash))
    return _send(w3, client_key, fn, agent=int(agent_id))


# ---- status --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValidationStatus:
    request_hash: str
    exists: bool
    answered: bool = False
    validator: str = ""
    agent_id: int = 0
    response: int = 0
    response_hash: str = _hex(ZERO32)
    tag: str = ""
    last_update: int = 0

    @property
    def passed(self) -> bool:
        return self.answered and self.response == PASS_SCORE


def validation_status(w3: Any, validation_registry: str, request_hash: bytes | str) -> ValidationStatus:
    """A request's state on chain; `exists=False` for a hash nobody requested."""
    from web3.exceptions import ContractLogicError
    h = _b32(request_hash)
    c = _validation(w3, validation_registry)
    try:
        validator, agent, response, rhash, tag, last = c.functions.getValidationStatus(h).call()
    except ContractLogicError:
        return ValidationStatus(_hex(h), exists=False)
    answered = bool(response or tag or any(rhash)) or _has_response_log(c, h)
    return ValidationStatus(_hex(h), True, answered, validator, int(agent), int(response), _hex(rhash), tag, int(last))


def _has_response_log(c: Any, h: bytes) -> bool:
    """getValidationStatus cannot tell "answered 0 with no tag or hash" from "not answered": ask the logs.
    An RPC that refuses the scan leaves it unanswered, which withholds the payout as a failure would."""
    try:
        return bool(c.events.ValidationResponse().get_logs(from_block=0, argument_filters={"requestHash": h}))
    except Exception:
        return False


# ---- the payout condition ------------------------------------------------------------------------

def payout_condition(units: Mapping[str, int], entry_node: str, statuses: Mapping[str, ValidationStatus | None],
                     *, validators: Mapping[str, str] | None = None) -> tuple[set[str], dict[str, str]]:
    """(nodes that may be paid, {withheld node: reason}). The entry's own node needs no validation; any
    other node needs its request answered with PASS_SCORE (by the validator `validators` names for it,
    when given: a node must not pick its own validator)."""
    allowed: set[str] = set()
    withheld: dict[str, str] = {}
    for node in units:
        reason = None if node == entry_node else _withhold_reason(statuses.get(node), (validators or {}).get(node))
        if reason is None:
            allowed.add(node)
        else:
            withheld[node] = reason
    return allowed, withheld


def spot_check_failed(st: ValidationStatus | None, validator: str | None = None) -> bool:
    """True iff the (expected) validator answered below PASS_SCORE: the case that earns negative feedback."""
    return (st is not None and st.answered and st.response < PASS_SCORE
            and (not validator or st.validator.lower() == validator.lower()))


def _withhold_reason(st: ValidationStatus | None, validator: str | None) -> str | None:
    if st is None or not st.exists:
        return "no validation requested"
    if validator and st.validator.lower() != validator.lower():
        return f"validation requested from {st.validator}, not {validator}"
    if not st.answered:
        return "validation pending"
    if st.response < PASS_SCORE:
        return f"spot check failed (response {st.response})"
    return None


# ---- the adapter a node's verification services use ------------------------------------------------

class RegistryValidation:
    """This node's side of the ValidationRegistry (serving.verification.ValidationChain): the owner key
    requests validation of its own work and, on a validator, answers others'. Calls block (run them in
    a thread)."""

    def __init__(self, rpc_url: str, owner_key: str, registries: Mapping[str, str]) -> None:

        self.w3 = web3_for(rpc_url)
        self.key = owner_key
        self.registries = dict(registries)
        self.address: str = account_of(owner_key).address

    def _registry(self, name: str) -> str:
        addr = self.registries.get(name)
        if not addr:
            raise RuntimeError(f"no {name} address configured (pass --deployment or --network)")
        return addr

    def agent_of_node(self, node_id_hex: str) -> int | None:
        return agent_of_node(self.w3, self._registry("IdentityRegistry"), node_id_hex)

    def status(self, request_hash: str) -> ValidationStatus:
        return validation_status(self.w3, self._registry("ValidationRegistry"), request_hash)

    def request(self, validator_address: str, agent_id: int, uri: str, request_hash: str) -> str:
        """Ask `validator_address` to validate; the transaction hash."""
        rc = request_validation(self.w3, self.key, self._registry("ValidationRegistry"), validator_address, agent_id,
                                uri, request_hash)
        return tx_hex(rc["transactionHash"])

    def respond(self, request_hash: str, score: int, digest: bytes) -> str:
        """Answer a validation request naming this node; the transaction hash."""
        rc = respond_validation(self.w3, self.key, self._registry("ValidationRegistry"), request_hash, score, "", digest)
        return tx_hex(rc["transactionHash"])
