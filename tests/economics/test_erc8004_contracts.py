"""ERC-8004 registries and EpochRewards, compiled from contracts/ and deployed by `mesh402 chain dev`:
the ABI carries every function and event of the standard's interfaces, and the registries behave as the
standard says on a real local chain (anvil). One chain for the whole module."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from web3.logs import DISCARD

from harness.dev_chain import DevChain, start_chain
from tests.support.chain import require_contract_toolchain

# ---- the ERC-8004 interface (erc-8004-contracts b9e466c2), as canonical signatures --------------

FUNCTIONS: dict[str, dict[str, str]] = {
    "IdentityRegistry": {
        "register()": "uint256",
        "register(string)": "uint256",
        "register(string,(string,bytes)[])": "uint256",
        "setAgentURI(uint256,string)": "",
        "tokenURI(uint256)": "string",
        "getMetadata(uint256,string)": "bytes",
        "setMetadata(uint256,string,bytes)": "",
        "getAgentWallet(uint256)": "address",
        "setAgentWallet(uint256,address,uint256,bytes)": "",
        "unsetAgentWallet(uint256)": "",
        "isAuthorizedOrOwner(address,uint256)": "bool",
        "getVersion()": "string",
        "ownerOf(uint256)": "address",
        "balanceOf(address)": "uint256",
        "approve(address,uint256)": "",
        "getApproved(uint256)": "address",
        "setApprovalForAll(address,bool)": "",
        "isApprovedForAll(address,address)": "bool",
        "transferFrom(address,address,uint256)": "",
        "safeTransferFrom(address,address,uint256)": "",
        "name()": "string",
        "symbol()": "string",
    },
    "ReputationRegistry": {
        "giveFeedback(uint256,int128,uint8,string,string,string,string,bytes32)": "",
        "revokeFeedback(uint256,uint64)": "",
        "appendResponse(uint256,address,uint64,string,bytes32)": "",
        "getLastIndex(uint256,address)": "uint64",
        "readFeedback(uint256,address,uint64)": "int128,uint8,string,string,bool",
        "readAllFeedback(uint256,address[],string,string,bool)":
            "address[],uint64[],int128[],uint8[],string[],string[],bool[]",
        "getSummary(uint256,address[],string,string)": "uint64,int128,uint8",
        "getResponseCount(uint256,address,uint64,address[])": "uint64",
        "getClients(uint256)": "address[]",
        "getIdentityRegistry()": "address",
        "getVersion()": "string",
    },
    "ValidationRegistry": {
        "validationRequest(address,uint256,string,bytes32)": "",
        "validationResponse(bytes32,uint8,string,bytes32,string)": "",
        "getValidationStatus(bytes32)": "address,uint256,uint8,bytes32,string,uint256",
        "getSummary(uint256,address[],string)": "uint64,uint8",
        "getAgentValidations(uint256)": "bytes32[]",
        "getValidatorRequests(address)": "bytes32[]",
        "getIdentityRegistry()": "address",
        "getVersion()": "string",
    },
    "EpochRewards": {
        "claim(uint256,address,uint256,bytes32[])": "",
        "publish(uint256,bytes32,uint256)": "uint256",
        "isClaimed(uint256,address)": "bool",
        "epochId(address,uint256)": "uint256",
    },
}
# event -> [(type, indexed)]
EVENTS: dict[str, dict[str, list[tuple[str, bool]]]] = {
    "IdentityRegistry": {
        "Registered": [("uint256", True), ("string", False), ("address", True)],
        "MetadataSet": [("uint256", True), ("string", True), ("string", False), ("bytes", False)],
        "URIUpdated": [("uint256", True), ("string", False), ("address", True)],
        "Transfer": [("address", True), ("address", True), ("uint256", True)],
    },
    "ReputationRegistry": {
        "NewFeedback": [("uint256", True), ("address", True), ("uint64", False), ("int128", False), ("uint8", False),
                        ("string", True), ("string", False), ("string", False), ("string", False), ("string", False),
                        ("bytes32", False)],
        "FeedbackRevoked": [("uint256", True), ("address", True), ("uint64", True)],
        "ResponseAppended": [("uint256", True), ("address", True), ("uint64", False), ("address", True),
                             ("string", False), ("bytes32", False)],
    },
    "ValidationRegistry": {
        "ValidationRequest": [("address", True), ("uint256", True), ("string", False), ("bytes32", True)],
        "ValidationResponse": [("address", True), ("uint256", True), ("bytes32", True), ("uint8", False),
                               ("string", False), ("bytes32", False), ("string", False)],
    },
    "EpochRewards": {
        "Claimed": [("uint256", True), ("address", True), ("uint256", False)],
    },
}
GAS: dict[str, int] = {}


def _type(p: dict[str, Any]) -> str:
    t = p["type"]
    if t.startswith("tuple"):
        return "(" + ",".join(_type(c) for c in p["components"]) + ")" + t[len("tuple"):]
    return t


def test_abi_has_every_erc8004_function_and_event() -> None:
    from mesh402.economics.contracts import compile_contracts
    arts = compile_contracts()
    for cname, funcs in FUNCTIONS.items():
        abi = arts[cname].abi
        have = {f"{i['name']}({','.join(_type(p) for p in i['inputs'])})": ",".join(_type(p) for p in i["outputs"])
                for i in abi if i["type"] == "function"}
        for sig, outs in funcs.items():
            assert sig in have, f"{cname} lacks {sig}"
            assert have[sig] == outs, f"{cname}.{sig} returns ({have[sig]}), want ({outs})"
        events = {i["name"]: [(_type(p), bool(p["indexed"])) for p in i["inputs"]] for i in abi if i["type"] == "event"}
        for name, params in EVENTS.get(cname, {}).items():
            assert events.get(name) == params, f"{cname} event {name}: {events.get(name)} != {params}"


# ---- on a local chain ----------------------------------------------------------------------------

class Env:
    def __init__(self, chain: DevChain) -> None:
        from mesh402.economics.chain import contract_at
        self.chain = chain
        self.w3 = chain.w3()
        c = chain.dep.contracts
        self.identity = contract_at(self.w3, "IdentityRegistry", c["IdentityRegistry"])
        self.reputation = contract_at(self.w3, "ReputationRegistry", c["ReputationRegistry"])
        self.validation = contract_at(self.w3, "ValidationRegistry", c["ValidationRegistry"])
        self.rewards = contract_at(self.w3, "EpochRewards", c["EpochRewards"])
        self.token = contract_at(self.w3, "MeshUSDC", chain.dep.asset.address)

    def key(self, name: str) -> str:
        return self.chain.key(name)

    def addr(self, name: str) -> str:
        return self.chain.dep.address(name)

    def tx(self, who: str, fn: Any) -> Any:
        from mesh402.economics.evm import send_tx
        return send_tx(self.w3, self.key(who), fn)

    def register(self, who: str, uri: str = "https://n/x.json") -> int:
        rcpt = self.tx(who, self.identity.functions.register(uri))
        return int(self.identity.events.Registered().process_receipt(rcpt, errors=DISCARD)[0]["args"]["agentId"])

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])


def reverts(env: Env, who: str, fn: Any, error: str) -> None:
    from web3.exceptions import ContractLogicError

    from mesh402.economics.evm import revert_reason
    with pytest.raises(ContractLogicError) as ei:
        env.tx(who, fn)
    assert revert_reason(ei.value, fn.contract_abi) == error


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_contract_toolchain()
    chain = start_chain(tmp_path_factory.mktemp("erc8004"), buyers=2)
    try:
        yield Env(chain)
    finally:
        chain.proc.stop()
        if GAS:
            print("\ngas used:", ", ".join(f"{k}={v}" for k, v in sorted(GAS.items())))


def test_chain_dev_deploys_the_registries_and_rewards(env: Env) -> None:
    c = env.chain.dep.contracts
    for name in ("IdentityRegistry", "ReputationRegistry", "ValidationRegistry", "EpochRewards", "MeshUSDC"):
        assert env.w3.eth.get_code(c[name]), name
    assert env.reputation.functions.getIdentityRegistry().call() == c["IdentityRegistry"]
    assert env.validation.functions.getIdentityRegistry().call() == c["IdentityRegistry"]
    assert env.identity.functions.name().call() == "AgentIdentity"
    assert env.rewards.functions.token().call() == env.chain.dep.asset.address
    # every node has its own owner key
    assert len({env.addr(f"node-{i}") for i in range(2)}) == 2


def test_register_overloads_uri_and_metadata(env: Env) -> None:
    idf = env.identity.functions
    n0 = env.addr("node-0")
    r = env.tx("node-0", idf.register())
    GAS["register()"] = int(r["gasUsed"])
    a0 = int(env.identity.events.Registered().process_receipt(r, errors=DISCARD)[0]["args"]["agentId"])
    r = env.tx("node-0", idf.register("https://node/a.json"))
    GAS["register(uri)"] = int(r["gasUsed"])
    a1 = int(env.identity.events.Registered().process_receipt(r, errors=DISCARD)[0]["args"]["agentId"])
    r = env.tx("node-0", idf.register("https://node/b.json", [("hw", b"cpu"), ("mesh", b"m1")]))
    GAS["register(uri,metadata[2])"] = int(r["gasUsed"])
    ev = env.identity.events.Registered().process_receipt(r, errors=DISCARD)[0]["args"]
    a2 = int(ev["agentId"])
    assert (a1, a2) == (a0 + 1, a0 + 2) and ev["owner"] == n0 and ev["agentURI"] == "https://node/b.json"
    sets = [e["args"]["metadataKey"] for e in env.identity.events.MetadataSet().process_receipt(r, errors=DISCARD)]
    assert "hw" in sets and "mesh" in sets and "agentWallet" in sets
    assert idf.ownerOf(a2).call() == n0 and idf.tokenURI(a1).call() == "https://node/a.json"
    assert idf.getMetadata(a2, "hw").call() == b"cpu"
    assert idf.getAgentWallet(a0).call() == n0  # register sets agentWallet = the registrant
    # URI and metadata: the owner may change them, nobody else
    r = env.tx("node-0", idf.setAgentURI(a1, "https://node/a2.json"))
    upd = env.identity.events.URIUpdated().process_receipt(r, errors=DISCARD)[0]["args"]
    assert upd["newURI"] == "https://node/a2.json" and upd["updatedBy"] == n0
    assert idf.tokenURI(a1).call() == "https://node/a2.json"
    r = env.tx("node-0", idf.setMetadata(a1, "k", b"\x01\x02"))
    GAS["setMetadata"] = int(r["gasUsed"])
    assert idf.getMetadata(a1, "k").call() == b"\x01\x02"
    reverts(env, "node-1", idf.setAgentURI(a1, "https://evil"), "NotAgentOperator")
    reverts(env, "node-1", idf.setMetadata(a1, "k", b"x"), "NotAgentOperator")
    reverts(env, "node-0", idf.setMetadata(a1, "agentWallet", b"x"), "ReservedMetadataKey")
    reverts(env, "node-0", idf.register("u", [("agentWallet", b"x")]), "ReservedMetadataKey")
    assert idf.isAuthorizedOrOwner(n0, a1).call() and not idf.isAuthorizedOrOwner(env.addr("node-1"), a1).call()
    # an approved operator may act for the owner
    env.tx("node-0", idf.approve(env.addr("node-1"), a0))
    assert idf.isAuthorizedOrOwner(env.addr("node-1"), a0).call()
    env.tx("node-1", idf.setAgentURI(a0, "https://op"))


def test_agent_wallet_proof_valid_accepted_forged_rejected(env: Env) -> None:
    from eth_account import Account

    from mesh402.economics.erc8004 import wallet_proof
    idf = env.identity.functions
    owner = env.addr("node-1")
    aid = env.register("node-1")
    wallet, other = Account.create(), Account.create()
    cid, reg = env.w3.eth.chain_id, env.identity.address
    deadline = env.now() + 120
    good = wallet_proof(wallet.key.hex(), cid, reg, aid, owner, deadline)
    # forged: signed by another key; for another agent; for another owner; expired; too far ahead
    forged = wallet_proof(other.key.hex(), cid, reg, aid, owner, deadline)
    reverts(env, "node-1", idf.setAgentWallet(aid, wallet.address, deadline, forged), "InvalidWalletProof")
    wrong_agent = wallet_proof(wallet.key.hex(), cid, reg, aid + 1, owner, deadline)
    reverts(env, "node-1", idf.setAgentWallet(aid, wallet.address, deadline, wrong_agent), "InvalidWalletProof")
    wrong_owner = wallet_proof(wallet.key.hex(), cid, reg, aid, env.addr("node-0"), deadline)
    reverts(env, "node-1", idf.setAgentWallet(aid, wallet.address, deadline, wrong_owner), "InvalidWalletProof")
    past = env.now() - 1
    reverts(env, "node-1", idf.setAgentWallet(aid, wallet.address, past,
                                              wallet_proof(wallet.key.hex(), cid, reg, aid, owner, past)),
            "WalletProofExpired")
    far = env.now() + 3600
    reverts(env, "node-1", idf.setAgentWallet(aid, wallet.address, far,
                                              wallet_proof(wallet.key.hex(), cid, reg, aid, owner, far)),
            "WalletProofDeadlineTooFar")
    reverts(env, "node-0", idf.setAgentWallet(aid, wallet.address, deadline, good), "NotAgentOperator")
    assert idf.getAgentWallet(aid).call() == owner
    r = env.tx("node-1", idf.setAgentWallet(aid, wallet.address, deadline, good))
    GAS["setAgentWallet"] = int(r["gasUsed"])
    assert idf.getAgentWallet(aid).call() == wallet.address
    assert idf.getMetadata(aid, "agentWallet").call() == bytes.fromhex(wallet.address[2:])
    # a transfer clears the wallet; unset works too
    env.tx("node-1", idf.transferFrom(owner, env.addr("node-0"), aid))
    assert idf.getAgentWallet(aid).call() == "0x" + "0" * 40
    aid2 = env.register("node-1")
    env.tx("node-1", idf.unsetAgentWallet(aid2))
    assert idf.getAgentWallet(aid2).call() == "0x" + "0" * 40


def test_feedback_refused_from_owner_accepted_from_others(env: Env) -> None:
    rf = env.reputation.functions
    aid = env.register("node-0")
    h = b"\x11" * 32
    reverts(env, "node-0", rf.giveFeedback(aid, 90, 0, "inference", "latency", "https://n/v1", "ipfs://f", h),
            "SelfFeedback")
    # an approved operator is refused as well
    env.tx("node-0", env.identity.functions.setApprovalForAll(env.addr("node-1"), True))
    reverts(env, "node-1", rf.giveFeedback(aid, 90, 0, "inference", "", "", "", h), "SelfFeedback")
    env.tx("node-0", env.identity.functions.setApprovalForAll(env.addr("node-1"), False))
    r = env.tx("buyer-0", rf.giveFeedback(aid, 95, 0, "inference", "latency", "https://n/v1", "ipfs://f", h))
    GAS["giveFeedback"] = int(r["gasUsed"])
    ev = env.reputation.events.NewFeedback().process_receipt(r, errors=DISCARD)[0]["args"]
    assert ev["feedbackIndex"] == 1 and ev["value"] == 95 and ev["tag1"] == "inference" and ev["feedbackHash"] == h
    env.tx("buyer-0", rf.giveFeedback(aid, 805, 1, "inference", "quality", "", "", h))  # 80.5
    env.tx("buyer-1", rf.giveFeedback(aid, -10, 0, "other", "", "", "", h))
    b0, b1 = env.addr("buyer-0"), env.addr("buyer-1")
    assert rf.getLastIndex(aid, b0).call() == 2 and rf.getClients(aid).call() == [b0, b1]
    assert rf.readFeedback(aid, b0, 2).call() == [805, 1, "inference", "quality", False]
    assert rf.getSummary(aid, [b0], "inference", "").call() == [2, 877, 1]  # mean of 95.0 and 80.5 = 87.75
    reverts(env, "buyer-0", rf.getSummary(aid, [], "", ""), "ClientsRequired")
    # revoke, respond, read all
    env.tx("buyer-0", rf.revokeFeedback(aid, 1))
    reverts(env, "buyer-0", rf.revokeFeedback(aid, 1), "AlreadyRevoked")
    reverts(env, "buyer-1", rf.revokeFeedback(aid, 2), "NoSuchFeedback")
    assert rf.getSummary(aid, [b0], "", "").call() == [1, 805, 1]
    env.tx("node-0", rf.appendResponse(aid, b0, 2, "ipfs://reply", b"\x22" * 32))
    env.tx("node-0", rf.appendResponse(aid, b0, 2, "ipfs://reply2", b"\x22" * 32))
    env.tx("buyer-1", rf.appendResponse(aid, b0, 2, "ipfs://agree", b"\x00" * 32))
    assert rf.getResponseCount(aid, b0, 2, []).call() == 3
    assert rf.getResponseCount(aid, b0, 2, [env.addr("node-0")]).call() == 2
    assert rf.getResponseCount(aid, "0x" + "0" * 40, 0, []).call() == 3
    clients, idxs, values, decs, t1, t2, revoked = rf.readAllFeedback(aid, [], "", "", True).call()
    assert list(zip(clients, idxs, values, revoked)) == [(b0, 1, 95, True), (b0, 2, 805, False), (b1, 1, -10, False)]
    assert len(rf.readAllFeedback(aid, [], "inference", "", False).call()[0]) == 1
    reverts(env, "buyer-0", rf.giveFeedback(aid, 1, 19, "", "", "", "", h), "BadValue")


def test_validation_request_and_response(env: Env) -> None:
    vf = env.validation.functions
    aid = env.register("node-0")
    validator = env.addr("node-1")
    req = b"\x33" * 32
    reverts(env, "buyer-0", vf.validationRequest(validator, aid, "ipfs://req", req), "NotAgentOperator")
    r = env.tx("node-0", vf.validationRequest(validator, aid, "ipfs://req", req))
    GAS["validationRequest"] = int(r["gasUsed"])
    reverts(env, "node-0", vf.validationRequest(validator, aid, "ipfs://req", req), "RequestExists")
    assert vf.getValidationStatus(req).call()[:3] == [validator, aid, 0]
    reverts(env, "buyer-0", vf.validationResponse(req, 100, "", b"\x00" * 32, "spot-check"), "NotValidator")
    reverts(env, "node-1", vf.validationResponse(req, 101, "", b"\x00" * 32, "spot-check"), "ResponseOutOfRange")
    r = env.tx("node-1", vf.validationResponse(req, 40, "ipfs://resp", b"\x44" * 32, "spot-check"))
    GAS["validationResponse"] = int(r["gasUsed"])
    ev = env.validation.events.ValidationResponse().process_receipt(r, errors=DISCARD)[0]["args"]
    assert ev["response"] == 40 and ev["requestHash"] == req and ev["agentId"] == aid
    env.tx("node-1", vf.validationResponse(req, 100, "ipfs://resp2", b"\x45" * 32, "spot-check"))  # may answer again
    v, a, resp, rh, tag, last = vf.getValidationStatus(req).call()
    assert (v, a, resp, rh, tag) == (validator, aid, 100, b"\x45" * 32, "spot-check") and last > 0
    req2 = b"\x34" * 32
    env.tx("node-0", vf.validationRequest(validator, aid, "ipfs://req2", req2))
    env.tx("node-1", vf.validationResponse(req2, 50, "", b"\x00" * 32, "other"))
    assert vf.getAgentValidations(aid).call() == [req, req2]
    assert vf.getValidatorRequests(validator).call()[-2:] == [req, req2]
    assert vf.getSummary(aid, [], "").call() == [2, 75]
    assert vf.getSummary(aid, [validator], "spot-check").call() == [1, 100]
    assert vf.getSummary(aid, [env.addr("buyer-0")], "").call() == [0, 0]


def test_epoch_rewards_merkle_claim_and_double_claim_reverts(env: Env) -> None:
    from mesh402.economics.rewards import build_tree
    rw, tok = env.rewards.functions, env.token.functions
    dist = "node-0"
    n0, n1, b1 = env.addr("node-0"), env.addr("node-1"), env.addr("buyer-1")
    env.token.functions.mint(n0, 1_000_000).transact({"from": env.w3.eth.accounts[0]})
    epoch_no = 7
    eid = rw.epochId(n0, epoch_no).call()
    tree = build_tree(eid, {n0: 150_000, n1: 350_000, b1: 1})
    env.tx(dist, tok.approve(env.rewards.address, tree.total))
    r = env.tx(dist, rw.publish(epoch_no, tree.root, tree.total))
    GAS["rewards.publish(3 accounts)"] = int(r["gasUsed"])
    reverts(env, dist, rw.publish(epoch_no, tree.root, 0), "EpochExists")
    before = env.chain.balance(n1)
    # anyone may submit the claim; the tokens go to the account
    r = env.tx("buyer-0", rw.claim(eid, n1, 350_000, tree.proofs[n1]))
    GAS["rewards.claim"] = int(r["gasUsed"])
    assert env.chain.balance(n1) == before + 350_000 and rw.isClaimed(eid, n1).call()
    reverts(env, "node-1", rw.claim(eid, n1, 350_000, tree.proofs[n1]), "AlreadyClaimed")
    reverts(env, "node-0", rw.claim(eid, n0, 500_000, tree.proofs[n0]), "InvalidProof")
    reverts(env, "node-0", rw.claim(eid + 1, n0, 150_000, tree.proofs[n0]), "UnknownEpoch")
    env.tx("node-0", rw.claim(eid, n0, 150_000, tree.proofs[n0]))
    env.tx("buyer-1", rw.claim(eid, b1, 1, tree.proofs[b1]))
    assert rw.getEpoch(eid).call()[2:] == [500_001, 500_001]
    assert env.chain.balance(env.rewards.address) == 0
