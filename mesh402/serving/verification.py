"""A node's part in spot-check verification over the mesh (docs/verification.md, section 4).

- **stage node** (has an owner key): answers VALIDATION_ASK by requesting ERC-8004 validation of the
  statement about its own work, from its agent's owner key;
- **validator** (`--validator`): answers VERIFY by re-executing the spot checks on its own copy of the
  layers and reporting the verdict on chain;
- **entry** (keeps receipts): `run_round(epoch)` asks each paid stage node to request validation and
  sends its spot checks to the mesh's validator.
Chain calls go through a `ValidationChain` the node injects (economics.validation_registry.RegistryValidation);
they block, so they run in the default thread pool; re-execution runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from functools import cached_property
from typing import Any, Awaitable, Callable, Protocol

from mesh402 import labels as L
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.serving.first_stage_audit import FirstStageAuditor
from mesh402.serving.quorum_votes import QuorumChain, QuorumEntry, QuorumVoter, call, statement_checks
from mesh402.serving.spot_checks import judge
from mesh402.serving.stage_link import (
    K,
    Link,
    dump_json,
    error_frame,
    expect_stage,
    stage_frame,
)
from mesh402.work.evidence import statement

log = logging.getLogger(__name__)

VALIDATOR_LABEL = L.VALIDATOR_LABEL  # announcement label: the validator's EVM address
VALIDATOR_DEVICE_LABEL = L.VALIDATOR_DEVICE_LABEL  # ... and its device signature (engine.replay.device_signature)
MAX_ASKS_PER_EPOCH = 3  # validation requests one entry may have this node send per epoch


class ValidationStatusView(Protocol):
    @property
    def exists(self) -> bool: ...

    @property
    def agent_id(self) -> int: ...


class ValidationChain(Protocol):
    """The chain side of a spot check, as this node's owner key sees it (ERC-8004 ValidationRegistry)."""

    @property
    def address(self) -> str:
        """The owner key's EVM address (a validator's address in statements)."""
        ...

    def agent_of_node(self, node_id_hex: str) -> int | None: ...

    def status(self, request_hash: str) -> ValidationStatusView: ...

    def request(self, validator_address: str, agent_id: int, uri: str, request_hash: str) -> str: ...

    def respond(self, request_hash: str, score: int, digest: bytes) -> str: ...


def device_signature(device: str) -> str:
    from mesh402.engine.replay import device_signature as sig  # the engine owns torch
    return sig(device)


class TrustServices:
    def __init__(self, node_id: str, chain: ValidationChain | None, executor: Any,
                 load_model: Callable[[str, int, int, str], Any], connect: Callable[[str], Awaitable[Link]],
                 peers: Callable[[], dict[str, dict[str, str]]], *, validator: bool = False,
                 device: str = "cpu", trusted_validators: Any = (), quorum: QuorumChain | None = None,
                 votes_dir: Any = None, audit_rate: float = 0.1, epoch_s: int = 3600,
                 load_experts: Callable[[str, list, str], Any] | None = None) -> None:
        """`chain`: None without an owner key and a chain; `validator`: answer VERIFY (--validator);
        `quorum`: spot checks are decided by the staked validator quorum (--quorum; a validator keeps its
        sealed votes in `votes_dir`);
        `load_model(hash, start, end, mode)`: a partial engine from this node's disk (FileNotFoundError if it
        has no such model); `peers()`: node id -> announcement labels; `trusted_validators`: the node ids the
        operator named (--validator-id): a validator label alone selects nobody."""
        self.me = node_id
        self.chain = chain
        self.validator = validator and chain is not None
        self.executor = executor
        self.load_model = load_model
        self.connect = connect
        self.peers = peers
        self.trusted_validators = frozenset(trusted_validators)
        self._engines: OrderedDict[tuple, Any] = OrderedDict()
        self._agent: int | None = None
        self.device = device
        # Entries this node signed work receipts for, and the validation requests it sent per (entry, epoch):
        # a request costs gas, so only entries it worked for may ask, a few times per epoch (retried rounds).
        self.worked_for: set[str] = set()
        self._asks: dict[tuple[str, int], int] = {}
        self.quorum = quorum
        self.voter: QuorumVoter | None = None
        self.quorum_entry: QuorumEntry | None = None
        self.first_stage: FirstStageAuditor | None = None
        self.load_experts = load_experts
        self._expert_shard: tuple[Any, Any] | None = None
        if quorum is not None:
            self.quorum_entry = QuorumEntry(node_id, quorum, self._send_evidence, self._quorum_validators)
            # as the first remote stage of a split, this node audits the entry's own stage 0 and reports it
            self.first_stage = FirstStageAuditor(node_id, self.quorum_entry, audit_rate, epoch_s)
            if self.validator:
                self.voter = QuorumVoter(node_id, quorum, executor, self._engine_for, self.device_sig, votes_dir,
                                         experts_for=self._experts_for)
        self._tasks: list[asyncio.Task] = []
        # --quorum: this node's agent, its stake and what checks took from it (status), refreshed in the background
        self.stake_status: dict[str, Any] = {}

    def start(self) -> None:
        """A quorum validator watches the checks it holds evidence or a sealed vote for; a --quorum node keeps
        its stake for status."""
        if self.quorum is not None and not self._tasks:
            self._tasks.append(asyncio.create_task(self._stake_loop()))
            if self.voter is not None:
                self._tasks.append(asyncio.create_task(self.voter.run()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.first_stage is not None:
            await self.first_stage.stop()

    async def _stake_loop(self, every_s: float = 5.0) -> None:
        assert self.quorum is not None
        quorum = self.quorum
        while True:
            try:
                agent = await call(quorum.agent_of_node, self.me)
                if agent is not None:
                    self.stake_status = {"agent_id": agent, "stake": await call(quorum.stake, agent),
                                         "slashes": await call(quorum.slashes, agent),
                                         "votes": dict(self.voter.voted) if self.voter is not None else {}}
            except asyncio.CancelledError:
                raise
            except Exception as e:  # RPC down: keep what was last seen
                log.debug("stake status: %s", e)
            await asyncio.sleep(every_s)

    @cached_property
    def device_sig(self) -> str:
        return device_signature(self.device)

    # ------------------------------------------------------------------ chain
    @property
    def address(self) -> str:
        return self.chain.address if self.chain is not None else ""

    @cached_property
    def labels(self) -> dict[str, str]:
        """Announcement labels of a validator (its EVM address and device signature); {} otherwise."""
        if not self.validator:
            return {}
        return {VALIDATOR_LABEL: self.address, VALIDATOR_DEVICE_LABEL: self.device_sig}

    async def _chain(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def services(self) -> dict[int, Callable[[str, pb.StageFrame], Awaitable[pb.Frame]]]:
        out: dict[int, Callable[[str, pb.StageFrame], Awaitable[pb.Frame]]] = {}
        if self.chain is not None:
            out[K.STAGE_KIND_VALIDATION_ASK] = self.on_validation_ask
            if self.validator:
                out[K.STAGE_KIND_VERIFY] = self.on_verify
        return out

    # ------------------------------------------------------------------ stage node
    async def on_validation_ask(self, peer: str, sf: pb.StageFrame) -> pb.Frame:
        """Request validation of a statement about this node's own work, naming the validator in it."""
        assert self.chain is not None
        chain = self.chain
        st = json.loads(sf.params["statement"])
        if st.get("node") != self.me or st.get("entry") != peer:
            return error_frame(sf.request_id, "the statement is not about this node's work for the asking entry",
                               self.me, "bad_statement")
        text, h = statement(st["epoch"], st["entry"], st["node"], st["validator"], st["checks"])
        if peer not in self.worked_for:
            return error_frame(sf.request_id, "this node signed no work receipt for the asking entry", self.me,
                               "no_work")
        if self._asks.get((peer, int(st["epoch"])), 0) >= MAX_ASKS_PER_EPOCH:
            return error_frame(sf.request_id, f"already requested validation {MAX_ASKS_PER_EPOCH} times for this "
                               "epoch", self.me, "too_many")
        if self._agent is None:
            self._agent = await self._chain(chain.agent_of_node, self.me)
        if self._agent is None:
            return error_frame(sf.request_id, "this node has no ERC-8004 agent whose binding verifies "
                               "(run `mesh402 register`)", self.me, "unregistered")
        done = await self._chain(chain.status, h)
        if done.exists and done.agent_id == self._agent:  # asked again (a retried round): already requested
            return stage_frame(K.STAGE_KIND_RESULT, request_id=sf.request_id,
                               params={"agent_id": self._agent, "request_hash": h, "tx": ""})
        uri = f"mesh402://{peer}/validation/{st['epoch']}/{self.me}"
        key = (peer, int(st["epoch"]))
        self._asks[key] = self._asks.get(key, 0) + 1
        tx = await self._chain(chain.request, st["validator"], self._agent, uri, h)
        return stage_frame(K.STAGE_KIND_RESULT, request_id=sf.request_id,
                           params={"agent_id": self._agent, "request_hash": h, "tx": tx})

    # ------------------------------------------------------------------ validator
    def _engine_for(self, model_hash: str, start: int, end: int, mode: str) -> Any:
        key = (model_hash, start, end, mode)
        if key not in self._engines:
            self._engines[key] = self.load_model(model_hash, start, end, mode)
            while len(self._engines) > 2:  # a validator holds a couple of ranges, not a model zoo
                self._engines.popitem(last=False)
        self._engines.move_to_end(key)
        return self._engines[key]

    def _experts_for(self, model_hash: str, experts: list, mode: str) -> Any:
        """The experts of an audited run, from this validator's own copy of the model (the last one is kept)."""
        if self.load_experts is None:
            raise FileNotFoundError("this node cannot load expert shards")
        key = (model_hash, tuple(map(tuple, experts)), mode)
        if self._expert_shard is None or self._expert_shard[0] != key:
            self._expert_shard = (key, self.load_experts(model_hash, list(experts), mode))
        return self._expert_shard[1]

    async def on_verify(self, peer: str, sf: pb.StageFrame) -> pb.Frame:
        """Re-execute the spot checks of a statement and answer its validation request on chain."""
        assert self.chain is not None
        if "check_id" in sf.params:  # evidence of a quorum check (--quorum)
            if self.voter is None:
                return error_frame(sf.request_id, "this validator takes no part in quorum checks", self.me,
                                   "not_validator")
            return await self.voter.on_evidence(peer, sf)
        chain = self.chain
        try:
            st, h, checks = statement_checks(sf.params)
        except ValueError as e:
            return error_frame(sf.request_id, str(e), self.me, "bad_checks")
        if st["validator"].lower() != self.address.lower():
            return error_frame(sf.request_id, "the statement names another validator", self.me, "not_validator")
        other = sorted({c.needs_device for c in checks} - {"", self.device_sig})
        if other:  # judging fast-mode work on other kernels would flag honest noise: let a matching validator do it
            return error_frame(sf.request_id, f"declined: fast-mode checks on {', '.join(other)}, this validator runs "
                               f"{self.device_sig}", self.me, "declined")
        status = await self._chain(chain.status, h)
        if not status.exists:
            return error_frame(sf.request_id, f"no validation request {h} on chain", self.me, "not_requested")
        loop = asyncio.get_running_loop()
        verdict = await loop.run_in_executor(self.executor, judge, checks, self._engine_for, self.device_sig,
                                             self._experts_for)
        tx = await self._chain(chain.respond, h, verdict.score, verdict.digest)
        log.info("validated %s epoch %s: score %d over %d checks", st["node"][:12], st["epoch"], verdict.score,
                 verdict.checked)
        return stage_frame(K.STAGE_KIND_RESULT, request_id=sf.request_id,
                           params={"verdict": dump_json(verdict.to_json()), "tx": tx})

    # ------------------------------------------------------------------ entry
    def validator_for(self, node: str, device: str = "") -> tuple[str, str] | None:
        """(validator node id, EVM address): a validator the operator named (--validator-id) that announces
        the role and is not `node` (this node first, when it validates), on `device` when fast-mode checks
        need one. Announcing the validator label is not enough: anyone can, and a validator's verdict decides
        who is paid."""
        if self.validator and node != self.me and device in ("", self.device_sig):
            return self.me, self.address
        for peer, labels in sorted(self.peers().items()):
            addr = L.validator_address(labels)
            if (peer in self.trusted_validators and peer != node and addr is not None
                    and device in ("", L.validator_device(labels))):
                return peer, addr
        return None

    async def _ask(self, node: str, kind: int, params: dict[str, str], timeout: float) -> pb.StageFrame:
        rid = f"validation-{params.get('epoch', '')}"
        if node == self.me:  # this node is the validator: no stream to itself
            return expect_stage(await self.services()[kind](self.me, pb.StageFrame(kind=kind, request_id=rid, params=params)),
                                K.STAGE_KIND_RESULT, "this node")
        link = await self.connect(node)
        try:
            await link.send(stage_frame(kind, request_id=rid, params=params))
            return expect_stage(await link.recv(timeout), K.STAGE_KIND_RESULT, f"node {node[:12]}")
        finally:
            try:
                await link.finish()
            except Exception:
                pass

    async def run_round(self, store: Any, epoch: int, *, timeout: float = 600.0) -> dict[str, dict[str, Any]]:
        """For every stage node paid in `epoch`: a validation request by the node naming the mesh's validator,
        then the validator's verdict; with a quorum (--quorum), a step of the node's quorum check (open it,
        send its evidence, draw, finalize, execute: call again until it is executed). Idempotent: nodes with
        a verdict on record are skipped."""
        done = store.validations(epoch)
        out: dict[str, dict[str, Any]] = {}
        for node in sorted(n for n in store.work_units(epoch) if n != self.me):
            prior = done.get(node)
            if prior and prior.get("verdict"):
                out[node] = {"request_hash": prior["request_hash"], **json.loads(prior["verdict"])}
                continue
            if self.quorum_entry is not None:
                try:
                    out[node] = await self.quorum_entry.step(store, epoch, node)
                except Exception as e:  # RPC down, not enough bond: the next round tries again
                    out[node] = {"error": f"quorum check: {e}"}
                continue
            out[node] = await self._validate_node(store, epoch, node, timeout)
        return out

    def _quorum_validators(self) -> list[str]:
        """Every node in the mesh that announces the validator role (this one first): the contract, not this
        entry, decides which of them sit on a check, so none is trusted or left out here."""
        peers = [p for p, labels in sorted(self.peers().items()) if L.validator_address(labels) is not None and p != self.me]
        return ([self.me] if self.voter is not None else []) + peers

    async def _send_evidence(self, node: str, params: dict[str, str]) -> None:
        await self._ask(node, K.STAGE_KIND_VERIFY, params, 60.0)

    async def _validate_node(self, store: Any, epoch: int, node: str, timeout: float) -> dict[str, Any]:
        checks = store.spot_checks(epoch, node)
        devices = sorted({c.needs_device for c in checks} - {""})
        if len(devices) > 1:
            return {"error": f"fast-mode checks on several devices ({', '.join(devices)}): not judged"}
        v = self.validator_for(node, devices[0] if devices else "")
        if v is None:
            on = f" on {devices[0]} (fast-mode work is judged on the same kernels)" if devices else ""
            return {"error": f"no trusted validator in the mesh (a node started with --validator that this entry "
                             f"names with --validator-id){on}"}
        vnode, vaddr = v
        text, h = statement(epoch, self.me, node, vaddr, [c.digest for c in checks])
        try:
            got = await self._ask(node, K.STAGE_KIND_VALIDATION_ASK, {"statement": text, "epoch": str(epoch)}, timeout)
            agent = int(got.params["agent_id"])
        except Exception as e:
            store.save_validation(epoch, node, h, vaddr, None, text, None)
            return {"request_hash": h, "error": f"the node did not request validation: {e}"}
        store.save_validation(epoch, node, h, vaddr, agent, text, None)
        try:
            got = await self._ask(vnode, K.STAGE_KIND_VERIFY, {"statement": text, "epoch": str(epoch),
                                  "checks": dump_json([c.to_json() for c in checks])}, timeout)
        except Exception as e:
            return {"request_hash": h, "agent_id": agent, "error": f"the validator did not answer: {e}"}
        verdict = got.params["verdict"]
        store.save_validation(epoch, node, h, vaddr, agent, text, verdict)
        return {"request_hash": h, "agent_id": agent, **json.loads(verdict)}
