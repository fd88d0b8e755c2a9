"""Spot checks decided by the staked validator quorum (`serve --quorum`, docs/verification.md section 5).

- **entry**: for each stage node paid in an epoch it opens a check on chain (SpotCheckQuorum) on the node's
  statement, sends the statement and the spot checks to every validator in the mesh, and pushes the check
  along as the chain allows (draw, finalize, execute): `QuorumEntry.step`.
- **validator** (`--validator --quorum`): keeps the evidence of checks that exist on chain, in memory and on
  disk (`QuorumVoter.on_evidence`), and watches them: once the contract seats it, it re-executes the audited steps
  (serving.spot_checks.judge, the single-validator flow's code), writes its sealed vote (vote and salt) to
  disk, then commits it; after the commit phase it reveals it, from disk, so a restart between the two still
  reveals (`QuorumVoter.run`).
Chain calls go through a `QuorumChain` the node injects (economics.quorum_checks.QuorumChecks); they block, so
they run in the default thread pool under a deadline; re-execution runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mesh402.home import write_atomic
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.serving.spot_checks import ExpertsFor, EngineFor, judge
from mesh402.serving.stage_link import K, error_frame, stage_frame
from mesh402.work.evidence import SpotCheck, statement

log = logging.getLogger(__name__)

MAX_PENDING = 64  # checks a validator keeps evidence for at once
POLL_S = 1.0  # how often a validator looks at the checks it watches
CALL_TIMEOUT_S = 60.0  # one chain call
_CHECK_ID = re.compile(r"^0x[0-9a-f]{64}$")


class CheckViewLike(Protocol):
    @property
    def stage_agent_id(self) -> int: ...
    @property
    def receipt_hash(self) -> str: ...
    @property
    def phase(self) -> str: ...
    @property
    def round(self) -> int: ...
    @property
    def members(self) -> tuple[int, ...]: ...
    @property
    def executed(self) -> bool: ...
    @property
    def passed(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    @property
    def vote(self) -> int: ...
    def to_json(self) -> dict[str, Any]: ...


class QuorumChain(Protocol):
    """SpotCheckQuorum as this node's owner key sees it (economics.quorum_checks.QuorumChecks)."""

    @property
    def label(self) -> str: ...

    def agent_of_node(self, node_id_hex: str) -> int | None: ...

    def view(self, check_id: str, agent: int | None = None) -> CheckViewLike | None: ...

    def open(self, stage_agent_id: int, receipt_hash: str, *, exact: bool, device: str) -> str: ...

    def advance(self, check_id: str) -> str: ...

    def seal(self, check_id: str, agent: int, fail: bool) -> tuple[int, str, str]: ...

    def commit(self, check_id: str, agent: int, commitment: str) -> None: ...

    def reveal(self, check_id: str, agent: int, fail: bool, salt: str) -> None: ...

    def stake(self, agent: int) -> dict[str, int]: ...

    def slashes(self, agent: int) -> dict[str, int]: ...


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking chain call in the default pool, with a deadline."""
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, lambda: fn(*args, **kwargs)), CALL_TIMEOUT_S)


def statement_checks(params: Any) -> tuple[dict[str, Any], str, list[SpotCheck]]:
    """(statement, its hash, spot checks) from a VERIFY frame's params; ValueError when they do not fit
    together (the checks must be the ones the statement names, about its node)."""
    st = json.loads(params["statement"])
    _, h = statement(st["epoch"], st["entry"], st["node"], st["validator"], st["checks"])
    checks = [SpotCheck.from_json(c) for c in json.loads(params.get("checks", "[]"))]
    if [c.digest for c in checks] != list(st["checks"]) or any(c.node_id != st["node"] for c in checks):
        raise ValueError("the spot checks are not the ones the statement names")
    return st, h, checks


def parse_evidence(params: Any) -> tuple[str, dict[str, Any], str, list[SpotCheck]]:
    """(check id, statement, its hash, spot checks) of a quorum check's evidence; ValueError as above."""
    cid = str(params["check_id"]).lower()
    if not _CHECK_ID.match(cid):
        raise ValueError("bad check id")
    return (cid, *statement_checks(params))


@dataclass
class Pending:
    check_id: str
    node: str
    checks: list[SpotCheck]


class QuorumVoter:
    """A validator's votes on quorum checks. `votes_dir` holds each sealed vote until its check is executed."""

    def __init__(self, me: str, chain: QuorumChain, executor: Any, engine_for: EngineFor, device_sig: str,
                 votes_dir: Path, *, poll_s: float = POLL_S, experts_for: ExpertsFor | None = None) -> None:
        self.me = me
        self.experts_for = experts_for
        self.chain = chain
        self.executor = executor
        self.engine_for = engine_for
        self.device_sig = device_sig
        self.votes_dir = Path(votes_dir)
        self.poll_s = poll_s
        self.pending: OrderedDict[str, Pending] = OrderedDict()
        self.agent: int | None = None
        self.voted: dict[str, bool] = {}  # check id -> the vote this validator committed (status)
        self._wake: asyncio.Event | None = None

    # ---- the decision (tests/support/dishonest_validator_node.py replaces it) ----------------------------
    def decide(self, checks: list[SpotCheck]) -> bool:
        """True to vote "fail": some check that could be judged did not hold."""
        return bool(judge(checks, self.engine_for, self.device_sig, self.experts_for).failed)

    # ---- evidence from an entry -----------------------------------------------------------------------
    async def on_evidence(self, peer: str, sf: pb.StageFrame) -> pb.Frame:
        """Keep the evidence of a check that exists on chain on exactly this statement and this node's agent."""
        try:
            cid, st, h, checks = parse_evidence(sf.params)
        except (KeyError, ValueError, TypeError) as e:
            return error_frame(sf.request_id, f"bad quorum evidence: {e}", self.me, "bad_checks")
        view = await call(self.chain.view, cid)
        if view is None or view.receipt_hash.lower() != h.lower():
            return error_frame(sf.request_id, f"no quorum check {cid} on that statement", self.me, "not_requested")
        # the check slashes its agent: the statement must be about that agent's node, or an entry could have
        # one node's work judged against another's stake
        if await call(self.chain.agent_of_node, st["node"]) != view.stage_agent_id:
            return error_frame(sf.request_id, "the check's agent is not the statement's node", self.me, "bad_checks")
        if not view.executed:
            if cid not in self.pending and len(self.watched()) >= MAX_PENDING:
                return error_frame(sf.request_id, "too many quorum checks pending", self.me, "busy")
            # on disk too: a validator restarted before it committed still judges the check
            self.votes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self._evidence_path(cid), json.dumps({k: sf.params[k] for k in ("check_id", "statement", "checks")
                                                                if k in sf.params}), mode=0o600)
            self.pending[cid] = Pending(cid, st["node"], checks)
            self.kick()
        return stage_frame(K.STAGE_KIND_RESULT, request_id=sf.request_id, params={"accepted": "1", "phase": view.phase})

    # ---- watching the chain ---------------------------------------------------------------------------
    def kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def watched(self) -> list[str]:
        """Checks with evidence here, and checks this validator holds evidence or a sealed vote for on disk
        (after a restart)."""
        on_disk = [p.name.split("-")[0].split(".")[0] for p in self.votes_dir.glob("0x*.json")] if self.votes_dir.exists() else []
        return list(dict.fromkeys([*self.pending, *on_disk]))

    async def run(self) -> None:
        self._wake = asyncio.Event()
        while True:
            self._wake.clear()
            for cid in self.watched():
                try:
                    await self.step(cid)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # RPC down, a race lost: try again next time
                    log.warning("quorum check %s: %s", cid[:10], e)
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass

    async def step(self, cid: str) -> None:
        if self.agent is None:
            self.agent = await call(self.chain.agent_of_node, self.me)
            if self.agent is None:
                return
        agent = self.agent
        v = await call(self.chain.view, cid, agent)
        if v is None or v.executed:
            self._forget(cid)
            return
        if v.phase == "draw":  # anyone may seat the quorum once the seed block exists
            await call(self.chain.advance, cid)
            return
        if agent not in v.members:
            return
        vote = self._load_vote(cid, v.round)
        if v.phase == "commit" and v.vote == 0:
            if vote is None:
                p = self.pending.get(cid) or self._load_evidence(cid)
                if p is None:  # no evidence here (yet): the entry sends it
                    return
                fail = await asyncio.get_running_loop().run_in_executor(self.executor, self.decide, p.checks)
                rnd, salt, commitment = await call(self.chain.seal, cid, agent, fail)
                vote = {"check_id": cid, "round": rnd, "agent": agent, "fail": fail, "salt": salt,
                        "commitment": commitment}
                self._save_vote(vote)  # before sending: a vote committed must be revealable after a restart
            if vote["round"] == v.round:
                await call(self.chain.commit, cid, agent, vote["commitment"])
                self.voted[cid] = bool(vote["fail"])
                log.info("quorum check %s (node %s): committed a %s vote", cid[:10],
                         self.pending[cid].node[:12] if cid in self.pending else "?", "fail" if vote["fail"] else "pass")
        elif v.phase == "reveal" and v.vote == 1 and vote is not None:
            await call(self.chain.reveal, cid, agent, bool(vote["fail"]), vote["salt"])
            log.info("quorum check %s: revealed", cid[:10])

    # ---- sealed votes on disk ---------------------------------------------------------------------------
    def _vote_path(self, cid: str, rnd: int) -> Path:
        return self.votes_dir / f"{cid}-{int(rnd)}.json"

    def _save_vote(self, vote: dict[str, Any]) -> None:
        self.votes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self._vote_path(vote["check_id"], vote["round"]), json.dumps(vote), mode=0o600)

    def _load_vote(self, cid: str, rnd: int) -> dict[str, Any] | None:
        path = self._vote_path(cid, rnd)
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def _evidence_path(self, cid: str) -> Path:
        return self.votes_dir / f"{cid}.evidence.json"

    def _load_evidence(self, cid: str) -> Pending | None:
        """Evidence kept on disk by this validator before a restart (it was checked when it came)."""
        try:
            _, st, _, checks = parse_evidence(json.loads(self._evidence_path(cid).read_text()))
        except (OSError, KeyError, ValueError, TypeError):
            return None
        self.pending[cid] = Pending(cid, st["node"], checks)
        return self.pending[cid]

    def _forget(self, cid: str) -> None:
        self.pending.pop(cid, None)
        for p in self.votes_dir.glob(f"{cid}[-.]*json") if self.votes_dir.exists() else []:
            p.unlink(missing_ok=True)


class QuorumEntry:
    """The entry's side: one check per stage node and epoch, opened on the node's statement and pushed along."""

    def __init__(self, me: str, chain: QuorumChain, send_evidence: Callable[[str, dict[str, str]], Awaitable[Any]],
                 validators: Callable[[], list[str]]) -> None:
        """`send_evidence(node, params)`: a VERIFY to a validator node; `validators()`: the validator nodes in
        the mesh (this node first when it validates)."""
        self.me = me
        self.chain = chain
        self.send_evidence = send_evidence
        self.validators = validators
        self._sent: set[tuple[str, str]] = set()  # (check id, validator node) that took the evidence

    async def step(self, store: Any, epoch: int, node: str) -> dict[str, Any]:
        """Open (once), send the evidence, advance; the verdict once the check is executed (saved with the
        node's validation row: request hash = check id, validator = "quorum:<contract>")."""
        checks = store.spot_checks(epoch, node)
        label = self.chain.label
        text, h = statement(epoch, self.me, node, label, [c.digest for c in checks])
        if not checks:  # nothing was audited: nothing to judge, nobody to slash
            verdict = json.dumps({"score": 100, "checked": 0, "quorum": None})
            store.save_validation(epoch, node, "", label, None, text, verdict)
            return json.loads(verdict)
        devices = sorted({c.needs_device for c in checks} - {""})
        if len(devices) > 1:
            return {"error": f"fast-mode checks on several devices ({', '.join(devices)}): not judged"}
        prior = store.validations(epoch).get(node)
        if prior and prior["validator"] == label and prior["request_hash"]:
            cid, agent = prior["request_hash"], prior["agent_id"]
        else:
            agent = await call(self.chain.agent_of_node, node)
            if agent is None:
                return {"error": "the node has no ERC-8004 agent whose binding verifies"}
            cid = await call(self.chain.open, agent, h, exact=not devices, device=devices[0] if devices else "")
            store.save_validation(epoch, node, cid, label, agent, text, None)
        view = await call(self.chain.view, cid)
        if view is None:
            return {"request_hash": cid, "error": "the check is not on chain"}
        if view.phase in ("seed", "draw", "commit"):
            await self._send(cid, text, checks)
        step = await call(self.chain.advance, cid)
        if step:
            view = await call(self.chain.view, cid) or view
        out: dict[str, Any] = {"request_hash": cid, "agent_id": agent, "quorum": view.to_json()}
        if not view.executed:
            return {**out, "pending": f"quorum check waits for: {view.phase}"}
        verdict = {"score": 100 if view.passed else 0, "checked": len(checks), "quorum": view.to_json()}
        store.save_validation(epoch, node, cid, label, agent, text, json.dumps(verdict, sort_keys=True))
        self._sent = {s for s in self._sent if s[0] != cid}
        return {**out, **verdict}

    async def _send(self, cid: str, text: str, checks: list[SpotCheck]) -> None:
        params = {"check_id": cid, "statement": text, "checks": json.dumps([c.to_json() for c in checks])}
        for v in self.validators():
            if (cid, v) in self._sent:
                continue
            try:
                await self.send_evidence(v, params)
                self._sent.add((cid, v))
            except Exception as e:  # one validator down does not stop the others
                log.warning("quorum evidence for %s not taken by %s: %s", cid[:10], v[:12], e)
