"""ERC-8004 identity for mesh402 nodes: registration, the node-key binding, and the agent wallet proof.

A node registers an agent in the IdentityRegistry from its EVM owner key. Its agentURI points at the
node's own `/.well-known/agent-registration.json` (the ERC-8004 registration file). Two extra pieces tie
the agent to the mesh node and to a payment wallet:

* **Node binding** (metadata key `mesh402.nodeBinding`): the node's 32-byte Ed25519 id followed by its
  64-byte signature over `binding_message(chain id, registry, agent id, owner, node id)`. Peers verify
  it with `verify_binding`; it names the current owner, so it stops verifying once the agent changes
  hands, and it cannot be replayed onto another agent, registry or chain.
* **agentWallet**: set with the registry's EIP-712 `AgentWalletSet` proof, signed by the wallet itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh402.economics.chain import contract_at
from mesh402.economics.evm import account_of, send_tx
from mesh402.mesh.identity import NODE_ID_LEN, SIGNATURE_LEN, verify

REGISTRATION_PATH = "/.well-known/agent-registration.json"  # where a node's API serves its registration file
REGISTRATION_FILE = "agent-registration.json"  # in the node's home, written by `mesh402 register`

BINDING_KEY = "mesh402.nodeBinding"
REGISTRATION_TYPE = "https://eips.ethereum.org/EIPS/eip-8004#registration-v1"
IDENTITY_FILE = "erc8004.json"  # in the node's home: what `mesh402 register` did
WALLET_DOMAIN = ("ERC8004IdentityRegistry", "1")


def identity_contract(w3: Any, address: str) -> Any:
    return contract_at(w3, "IdentityRegistry", address)


# ---- node binding ------------------------------------------------------------------------------

def binding_message(chain_id: int, registry: str, agent_id: int, owner: str, node_id: bytes) -> bytes:
    return ("mesh402 agent binding v1\n"
            f"chain: eip155:{int(chain_id)}\n"
            f"registry: {registry.lower()}\n"
            f"agent: {int(agent_id)}\n"
            f"owner: {owner.lower()}\n"
            f"node: {bytes(node_id).hex()}\n").encode()


def make_binding(identity: Any, chain_id: int, registry: str, agent_id: int, owner: str) -> bytes:
    """The metadata value: node id (32 bytes) + Ed25519 signature (64 bytes) by the node's key."""
    msg = binding_message(chain_id, registry, agent_id, owner, identity.node_id)
    return bytes(identity.node_id) + identity.sign(msg)


def check_binding(value: bytes, chain_id: int, registry: str, agent_id: int, owner: str,
                  node_id: bytes | None = None) -> bytes | None:
    """The node id a binding value proves for this agent, or None if it does not verify."""
    value = bytes(value or b"")
    if len(value) != NODE_ID_LEN + SIGNATURE_LEN:
        return None
    nid, sig = value[:NODE_ID_LEN], value[NODE_ID_LEN:]
    if node_id is not None and nid != bytes(node_id):
        return None
    if not verify(nid, binding_message(chain_id, registry, agent_id, owner, nid), sig):
        return None
    return nid


def verify_binding(w3: Any, registry: str, agent_id: int, node_id: bytes | str) -> bool:
    """True iff agent `agent_id` in `registry` carries a valid binding signed by node `node_id`.

    Reads the binding and the current owner from the chain; anything missing, malformed or signed by
    another key gives False (never an exception for a bad claim)."""
    try:
        nid = bytes.fromhex(node_id) if isinstance(node_id, str) else bytes(node_id)
        reg = identity_contract(w3, registry)
        owner = reg.functions.ownerOf(int(agent_id)).call()
        value = reg.functions.getMetadata(int(agent_id), BINDING_KEY).call()
        return check_binding(value, w3.eth.chain_id, reg.address, int(agent_id), owner, nid) is not None
    except Exception:
        return False


# ---- agent wallet proof ------------------------------------------------------------------------

def wallet_proof(wallet_key: str, chain_id: int, registry: str, agent_id: int, owner: str, deadline: int) -> bytes:
    """The new wallet's EIP-712 AgentWalletSet signature that setAgentWallet checks."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data
    acct = Account.from_key(wallet_key)
    domain = {"name": WALLET_DOMAIN[0], "version": WALLET_DOMAIN[1], "chainId": int(chain_id),
              "verifyingContract": registry}
    types = {"AgentWalletSet": [{"name": "agentId", "type": "uint256"}, {"name": "newWallet", "type": "address"},
                                {"name": "owner", "type": "address"}, {"name": "deadline", "type": "uint256"}]}
    msg = {"agentId": int(agent_id), "newWallet": acct.address, "owner": owner, "deadline": int(deadline)}
    return bytes(acct.sign_message(encode_typed_data(domain_data=domain, message_types=types, message_data=msg)).signature)


# ---- registration ------------------------------------------------------------------------------

def registration_document(*, name: str, api_url: str, node_id: str, mesh_id: str | None,
                          hardware: dict[str, Any] | None, x402: bool, models: list[str] | None = None,
                          registrations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ERC-8004 registration file for a node (served at /.well-known/agent-registration.json)."""
    api = api_url.rstrip("/")
    return {
        "type": REGISTRATION_TYPE,
        "name": name,
        "description": "mesh402 node: OpenAI-compatible LLM inference on a peer-to-peer mesh"
                       + (", paid with x402" if x402 else ""),
        "image": "",
        "services": [{"name": "web", "endpoint": api + "/v1", "version": "openai-v1",
                      "skills": ["chat.completions", "completions"], "domains": []}],
        "x402Support": bool(x402),
        "active": True,
        "registrations": list(registrations or []),
        "supportedTrust": ["reputation"],
        "mesh402": {"meshId": mesh_id, "nodeId": node_id, "hardware": hardware or {}, "models": list(models or []),
                    "bindingKey": BINDING_KEY},
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


@dataclass
class Registered:
    agent_id: int
    registry: str
    chain_id: int
    owner: str
    agent_uri: str
    wallet: str
    gas: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"agentId": self.agent_id, "agentRegistry": f"eip155:{self.chain_id}:{self.registry}",
                "registry": self.registry, "chainId": self.chain_id, "owner": self.owner, "agentURI": self.agent_uri,
                "agentWallet": self.wallet, "gas": self.gas, "registeredAt": int(time.time())}


def register_node(w3: Any, owner_key: str, registry: str, agent_uri: str, node_identity: Any, *,
                  wallet_key: str | None = None, agent_id: int | None = None) -> Registered:
    """Register (or, with `agent_id`, update) an agent for this node: URI, node binding, agentWallet.

    The binding goes in with `register(uri, metadata)` itself when the next agent id is known, so a new
    registration is one transaction, plus one for setAgentWallet when the wallet is not the owner."""
    from web3.logs import DISCARD

    reg = identity_contract(w3, registry)
    owner = account_of(owner_key).address
    chain_id = w3.eth.chain_id
    gas: dict[str, int] = {}
    if agent_id is None:
        # The id is the registry's running count; if someone registers first, the binding would name the
        # wrong agent, so check the minted id and fix the binding in that (rare) case.
        guess = _next_agent_id(reg)
        entry = (BINDING_KEY, make_binding(node_identity, chain_id, reg.address, guess, owner)) if guess is not None else None
        fn = reg.functions.register(agent_uri, [entry]) if entry else reg.functions.register(agent_uri)
        rcpt = send_tx(w3, owner_key, fn)
        gas["register"] = int(rcpt["gasUsed"])
        agent_id = int(reg.events.Registered().process_receipt(rcpt, errors=DISCARD)[0]["args"]["agentId"])
        if guess != agent_id:
            rcpt = send_tx(w3, owner_key, reg.functions.setMetadata(
                agent_id, BINDING_KEY, make_binding(node_identity, chain_id, reg.address, agent_id, owner)))
            gas["setMetadata"] = int(rcpt["gasUsed"])
    else:
        if reg.functions.tokenURI(agent_id).call() != agent_uri:
            gas["setAgentURI"] = int(send_tx(w3, owner_key, reg.functions.setAgentURI(agent_id, agent_uri))["gasUsed"])
        value = make_binding(node_identity, chain_id, reg.address, agent_id, owner)
        if bytes(reg.functions.getMetadata(agent_id, BINDING_KEY).call()) != value:
            gas["setMetadata"] = int(send_tx(w3, owner_key, reg.functions.setMetadata(agent_id, BINDING_KEY, value))["gasUsed"])
    wallet = reg.functions.getAgentWallet(agent_id).call()
    if wallet_key is not None and account_of(wallet_key).address != wallet:
        deadline = int(w3.eth.get_block("latest")["timestamp"]) + 120
        sig = wallet_proof(wallet_key, chain_id, reg.address, agent_id, owner, deadline)
        new = account_of(wallet_key).address
        gas["setAgentWallet"] = int(send_tx(w3, owner_key, reg.functions.setAgentWallet(agent_id, new, deadline, sig))["gasUsed"])
        wallet = new
    return Registered(agent_id, reg.address, chain_id, owner, agent_uri, wallet, gas)


def _next_agent_id(reg: Any) -> int | None:
    try:
        return int(reg.functions.totalAgents().call())
    except Exception:  # a registry without the count (e.g. the canonical deployment)
        return None


# ---- discovery ---------------------------------------------------------------------------------

@dataclass
class AgentInfo:
    agent_id: int
    owner: str
    agent_uri: str
    node_id: str | None  # verified node id, or None
    claimed_node_id: str | None  # what the binding claims, verified or not


def read_agent(w3: Any, registry: str, agent_id: int) -> AgentInfo:
    """An agent's owner, URI and node binding (verified against the chain, never trusted unverified)."""
    reg = identity_contract(w3, registry)
    owner = reg.functions.ownerOf(int(agent_id)).call()
    uri = reg.functions.tokenURI(int(agent_id)).call()
    value = bytes(reg.functions.getMetadata(int(agent_id), BINDING_KEY).call())
    claimed = value[:NODE_ID_LEN].hex() if len(value) >= NODE_ID_LEN else None
    ok = check_binding(value, w3.eth.chain_id, reg.address, int(agent_id), owner)
    return AgentInfo(int(agent_id), owner, uri, ok.hex() if ok else None, claimed)


def registered_agents(w3: Any, registry: str, *, from_block: int = 0) -> list[AgentInfo]:
    """Every agent that carries a mesh402 node binding (from the registry's Registered/MetadataSet logs)."""
    reg = identity_contract(w3, registry)
    ids: set[int] = set()
    for ev in reg.events.MetadataSet().get_logs(from_block=from_block):
        if ev["args"]["metadataKey"] == BINDING_KEY:
            ids.add(int(ev["args"]["agentId"]))
    out = []
    for aid in sorted(ids):
        try:
            out.append(read_agent(w3, registry, aid))
        except Exception:
            continue
    return out


# ---- the identity claim in gossip --------------------------------------------------------------

ANNOUNCE_LABEL = "erc8004"


def announcement_label(home: Path) -> dict[str, str]:
    """The announcement label a registered node gossips: {"erc8004": "eip155:<chain>:<registry>/<agentId>"}.

    It is only a claim; peers verify it on chain with `verify_binding` against the announcing node's id
    (which the mesh handshake authenticates) and show it as unverified otherwise."""
    try:
        info = json.loads((Path(home) / IDENTITY_FILE).read_text())
        return {ANNOUNCE_LABEL: f"{info['agentRegistry']}/{int(info['agentId'])}"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def parse_label(value: str) -> tuple[int, str, int] | None:
    """(chain id, registry, agent id) from an erc8004 label, or None if malformed (a peer's label: bounded)."""
    if not isinstance(value, str) or len(value) > 200:
        return None
    try:
        reg, aid = value.rsplit("/", 1)
        ns, chain, addr = reg.split(":")
        if ns != "eip155" or not addr.startswith("0x") or len(addr) != 42:
            return None
        return int(chain), addr, int(aid)
    except ValueError:
        return None


def check_peer_claim(w3: Any, label: str, node_id: str) -> str:
    """'verified', 'unverified' (the claim does not hold on chain) or 'unchecked (…)' for one peer."""
    parsed = parse_label(label)
    if parsed is None:
        return "unverified (malformed claim)"
    chain_id, registry, agent_id = parsed
    if w3 is None:
        return "unchecked (no RPC)"
    try:
        if int(w3.eth.chain_id) != chain_id:
            return f"unchecked (RPC is not chain {chain_id})"
    except Exception as e:
        return f"unchecked ({type(e).__name__})"
    return "verified" if verify_binding(w3, registry, agent_id, node_id) else "unverified"
