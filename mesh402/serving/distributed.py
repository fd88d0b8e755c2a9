"""Where each model runs in the mesh, kept true as the mesh changes.

Every node runs the same loop over the same gossip: elect each model's host (placement), and if
that is this node, plan (solo or a pipeline split), tell the stage nodes to load their layer ranges,
and serve. An incumbent host keeps its model while its plan still works, so a node joining does
not make the model move. Stage nodes answer ASSIGN through their StageWorker. Everything else
about routing lives in `routes()`: which node's API serves which model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mesh402 import labels as L
from mesh402.engine.expert_parallel import RemoteExperts, owners_from_plan
from mesh402.mesh.framing import FramedStream, StreamType
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.errors import PeerUnavailable
from mesh402.placement import (
    ExpertPlan,
    MeshSnapshot,
    ModelLayout,
    NodeSnapshot,
    Plan,
    WaitingForCapacity,
    elect_host,
    fits,
    host_ranking,
    make_model_key,
    plan_experts,
    plan_model,
    stage_bytes,
)
from mesh402.serving.engine_thread import EngineThread
from mesh402.serving.expert_receipts import ExpertAccounts, ExpertHostReceipts
from mesh402.serving.experts import ExpertPayer, ExpertService, MeshExpertTransport
from mesh402.serving.generation import LocalModel
from mesh402.serving.holdings import Holdings
from mesh402.serving.pipeline import Chain, Failover, PipelineModel, StepTimer
from mesh402.serving.registry import ModelEntry, ModelRegistry
from mesh402.serving.stage_link import Hop, K, StageError, expect_stage, stage_frame
from mesh402.serving.stage_worker import StageWorker
from mesh402.serving.quorum_votes import QuorumChain
from mesh402.serving.stake_filter import StakeFilter
from mesh402.serving.verification import TrustServices, ValidationChain
from mesh402.settings import NodeConfig

if TYPE_CHECKING:
    from mesh402.mesh.service import MeshService


class ServingNode(Protocol):
    """What the runtime needs from the node it runs in."""

    config: NodeConfig
    registry: ModelRegistry
    executor: EngineThread  # the node's single engine thread

    def fingerprint(self, path: Path) -> str:
        """Content hash of a model file or folder (cached)."""
        ...

log = logging.getLogger(__name__)

PLAN_LABEL = L.PLAN_LABEL  # announcement label prefix: the host publishes its plans for status and routing
CAPACITY_LABEL = L.CAPACITY_LABEL
# Ready claims for a model that this node first saw within this long of each other count as simultaneous
# (the election order settles them); a claim first seen later never displaces the incumbent.
CLAIM_SETTLE_S = 10.0
ASSIGN_TIMEOUT_S = 300.0
ASSIGN_CONNECT_TRIES = 4
ASSIGN_RETRY_S = 0.5
# A plan epoch more than this far beyond the newest one the receiver knows for the model is refused: one
# ASSIGN cannot push a model's epoch out of reach (every later real plan would look stale).
EPOCH_WINDOW = 64
MAX_EPOCH = 2**62
EXPERT_USAGE_MIN_TOKENS = 128  # tokens routed before gate usage may re-place an expert split


@dataclass
class Hosted:
    """A model this node hosts: its plan and the serving object (LocalModel or PipelineModel)."""

    key: str
    plan: Plan | ExpertPlan
    serving: Any
    layout: ModelLayout | None  # None for a safetensors folder: no tensor table, never split
    expert_transport: Any = None  # MeshExpertTransport of an expert-parallel plan
    usage_checked: bool = False  # gate usage already considered for replicating hot experts


@dataclass
class Route:
    model_id: str
    key: str
    host: str  # node id hex
    api_port: int
    ready: bool
    plan: dict[str, Any] | None = None
    backend: bool = False  # the host answers it through its own OpenAI-compatible server: unverified, no plan
    context_length: int = 0  # when the host's backend says it


@dataclass
class Roles:
    """This node's role per model key, for its own announcement: (role, start, end, epoch)."""

    by_key: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


class DistributedRuntime(Failover):
    def __init__(self, node: ServingNode, mesh: "MeshService", capacity_bytes: int, *, max_split_rtt_ms: float = 80.0,
                 wire_dtype: str = "f32", reconcile_s: float = 0.5, chain: ValidationChain | None = None,
                 quorum: QuorumChain | None = None) -> None:
        """`chain`: this node's side of the ValidationRegistry (an owner key and a chain), for spot checks;
        `quorum`: its side of SpotCheckQuorum, when spot checks are decided by the validator quorum (--quorum)."""
        self.node = node
        self.mesh = mesh
        self.me = mesh.node_id.hex()
        self.capacity = capacity_bytes
        self.max_split_rtt_ms = max_split_rtt_ms
        self.wire_dtype = wire_dtype
        self.reconcile_s = reconcile_s
        self.executor: EngineThread = node.executor
        self.hosted: dict[str, Hosted] = {}
        self.epochs: dict[str, int] = {}
        self.waiting: dict[str, str] = {}  # key -> reason no plan is possible now
        self.roles = Roles()
        self.layouts: dict[str, ModelLayout] = {}
        self.failovers: dict[str, int] = {}  # key -> stages replaced under running sessions
        self.keys: dict[str, ModelEntry] = {}  # local model key -> registry entry
        self.usage_seen: dict[str, dict] = {}  # key -> MoE gate usage of engines no longer hosted
        # Who may host, hold layers of, or serve a model for this node (docs/security.md): the operator's
        # allow-list (None: anyone who proves it), proofs of holding the tensors, and when each ready claim
        # was first seen (key -> peer -> time), so a newcomer's claim never displaces an incumbent.
        allow = node.config.trust.allow_hosts
        self.allow_hosts: frozenset[str] | None = frozenset(allow) | {self.me} if allow else None
        self.claim_since: dict[str, dict[str, float]] = {}
        self.stake_filter: StakeFilter | None = None  # --min-stake: set by the node (it knows the chain)
        self.believed: dict[str, set[str]] = {}  # models this node does not hold: hosts it routes to
        self.holdings = Holdings(self.me, self._connect, self._model_path, on_change=self.kick)
        self._task: asyncio.Task | None = None
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self.worker = StageWorker(self.me, self.executor, self._load_stage, self._connect,
                                  idle_timeout=node.config.timers.stage_idle_s,
                                  signer=getattr(mesh, "identity", None),  # signs work receipts when asked
                                  may_assign=self._may_assign, max_batch=node.config.limits.max_batch)
        self.receipts = None  # work.receipts.EntryReceipts: a paid entry keeps the stages' receipts
        # Escrow vouchers (serving.work_pay), set by a node with --escrow: the entry's signer, the pay terms
        # of a chain's hops (chain, model layer count), and the label that lets entries pay this node.
        self.voucher_signer: Any = None
        self.pay_terms_for: Callable[[Chain, int], dict[str, Any]] | None = None
        self.expert_terms_for: Callable[[ExpertPlan, str], dict[str, Any]] | None = None  # (plan, model path)
        self.pay_labels: dict[str, str] = {}
        self.auditor = None  # work.evidence.Auditor: which paid requests the stages must reveal
        if node.config.payments.enabled:
            from mesh402.work.evidence import Auditor  # lazy: kept off this module's import path
            from mesh402.work.store import EntryReceipts  # lazy: kept off this module's import path
            self.receipts = EntryReceipts(node.config.home, node.config.payments.epoch_s)
            self.auditor = Auditor(node.config.trust.audit_rate, node.config.payments.epoch_s)
        self.trust = TrustServices(self.me, chain, self.executor, self._load_range, self._connect, self._peer_labels,
                                   validator=node.config.trust.validator, device=node.config.device,
                                   trusted_validators=node.config.trust.validator_ids, quorum=quorum,
                                   votes_dir=node.config.home / "quorum-votes",
                                   audit_rate=node.config.trust.audit_rate, epoch_s=node.config.payments.epoch_s,
                                   load_experts=self._validator_experts)
        self.worker.services.update(self.trust.services())
        self.worker.services[K.STAGE_KIND_HOLDING_PROOF] = self.holdings.on_challenge
        self.worker.on_receipt = self.trust.worked_for.add  # entries that may ask this node for validation
        if self.trust.first_stage is not None:
            self.worker.on_first_stage = self.trust.first_stage.on_close
        mesh.register_handler(StreamType.STAGE, self._on_stage_stream)
        identity = getattr(mesh, "identity", None)
        self.expert_service = ExpertService(  # signs a receipt per host request when the host asks
            self._load_experts, accounts=ExpertAccounts(identity) if identity is not None else None,
            may_assign=self._may_assign_experts, idle_timeout=node.config.timers.stage_idle_s, me=self.me)
        self.expert_service.on_receipt = self.trust.worked_for.add  # expert work may be validated like a stage's
        mesh.register_handler(StreamType.EXPERT, self._on_expert_stream)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._publish()  # the capacity label first: stages check who the host is from the same gossip
        self._task = asyncio.create_task(self._loop())
        self.trust.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.trust.stop()

    def kick(self) -> None:
        self._kick.set()

    async def _loop(self) -> None:
        events = self.mesh.subscribe()
        try:
            while True:
                try:
                    await self.reconcile()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reconcile failed")
                self._kick.clear()
                waiter = asyncio.ensure_future(events.get())
                kicker = asyncio.ensure_future(self._kick.wait())
                done, pending = await asyncio.wait({waiter, kicker}, timeout=self.reconcile_s,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for p in pending:
                    p.cancel()
        finally:
            self.mesh.unsubscribe(events)

    # ---------------------------------------------------------------- what the mesh looks like
    def _announcements(self, connected: bool = True) -> list[pb.PeerAnnouncement]:
        """Self plus live peers (down, left and stale peers never take part in placement). `connected`:
        only peers this node has an open connection to now (placement); without it, a peer whose
        connection is being replaced still counts (replica routing fails over if it really is gone)."""
        out = []
        own = self.mesh.self_announcement()
        if own is not None:
            out.append(own)
        if self.mesh.gossip is None:
            return out
        for nid, entry in self.mesh.gossip.peers().items():
            lv = self.mesh.liveness.get(nid)
            if entry.ann.leaving or lv is None or lv.state.value not in ("alive", "suspect"):
                continue
            pc = self.mesh.conns.get(nid)
            if connected and (pc is None or pc.closed):
                continue
            out.append(entry.ann)
        return out

    def snapshot(self) -> MeshSnapshot:
        """The mesh as placement sees it. A peer counts as holding one of this node's models only once it
        proved it holds the tensors (a proof is asked in the background when it announces one), and only
        when the operator's allow-list (if any) names it; capacity is the label's bounded value."""
        nodes = []
        for ann in self._announcements():
            nid = bytes(ann.node_id).hex()
            rtts = {bytes(r.node_id).hex(): float(r.rtt_ms) for r in ann.rtts}
            models = frozenset(make_model_key(m.model_id, m.content_hash) for m in ann.models if m.content_hash)
            if nid != self.me:
                models = frozenset(k for k in models if self._holds(nid, k))
            nodes.append(NodeSnapshot(nid, L.capacity(ann.labels), rtts, models_on_disk=models,
                                      is_client=ann.kind == pb.NODE_KIND_CLIENT))
        return MeshSnapshot(nodes)

    def _model_path(self, content_hash: str) -> Path | None:
        """This node's copy of a model (what holding proofs are checked against), None when it has none."""
        key = next((k for k in self.keys if k.endswith("@" + content_hash)), None)
        return Path(self.keys[key].source.path) if key is not None else None

    def _allowed(self, peer: str) -> bool:
        """The operator's allow-list, and with --min-stake the peer's stake read on chain (serving.stake_filter)."""
        if self.allow_hosts is not None and peer not in self.allow_hosts:
            return False
        return self.stake_filter is None or self.stake_filter.allows(peer)

    def _holds(self, peer: str, key: str) -> bool:
        """Whether `peer` may host, hold layers of or serve `key` for this node: allowed, and proven to hold
        it (asked now in the background if not). Only for models this node holds: it has nothing to check
        a proof of any other against."""
        if peer == self.me:
            return True
        if key not in self.keys or not self._allowed(peer):
            return False
        content_hash = key.rsplit("@", 1)[1]
        self.holdings.want(peer, content_hash)
        return self.holdings.proven(peer, content_hash)

    def _claims(self, key: str, connected: bool = True) -> dict[str, tuple[L.PlanClaim, int]]:
        """peer -> (its plan claim for `key`, its API port), for the claims this node believes. A claim is
        parsed by its schema and counts only for the host it names (the announcer). On a node that holds the
        model, the claimant must have proved it holds it too; a node without the model cannot check a proof,
        so it believes the hosts it already uses and new ones that one of those vouches for (it saw them
        prove it: their `verified:` label), trusting the first claims it sees when it believes none."""
        found: dict[str, tuple[L.PlanClaim, int, frozenset[str]]] = {}
        content_hash = key.rsplit("@", 1)[1]
        for ann in self._announcements(connected):
            nid = bytes(ann.node_id).hex()
            claim = L.plan_claim(ann.labels.get(PLAN_LABEL + key), nid)
            if claim is not None and self._allowed(nid):
                found[nid] = (claim, ann.api_port, L.verified_holders(ann.labels, content_hash))
        if key in self.keys:
            return {p: (c, port) for p, (c, port, _) in found.items() if self._holds(p, key)}
        ready = {p for p, (c, _, _) in found.items() if c.ready}
        known = self.believed.setdefault(key, set())
        known &= ready  # a host that stopped claiming is not believed again without a vouch
        if not known:
            known |= ready
        vouched = {v for p in known for v in found[p][2]}
        known |= ready & vouched
        return {p: (c, port) for p, (c, port, _) in found.items() if p in known or p == self.me or not c.ready}

    def _incumbent(self, key: str, snap: MeshSnapshot) -> str | None:
        """The live host already serving `key`: a claim first seen later never displaces it (however much
        capacity it announces). Claims first seen at about the same time (CLAIM_SETTLE_S) are settled by the
        election order, so every node picks the same one."""
        claims = [h for h in self._ready_claims(key) if h in snap]
        if not claims:
            return None
        now = self.mesh.clock.monotonic()
        since = self.claim_since.setdefault(key, {})
        for gone in set(since) - set(claims):
            del since[gone]
        for h in claims:
            since.setdefault(h, now)
        first = min(since.values())
        group = [h for h in claims if since[h] - first <= CLAIM_SETTLE_S]
        ranking = [n for n in host_ranking(key, snap) if n in group]
        return ranking[0] if ranking else max(group)

    def _ready_claims(self, key: str) -> dict[str, dict[str, Any]]:
        return {p: c.data for p, (c, _) in self._claims(key).items() if c.ready}

    def _seen_epoch(self, key: str) -> int:
        """The newest plan epoch a believed holder announced for `key`: a new host continues the count.
        (A peer that has not proved it holds the model cannot push the count out of a stage's window.)"""
        best = self.epochs.get(key, 0)
        content_hash = key.rsplit("@", 1)[1]
        for p, (c, _) in self._claims(key).items():
            best = max(best, c.epoch)
        for ann in self._announcements():
            nid = bytes(ann.node_id).hex()
            if nid != self.me and not self._holds(nid, key):
                continue
            for m in ann.models:
                if m.content_hash == content_hash:
                    best = max(best, int(m.plan_epoch))
        return min(max(best, self.worker.epochs.get(content_hash, 0)), MAX_EPOCH)  # a plan epoch is a uint64

    def _peer_labels(self) -> dict[str, dict[str, str]]:
        return {bytes(a.node_id).hex(): dict(a.labels) for a in self._announcements() if bytes(a.node_id).hex() != self.me}

    def claimed_keys(self, connected: bool = True) -> list[str]:
        """Every model key some live node (this one included) announces a plan label for."""
        keys: set[str] = set()
        for ann in self._announcements(connected):
            keys.update(k[len(PLAN_LABEL):] for k in ann.labels if k.startswith(PLAN_LABEL))
        return sorted(keys)

    def published_plans(self) -> dict[str, tuple[str, dict[str, Any], int]]:
        """key -> (host, plan dict, host api port): per model the incumbent's ready plan, else any believed
        claim (a waiting one)."""
        out = {}
        snap = None
        for key in self.claimed_keys():
            cs = {p: (c.data, port) for p, (c, port) in self._claims(key).items()}
            if not cs:
                continue
            ready = [p for p, (d, _) in cs.items() if d.get("ready")]
            if ready:
                snap = snap or self.snapshot()
                pick = self._incumbent(key, snap)
                host = pick if pick in ready else ready[0]
            else:
                host = min(cs)
            out[key] = (host, cs[host][0], cs[host][1])
        return out

    def routes(self) -> dict[str, Route]:
        """model id -> where its API is served (ready hosts only; this node's own hosting wins)."""
        out: dict[str, Route] = {}
        for key, (host, plan, port) in sorted(self.published_plans().items()):
            model_id = key.rsplit("@", 1)[0]
            r = Route(model_id, key, host, port, bool(plan.get("ready")), plan)
            if model_id not in out or (r.ready and not out[model_id].ready) or host == self.me:
                out[model_id] = r
        for r in self.backend_routes():  # a model the mesh hosts itself wins over an unverified backend
            if r.model_id not in out or (r.ready and not out[r.model_id].ready and out[r.model_id].backend):
                out[r.model_id] = r
        return out

    def backend_routes(self) -> list[Route]:
        """Peers' backend models (`serve --backend` on their side): routed to through the tunnel like any
        hosted model, never planned or split (they have no layers). This node's own are answered by its API."""
        out = []
        for ann in self._announcements(connected=False):
            nid = bytes(ann.node_id).hex()
            if nid == self.me or not self._allowed(nid):
                continue
            for model_id, b in sorted(L.backend_models(ann.labels).items()):
                out.append(Route(model_id, f"{model_id}@backend", nid, ann.api_port, b.ready, None,
                                 backend=True, context_length=b.ctx))
        return out

    # ---------------------------------------------------------------- reconcile
    async def _local_keys(self) -> dict[str, ModelEntry]:
        out = {}
        for entry in self.node.registry.all():
            digest = await asyncio.to_thread(self.node.fingerprint, Path(entry.source.path))
            out[make_model_key(entry.model_id, digest)] = entry
        return out

    async def reconcile(self) -> None:
        async with self._lock:
            if not self.keys:
                self.keys = await self._local_keys()
            snap = self.snapshot()
            published = self.published_plans()
            for key, entry in self.keys.items():
                if entry.source.format != "gguf":
                    await self._ensure_solo_unplanned(key, entry)
                    continue
                from mesh402.serving.replicas import ensure_replica  # lazy: kept off this module's import path

                if await ensure_replica(self, key, entry, snap):  # fits here: a replica (or --standby)
                    continue
                host = self._incumbent(key, snap) or elect_host(key, snap)
                if host == self.me:
                    await self._ensure_hosting(key, entry, snap)
                else:
                    self._drop_hosting(key)
                    pub = published.get(key)
                    if pub is not None and pub[1].get("ready"):
                        entry.state, entry.error = "standby", None
                    elif pub is not None:
                        entry.state, entry.error = "waiting", pub[1].get("waiting") or "no plan yet"
            self._publish()

    async def _ensure_solo_unplanned(self, key: str, entry: ModelEntry) -> None:
        """Safetensors folders have no tensor table to split by: served whole on this node."""
        if key in self.hosted or entry.state == "failed":
            return
        try:
            engine = await self._run(self._load_engine, entry, None)
        except Exception as e:  # a bad folder is reported once, not reloaded on every reconcile
            log.exception("loading %s failed", entry.model_id)
            entry.state, entry.error = "failed", f"{type(e).__name__}: {e}"
            return
        plan = Plan(key, 1, self.me, ())
        self.hosted[key] = Hosted(key, plan, LocalModel(engine, self.executor), None)
        entry.local, entry.state, entry.error = self.hosted[key].serving, "ready", None

    def _layout(self, key: str, entry: ModelEntry) -> ModelLayout:
        if key not in self.layouts:
            from mesh402.models.gguf_meta import read_gguf_meta  # lazy: kept off this module's import path

            self.layouts[key] = ModelLayout.from_gguf_meta(read_gguf_meta(entry.source.path), key)
        return self.layouts[key]

    async def _ensure_hosting(self, key: str, entry: ModelEntry, snap: MeshSnapshot) -> None:
        layout = await asyncio.to_thread(self._layout, key, entry)
        cur = self.hosted.get(key)
        live = None  # a working expert split re-placed by gate usage: it serves until the new one is ready
        # a node that is gone, or may no longer work for this one (its stake fell under --min-stake), ends the plan
        if cur is not None and all(n in snap and self._allowed(n) for n in cur.plan.nodes) and not _experts_down(cur):
            if not self._hot_experts_need_copies(key, cur, layout, snap):
                return  # an incumbent plan that still works is kept
            live = cur
        epoch = self._seen_epoch(key) + 1
        plan: Any = None
        if layout.experts is not None and not fits(layout.total_bytes, snap.capacity(self.me)):
            # MoE too big for this node: the trunk here, experts spread by capacity (exact, no expert dropped)
            plan = plan_experts(key, layout, snap, self._expert_usage(key), epoch=epoch,
                                max_split_rtt_ms=self.max_split_rtt_ms)
            if isinstance(plan, WaitingForCapacity):
                plan = None
        if plan is None:
            plan = plan_model(key, layout, snap, epoch=epoch, max_split_rtt_ms=self.max_split_rtt_ms)
        if isinstance(plan, WaitingForCapacity) and live is not None:
            return  # no better placement now: keep the working split
        if isinstance(plan, WaitingForCapacity):
            self._drop_hosting(key)
            self.waiting[key] = plan.reason
            entry.local, entry.state, entry.error = None, "waiting", plan.reason
            return
        self.waiting.pop(key, None)
        self.epochs[key] = epoch
        if live is None:
            entry.state = "loading"
        try:
            serving = await self._apply(key, entry, plan, layout)
        except Exception as e:
            log.warning("plan epoch %d for %s failed: %s", epoch, key, e)
            if live is not None:  # keep serving with the split that works
                return
            entry.local, entry.state, entry.error = None, "waiting", f"plan failed: {e}"
            # A broken incumbent stays known (not served) so sessions already running on it can still
            # replace their dead stage; the next reconcile tries a new plan again.
            if cur is None:
                self.hosted.pop(key, None)
            return
        if isinstance(plan, ExpertPlan):
            self._keep_usage(key)
        self.hosted[key] = Hosted(key, plan, serving, layout, getattr(serving, "expert_transport", None))
        entry.local, entry.state, entry.error = serving, "ready", None
        if isinstance(plan, ExpertPlan):
            self.roles.by_key[key] = (pb.MODEL_ROLE_HOST, 0, layout.n_layers, epoch)
            log.info("hosting %s with experts on: %s", key,
                     " | ".join(f"{s.node_id[:8]}:{len(s.experts)}" for s in plan.shards))
            return
        a, b = plan.stages[0].start, plan.stages[0].end
        self.roles.by_key[key] = (pb.MODEL_ROLE_HOST, a, b, epoch)
        log.info("hosting %s: %s", key, " | ".join(f"{s.node_id[:8]}[{s.start},{s.end})" for s in plan.stages))

    async def _apply(self, key: str, entry: ModelEntry, plan: Plan, layout: ModelLayout) -> Any:
        if isinstance(plan, ExpertPlan):
            return await self._apply_experts(key, entry, plan)
        if plan.is_solo:
            engine = await self._run(self._load_engine, entry, None)
            return self.local_model(engine, key, entry, layout.n_layers)
        await asyncio.gather(*(self._assign(key, entry.model_id, s.node_id, s.start, s.end, plan.epoch)
                               for s in plan.stages[1:]))
        host = plan.stages[0]
        engine0 = await self._run(self._load_engine, entry, (host.start, host.end))
        hops = tuple(Hop(s.node_id, s.start, s.end) for s in plan.stages[1:])
        chain = Chain(entry.model_id, key.rsplit("@", 1)[1], plan.epoch, host.end, hops)
        if self.receipts is not None and entry.source.format == "gguf":
            self.receipts.add_model(chain.content_hash, entry.source.path)  # work units from its tensor table
        model = PipelineModel(engine0, chain, self._connect, self, self.executor, wire_dtype=self.wire_dtype,
                              timer=StepTimer(floor_s=self.node.config.timers.stage_step_floor_s),
                              signer=getattr(self.mesh, "identity", None), receipt_sink=self.receipts,
                              auditor=self.auditor, max_batch=self.node.config.limits.max_batch,
                              speculative_k=self.node.config.limits.draft_tokens)
        terms_for, n_layers = self.pay_terms_for, layout.n_layers
        if terms_for is not None and self.voucher_signer is not None:
            model.voucher_signer = self.voucher_signer
            model.pay_terms = lambda c: terms_for(c, n_layers)
        return model

    def local_model(self, engine: Any, key: str, entry: ModelEntry, n_layers: int) -> LocalModel:
        """A model served whole here; on a paid entry each request gets a receipt (all layers) too."""
        receipts = None
        if self.receipts is not None and entry.source.format == "gguf" and getattr(self.mesh, "identity", None):
            from mesh402.work.receipts import SoloReceipts  # lazy: kept off this module's import path
            content_hash = key.rsplit("@", 1)[1]
            self.receipts.add_model(content_hash, entry.source.path)
            receipts = SoloReceipts(self.mesh.identity, self.receipts, content_hash, n_layers)
        limits = self.node.config.limits
        return LocalModel(engine, self.executor, receipts=receipts, max_batch=limits.max_batch,
                          step_tokens=limits.step_tokens, speculative_k=limits.draft_tokens)

    # ---------------------------------------------------------------- MoE expert parallel
    async def _apply_experts(self, key: str, entry: ModelEntry, plan: ExpertPlan) -> Any:
        content_hash = key.rsplit("@", 1)[1]
        await asyncio.gather(*(self._assign_experts(key, entry.model_id, s.node_id, s.experts, plan.epoch)
                               for s in plan.shards if s.node_id != self.me))
        transport = MeshExpertTransport(self._connect_expert, asyncio.get_running_loop(), content_hash, plan.epoch)
        if self.voucher_signer is not None and self.expert_terms_for is not None and self.receipts is not None:
            # a paid host with --escrow pays its expert nodes with vouchers (the final one rides the receipt ask)
            transport.pay = ExpertPayer(self.voucher_signer, self.expert_terms_for(plan, str(entry.source.path)))
        mine = plan.shard_of(self.me)
        engine = await self._run(self._load_expert_host, entry, owners_from_plan(plan), transport,
                                 list(mine.experts) if mine is not None else [])
        receipts = self._expert_host_receipts(key, entry, engine, transport)
        serving = LocalModel(engine, self.executor, receipts=receipts,
                             step_hook=receipts.runner.begin if receipts is not None else None)
        serving.expert_transport = transport
        return serving

    def _expert_host_receipts(self, key: str, entry: ModelEntry, engine: Any, transport: Any) -> Any:
        """On a paid entry: per request, the host's receipt (trunk + its own experts) and each expert
        node's (serving/expert_receipts.py), kept together."""
        runner = getattr(engine.stages[0], "experts", None)
        if self.receipts is None or runner is None or getattr(self.mesh, "identity", None) is None:
            return None
        content_hash = key.rsplit("@", 1)[1]
        self.receipts.add_model(content_hash, entry.source.path)
        return ExpertHostReceipts(self.mesh.identity, self.receipts, content_hash, int(engine.info.n_layers),
                                  runner, transport, asyncio.get_running_loop(), auditor=self.auditor,
                                  mode=self.node.config.mode)

    def _load_expert_host(self, entry: ModelEntry, owners: dict, transport: Any, local_experts: list) -> Any:
        from mesh402.engine import Engine  # lazy: kept off this module's import path
        from mesh402.engine.moe import ExpertBank  # lazy: kept off this module's import path
        from mesh402.engine.runtime_env import configure_torch  # lazy: kept off this module's import path
        from mesh402.engine.weights import open_source  # lazy: kept off this module's import path

        cfg = self.node.config
        configure_torch(cfg.threads)
        bank = ExpertBank(open_source(entry.source.path), local_experts, mode=cfg.mode, device=cfg.device) \
            if local_experts else None
        runner = RemoteExperts(owners, transport, local=bank, local_node=self.me)
        return Engine.load(entry.source.path, mode=cfg.mode, device=cfg.device, experts=runner,
                           max_sessions=cfg.limits.max_sessions, prefill_chunk=cfg.limits.prefill_chunk,
                           max_kv_bytes=cfg.limits.max_kv_bytes)

    def _validator_experts(self, content_hash: str, experts: list, mode: str) -> Any:
        """A validator's own copy of an expert node's experts (to re-execute an audited run), in the node's mode."""
        from mesh402.engine.expert_parallel import ExpertShardWorker  # lazy: kept off this module's import path

        for key, entry in self.keys.items():
            if key.endswith("@" + content_hash):
                return ExpertShardWorker(entry.source.path, experts, mode=mode, device=self.node.config.device)
        raise FileNotFoundError(f"no local model file with content hash {content_hash[:16]}")

    def _load_experts(self, content_hash: str, experts: list, reuse: Any = None) -> Any:
        from mesh402.engine.expert_parallel import ExpertShardWorker  # lazy: kept off this module's import path

        for key, entry in self.keys.items():
            if key.endswith("@" + content_hash):
                return ExpertShardWorker(entry.source.path, experts, mode=self.node.config.mode,
                                         device=self.node.config.device, reuse=reuse)
        raise FileNotFoundError(f"no local model file with content hash {content_hash[:16]}")

    def _hot_experts_need_copies(self, key: str, cur: Hosted, layout: ModelLayout, snap: MeshSnapshot) -> bool:
        """After enough tokens, re-plan an expert split once if gate usage makes new experts hot enough to
        deserve a second copy (placement by usage; a replica's node can then die without stopping
        generation)."""
        if not isinstance(cur.plan, ExpertPlan) or cur.usage_checked:
            return False
        usage = self._expert_usage(key)
        if not usage:
            return False
        routed = max(sum(c for (la, _), c in usage.items() if la == layer) for layer in {la for la, _ in usage})
        if routed < EXPERT_USAGE_MIN_TOKENS * layout.experts.n_used:
            return False
        cur.usage_checked = True
        cand = plan_experts(key, layout, snap, usage, epoch=cur.plan.epoch, max_split_rtt_ms=self.max_split_rtt_ms)
        if isinstance(cand, ExpertPlan) and set(cand.replicated) - set(cur.plan.replicated):
            log.info("gate usage of %s: replicating hot experts %s", key, sorted(cand.replicated))
            return True
        return False

    def _expert_usage(self, key: str) -> dict | None:
        """Gate usage of ``key`` seen by this node: engines it hosted before plus the current one
        (None: no data, placement assumes uniform usage)."""
        use = dict(self.usage_seen.get(key, {}))
        h = self.hosted.get(key)
        eng = getattr(getattr(h, "serving", None), "engine", None)
        for st in getattr(eng, "stages", None) or []:
            for ex, c in st.expert_usage().items():
                use[ex] = use.get(ex, 0) + c
        return use or None

    def _keep_usage(self, key: str) -> None:
        """Fold the current engine's gate usage into ``usage_seen`` before it is replaced."""
        use = self._expert_usage(key)
        if use:
            self.usage_seen[key] = use

    async def _connect_expert(self, node: str) -> FramedStream:
        return await self.mesh.open_stream(bytes.fromhex(node), StreamType.EXPERT)

    async def _on_expert_stream(self, peer_id: bytes, fs: FramedStream) -> None:
        await self.expert_service.handle(bytes(peer_id).hex(), fs)

    async def _assign_experts(self, key: str, model_id: str, node: str, experts: Any, epoch: int) -> None:
        content_hash = key.rsplit("@", 1)[1]
        for attempt in range(ASSIGN_CONNECT_TRIES):
            fs = await self._connect_expert(node)
            await fs.send(stage_frame(K.STAGE_KIND_EXPERT_ASSIGN, model_id=model_id, content_hash=content_hash,
                                      plan_epoch=epoch,
                                      params={"experts": json.dumps([list(e) for e in experts], separators=(",", ":"))}))
            try:
                expect_stage(await fs.recv(ASSIGN_TIMEOUT_S), K.STAGE_KIND_READY, f"expert node {node[:12]}")
                return
            except asyncio.TimeoutError:
                raise StageError(f"expert node {node[:12]} did not load its experts in time", node=node) from None
            except StageError as e:  # not yet heard this node's newest announcement: see _assign
                if e.code not in ("not_host", "bad_epoch") or attempt == ASSIGN_CONNECT_TRIES - 1:
                    raise
                await asyncio.sleep(ASSIGN_RETRY_S)
            finally:
                await fs.finish()

    def _drop_hosting(self, key: str) -> None:
        if self.hosted.pop(key, None) is not None:
            entry = self.keys.get(key)
            if entry is not None:
                entry.local, entry.state = None, "standby"
        role = self.roles.by_key.get(key)
        if role is not None and role[0] == pb.MODEL_ROLE_HOST:
            del self.roles.by_key[key]

    # ---------------------------------------------------------------- engine loading (engine thread)
    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _load_engine(self, entry: ModelEntry, layers: tuple[int, int] | None) -> Any:
        from mesh402.engine import Engine  # lazy: kept off this module's import path
        from mesh402.engine.runtime_env import configure_torch  # lazy: kept off this module's import path

        cfg = self.node.config
        configure_torch(cfg.threads)
        return Engine.load(entry.source.path, mode=cfg.mode, device=cfg.device, layers=layers,
                           max_sessions=cfg.limits.max_sessions, prefill_chunk=cfg.limits.prefill_chunk,
                           max_kv_bytes=cfg.limits.max_kv_bytes)

    def _load_stage(self, content_hash: str, start: int, end: int) -> Any:
        return self._load_range(content_hash, start, end, self.node.config.mode)

    def _load_range(self, content_hash: str, start: int, end: int, mode: str) -> Any:
        """Layers [start, end) of a model on this node's disk, in `mode` (a validator replays in the mode
        the audited stage ran)."""
        for key, entry in self.keys.items():
            if key.endswith("@" + content_hash):
                from mesh402.engine import Engine  # lazy: kept off this module's import path

                cfg = self.node.config
                return Engine.load(entry.source.path, mode=mode, device=cfg.device, layers=(start, end),
                                   max_sessions=cfg.limits.max_sessions, prefill_chunk=cfg.limits.prefill_chunk,
                                   max_kv_bytes=cfg.limits.max_kv_bytes, load_tokenizer=False)
        raise FileNotFoundError(f"no local model file with content hash {content_hash[:16]}")

    # ---------------------------------------------------------------- stage streams
    async def _connect(self, node: str) -> FramedStream:
        return await self.mesh.open_stream(bytes.fromhex(node), StreamType.STAGE)

    async def _on_stage_stream(self, peer_id: bytes, fs: FramedStream) -> None:
        await self.worker.handle(bytes(peer_id).hex(), fs)
        # A successful ASSIGN changes this node's role: announce it.
        for k, eng in self.worker.engines.items():
            key = next((mk for mk in self.keys if mk.endswith("@" + k.content_hash)), None)
            if key is not None and self.roles.by_key.get(key, (0,))[0] != pb.MODEL_ROLE_HOST:
                self.roles.by_key[key] = (pb.MODEL_ROLE_STAGE, k.start, k.end, self.worker.epochs.get(k.content_hash, 0))
        self._publish()

    async def _assign(self, key: str, model_id: str, node: str, start: int, end: int, epoch: int) -> None:
        content_hash = key.rsplit("@", 1)[1]
        for attempt in range(ASSIGN_CONNECT_TRIES):
            try:  # a peer's connection may be being replaced right now
                fs = await self._connect(node)
            except PeerUnavailable:
                if attempt == ASSIGN_CONNECT_TRIES - 1:
                    raise
                await asyncio.sleep(ASSIGN_RETRY_S)
                continue
            await fs.send(stage_frame(K.STAGE_KIND_ASSIGN, model_id=model_id, content_hash=content_hash,
                                      plan_epoch=epoch, layer_start=start, layer_end=end))
            await fs.finish()
            try:
                expect_stage(await fs.recv(ASSIGN_TIMEOUT_S), K.STAGE_KIND_READY, f"stage {node[:12]}")
                return
            except asyncio.TimeoutError:
                raise StageError(f"stage {node[:12]} did not load layers [{start}, {end}) in time", node=node) from None
            except StageError as e:
                # the stage has not heard this node's newest announcement yet (it checks who the host is)
                if e.code not in ("not_host", "bad_epoch") or attempt == ASSIGN_CONNECT_TRIES - 1:
                    raise
                await asyncio.sleep(ASSIGN_RETRY_S)

    # ---------------------------------------------------------------- who may give this node work
    def _control_refusal(self, peer: str, content_hash: str, epoch: int) -> tuple[tuple[str, str] | None, str]:
        """(refusal, model key): only the host this node elects for the model (from the same gossip the
        host plans with) may assign its layers or experts here, and only with a bounded plan epoch."""
        key = next((k for k in self.keys if k.endswith("@" + content_hash)), "")
        entry = self.keys.get(key)
        if entry is None or entry.source.format != "gguf":
            return ("not_held", f"no splittable model with content hash {content_hash[:16]} on this node"), key
        snap = self.snapshot()
        host = self._incumbent(key, snap) or elect_host(key, snap)
        if peer != host:
            return ("not_host", f"{peer[:12]} is not the host of {key} (the host is {str(host)[:12]})"), key
        newest = max(self.worker.epochs.get(content_hash, 0), self.epochs.get(key, 0), self._announced_epoch(key, host))
        if not 0 < epoch <= newest + EPOCH_WINDOW:
            return ("bad_epoch", f"plan epoch {epoch} is out of range (newest known {newest}, window {EPOCH_WINDOW})"), key
        return None, key

    def _announced_epoch(self, key: str, node: str) -> int:
        """The plan epoch `node` itself announces for `key` (0 if none)."""
        ann = next((a for a in self._announcements(connected=False) if bytes(a.node_id).hex() == node), None)
        if ann is None:
            return 0
        content_hash = key.rsplit("@", 1)[1]
        best = max((int(m.plan_epoch) for m in ann.models if m.content_hash == content_hash), default=0)
        claim = L.plan_claim(ann.labels.get(PLAN_LABEL + key), node)
        if claim is not None:
            best = max(best, claim.epoch)
        return min(best, MAX_EPOCH)

    async def _proved(self, peer: str, content_hash: str) -> None:
        """Before judging a peer's ASSIGN: if it announces the model but has not proved it holds it yet, ask
        now (the host may have planned before this node asked), so an honest host is not refused for a race."""
        key = next((k for k in self.keys if k.endswith("@" + content_hash)), None)
        if key is None or peer == self.me or not self._allowed(peer) or self.holdings.proven(peer, content_hash):
            return
        ann = next((a for a in self._announcements() if bytes(a.node_id).hex() == peer), None)
        if ann is not None and any(m.content_hash == content_hash for m in ann.models):
            await self.holdings.ensure(peer, content_hash)

    async def _may_assign(self, peer: str, sf: pb.StageFrame) -> tuple[str, str] | None:
        await self._proved(peer, sf.content_hash)
        refused, key = self._control_refusal(peer, sf.content_hash, int(sf.plan_epoch))
        if refused is not None:
            return refused
        layout = self._layout(key, self.keys[key])
        try:
            need = stage_bytes(layout, int(sf.layer_start), int(sf.layer_end))
        except ValueError as e:
            return "bad_range", str(e)
        if not fits(need, self.capacity):
            return "over_budget", (f"layers [{sf.layer_start}, {sf.layer_end}) need {need / 1e6:.1f} MB, beyond this "
                                   f"node's budget of {self.capacity / 1e6:.1f} MB")
        return None

    async def _may_assign_experts(self, peer: str, sf: pb.StageFrame,
                                  experts: list[tuple[int, int]]) -> tuple[str, str] | None:
        await self._proved(peer, sf.content_hash)
        refused, key = self._control_refusal(peer, sf.content_hash, int(sf.plan_epoch))
        if refused is not None:
            return refused
        ex = self._layout(key, self.keys[key]).experts
        if ex is None:
            return "bad_range", f"{key} has no experts"
        if len(set(experts)) != len(experts) or not all(
                0 <= la < len(ex.expert_bytes) and ex.expert_bytes[la] > 0 and 0 <= e < ex.n_experts for la, e in experts):
            return "bad_range", "the expert list names experts the model does not have"
        need = sum(ex.expert_bytes[la] for la, _ in experts)
        if not fits(need, self.capacity):
            return "over_budget", f"the experts need {need / 1e6:.1f} MB, beyond this node's budget of {self.capacity / 1e6:.1f} MB"
        return None

    # ---------------------------------------------------------------- Failover (used by PipelineModel)
    async def alive(self, node: str) -> bool:
        """A probe of a stage; its outcome goes to the mesh's shared peer-health tracker."""
        peer = bytes.fromhex(node)
        try:
            await self.mesh.ping(peer, timeout=self.node.config.timers.stage_probe_s)
        except Exception:
            self.mesh.health.failed(peer)
            return False
        self.mesh.health.succeeded(peer)
        return True

    async def replace(self, chain: Chain, dead: set[str]) -> Chain:
        """Give each dead stage's layer range to a live node that has the model and room for it."""
        key = make_model_key(chain.model_id, chain.content_hash)
        async with self._lock:
            return await self._replace_locked(key, chain, dead)

    async def _replace_locked(self, key: str, chain: Chain, dead: set[str]) -> Chain:
        hosted = self.hosted.get(key)
        if hosted is None:
            raise StageError(f"{key} is no longer hosted here", code="no_plan")
        plan = hosted.plan
        if (plan.epoch > chain.epoch and not dead & set(plan.nodes) and plan.stages[0].end == chain.local_end
                and len(plan.stages) > 1):
            # The mesh already re-planned around the dead stage with the same host range: join that plan.
            self._count_failover(key)
            return Chain(chain.model_id, chain.content_hash, plan.epoch, chain.local_end,
                         tuple(Hop(s.node_id, s.start, s.end) for s in plan.stages[1:]))
        for node in dead:  # a dead stage is in backoff for every retry policy, not only this one
            self.mesh.health.failed(bytes.fromhex(node))
        snap = self.snapshot().without(dead)
        used = {self.me} | {h.node for h in chain.hops if h.node not in dead}
        epoch = max(self._seen_epoch(key), chain.epoch) + 1
        hops = []
        for h in chain.hops:
            if h.node in dead:
                need = stage_bytes(hosted.layout, h.start, h.end)
                cands = [n for n in snap.holders(key) if n not in used and fits(need, snap.capacity(n))
                         and self.mesh.health.may_try(bytes.fromhex(n))]  # not a node that just failed
                if not cands:
                    raise StageError(f"no live node can take layers [{h.start}, {h.end}) of {chain.model_id}",
                                     code="no_plan")
                pick = max(cands, key=lambda n: (snap.capacity(n), n))
                await self._assign(key, chain.model_id, pick, h.start, h.end, epoch)
                used.add(pick)
                h = Hop(pick, h.start, h.end)
            hops.append(h)
        self.epochs[key] = epoch
        new_chain = Chain(chain.model_id, chain.content_hash, epoch, chain.local_end, tuple(hops))
        stages = (hosted.plan.stages[0],) + tuple(
            type(hosted.plan.stages[0])(h.node, h.start, h.end, stage_bytes(hosted.layout, h.start, h.end))
            for h in hops)
        hosted.plan = Plan(key, epoch, self.me, stages, est_token_latency_ms=hosted.plan.est_token_latency_ms)
        self.roles.by_key[key] = (pb.MODEL_ROLE_HOST, stages[0].start, stages[0].end, epoch)
        if isinstance(hosted.serving, PipelineModel):
            hosted.serving.chain = new_chain  # new sessions use the repaired chain too
        self._count_failover(key)
        return new_chain

    def _count_failover(self, key: str) -> None:
        # Counted before the announcement goes out, so a published plan never shows a repaired chain
        # with the failover that repaired it missing (a reader of the plan label would see both at once).
        self.failovers[key] = self.failovers.get(key, 0) + 1
        self._publish()

    # ---------------------------------------------------------------- announcement
    def _publish(self) -> None:
        labels = dict(self.mesh.local.labels)
        labels[CAPACITY_LABEL] = str(self.capacity)
        for k in [k for k in labels if k.startswith((PLAN_LABEL, L.VERIFIED_LABEL))]:
            del labels[k]
        for key in self.keys:  # the peers that proved to this node they hold its models: its vouch
            content_hash = key.rsplit("@", 1)[1]
            held = self.holdings.holders(content_hash)[:L.MAX_VERIFIED]
            if held:
                labels[L.VERIFIED_LABEL + content_hash] = json.dumps(held, separators=(",", ":"))
        for key, h in self.hosted.items():
            d = _expert_plan_dict(h) if isinstance(h.plan, ExpertPlan) else h.plan.to_dict()
            d["ready"] = True
            stats = getattr(h.serving, "stats", None)
            if stats is not None:
                d["activation_bytes_sent"] = stats.bytes_sent
            d["failovers"] = self.failovers.get(key, 0)
            d["links"] = self._link_bytes(h)
            labels[PLAN_LABEL + key] = json.dumps(d, separators=(",", ":"))
        for key, reason in self.waiting.items():
            labels[PLAN_LABEL + key] = json.dumps({"model_key": key, "host": self.me, "ready": False,
                                                   "waiting": reason, "stages": []})
        if labels != self.mesh.local.labels:
            self.mesh.update_local(labels=labels)

    def _link_bytes(self, h: Hosted) -> dict[str, int]:
        if h.expert_transport is not None:
            return {f"{self.me[:8]}<->{n[:8]}": b for n, b in h.expert_transport.by_node.items()}
        stats = getattr(h.serving, "stats", None)
        if stats is None or h.plan.is_solo:
            return {}
        first = h.plan.stages[1].node_id
        return {f"{self.me[:8]}->{first[:8]}": stats.bytes_sent}

    def role_for(self, entry: ModelEntry) -> tuple[int, int, int, int] | None:
        """(role, layer_start, layer_end, epoch) this node announces for a local model, if any."""
        for key, e in self.keys.items():
            if e is entry:
                role = self.roles.by_key.get(key)
                if role is not None:
                    return role
                if entry.state == "standby":
                    return (pb.MODEL_ROLE_STANDBY, 0, 0, 0)
        return None

    def status(self) -> dict[str, Any]:
        plans = {}
        for key, (host, plan, _) in self.published_plans().items():
            plans[key] = {**plan, "host": host}
        from mesh402.serving.replicas import replica_routes  # lazy: kept off this module's import path

        return {"capacity_bytes": self.capacity, "plans": plans,
                # model -> the hosts this node routes it to (ready claims it believes: proven or vouched for)
                "replicas": {m: sorted(r.host for r in rs) for m, rs in replica_routes(self).items()},
                "stage": {"sessions_opened": self.worker.stats.sessions_opened, "steps": self.worker.stats.steps,
                          "sessions_open": sum(self.worker.sessions.values()),
                          "sessions_idle_closed": self.worker.stats.sessions_idle_closed,
                          "assigns_refused": self.worker.stats.assigns_refused,
                          "opens_refused": self.worker.stats.opens_refused,
                          "streams_refused": self.worker.stats.streams_refused,
                          "bytes_out_by_link": self.worker.stats.by_link,
                          "held": [[k.content_hash[:12], k.start, k.end, int(e.weight_bytes)]
                                   for k, e in self.worker.engines.items()]},
                "holdings": self.holdings.status(),
                "first_stage_audits": self.trust.first_stage.status() if self.trust.first_stage else None,
                "experts": {"held": {ch[:12]: len(ex) for ch, ex in self.expert_service.held().items()},
                            "requests": self.expert_service.requests, "refused": self.expert_service.refused,
                            "bytes_in": self.expert_service.bytes_in, "bytes_out": self.expert_service.bytes_out}}


def _expert_runner(h: Hosted) -> Any:
    stages = getattr(getattr(h.serving, "engine", None), "stages", None) or [None]
    return getattr(stages[0], "experts", None)


def _experts_down(h: Hosted) -> bool:
    """An expert-parallel plan whose host stopped using some expert node (it fell back to replicas or
    failed): re-plan so every expert has a live owner again (a node that died and came back lost its
    experts)."""
    return isinstance(h.plan, ExpertPlan) and bool(getattr(_expert_runner(h), "dead", None))


def _expert_plan_dict(h: Hosted) -> dict[str, Any]:
    """An expert plan as published: one row per node (the host's row spans every layer: the trunk),
    and which experts each node holds ({node: {layer: [experts]}})."""
    plan: ExpertPlan = h.plan
    n_layers = h.layout.n_layers
    experts: dict[str, dict[str, list[int]]] = {}
    for s in plan.shards:
        per: dict[str, list[int]] = {}
        for layer, e in s.experts:
            per.setdefault(str(layer), []).append(int(e))
        experts[s.node_id] = per
    runner = _expert_runner(h)
    return {"kind": "experts", "model_key": plan.model_key, "epoch": plan.epoch, "host": plan.host,
            "stages": [[s.node_id, 0 if s.holds_trunk else -1, n_layers if s.holds_trunk else -1, s.tensor_bytes]
                       for s in plan.shards],
            "experts": experts, "replicated": [list(x) for x in plan.replicated],
            "standbys": list(plan.standbys),
            "experts_down": sorted(getattr(runner, "dead", ()) or ()),
            "gate_usage": _usage_by_layer(h)}


def _usage_by_layer(h: Hosted) -> dict[str, list[int]]:
    """Tokens routed to each expert by the current engine, per MoE layer."""
    out: dict[str, list[int]] = {}
    for st in getattr(getattr(h.serving, "engine", None), "stages", None) or []:
        for (la, e), c in sorted(st.expert_usage().items()):
            out.setdefault(str(la), []).append(int(c))
    return out
