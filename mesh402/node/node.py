"""A running node: loads its models, serves the OpenAI API, and records its ports in --home."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from mesh402 import __version__
from mesh402.api.backend import Backend
from mesh402.api.backends import BackendPool
from mesh402.api.meter import TrafficMeter
from mesh402.api.openai import create_app, edge_of
from mesh402.api.traffic import Traffic
from mesh402.api.tunnel import TunnelLimits, make_handler
from mesh402.discovery.registry import live_listing
from mesh402.economics.quorum_checks import QuorumChecks
from mesh402.economics.validation_registry import RegistryValidation
from mesh402.home import Home, HomeLock
from mesh402.mesh.framing import StreamType
from mesh402.models.catalog import ModelSource
from mesh402.node.mesh_runtime import MeshRuntime
from mesh402.node.payouts import entry_closer
from mesh402.placement import node_capacity
from mesh402.serving.engine_thread import EngineThread
from mesh402.serving.generation import LocalModel
from mesh402.serving.registry import ModelEntry, ModelRegistry
from mesh402.settings import NodeConfig

if TYPE_CHECKING:
    from mesh402.node.mesh_runtime import MeshRuntime
    from mesh402.node.escrow_pay import EscrowPay
    from mesh402.node.payouts import EpochCloser
    from mesh402.serving.distributed import DistributedRuntime
    from mesh402.serving.quorum_votes import QuorumChain
    from mesh402.serving.stake_filter import StakeFilter
    from mesh402.serving.verification import ValidationChain

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: NodeConfig, sources: list[ModelSource], home_lock: HomeLock | None = None) -> None:
        """`home_lock`: the home's lock from startup.preflight, held until the node has stopped."""
        self.config = config
        self.home = Home(config.home).ensure()
        self.home_lock = home_lock
        self.registry = ModelRegistry()
        for src in sources:
            self.registry.add(src)
        # One engine thread per node: torch calls are serialised; requests interleave per step.
        self.executor = EngineThread()  # every engine call of this node, one at a time (serving.engine_thread)
        self.app = create_app(config, self.registry, live_listing=self._live_listing)
        self.edge = edge_of(self.app)  # what the API's handlers share: the node attaches its runtime to it
        if config.backends:  # --backend URL: answered through this API, probed in the background
            self.edge.backends = BackendPool([Backend(u, config.backend_key) for u in config.backends],
                                             retry_after=config.timers.retry_after_s)
        self.traffic = Traffic()  # what the edge served, for the console (fed by the meter in front of the app)
        self.app.add_middleware(TrafficMeter, traffic=self.traffic)
        self.server: uvicorn.Server | None = None
        self.started_at = time.time()
        self.mesh_runtime: MeshRuntime | None = None  # when config.mesh is set
        self.distributed: DistributedRuntime | None = None  # plans and stage serving, when in a mesh
        self.closer: EpochCloser | None = None  # automatic epoch payouts of a paid entry
        self.escrow: EscrowPay | None = None  # escrow vouchers (--escrow): paying stages and being paid
        self.on_mesh_ready = None  # callback(MeshRuntime), e.g. the CLI printing the invite token

    def fingerprint(self, path: Path) -> str:
        """Content hash of a model file or folder (cached in the home by the mesh runtime)."""
        assert self.mesh_runtime is not None
        return self.mesh_runtime.fingerprint(path)

    def _live_listing(self) -> dict[str, object] | None:
        """This node's mesh as a discovery listing (served in its ERC-8004 registration file)."""
        if self.mesh_runtime is None or self.distributed is None:
            return None

        return live_listing(self.mesh_runtime.mesh)

    def _load(self, entry: ModelEntry) -> None:
        from mesh402.engine import Engine  # lazy: loads gguf, numpy, torch only when needed
        from mesh402.engine.runtime_env import configure_torch  # lazy: loads gguf, numpy, torch only when needed

        configure_torch(self.config.threads)
        t0 = time.perf_counter()
        engine = Engine.load(entry.source.path, mode=self.config.mode, device=self.config.device,
                             max_sessions=self.config.limits.max_sessions,
                             prefill_chunk=self.config.limits.prefill_chunk,
                             max_kv_bytes=self.config.limits.max_kv_bytes)
        limits = self.config.limits
        entry.local = LocalModel(engine, self.executor, max_batch=limits.max_batch, step_tokens=limits.step_tokens,
                                 speculative_k=limits.draft_tokens)
        entry.state = "ready"
        log.info("model %s ready in %.1fs", entry.model_id, time.perf_counter() - t0)

    async def load_models(self) -> None:
        loop = asyncio.get_running_loop()
        for entry in self.registry.all():
            try:
                await loop.run_in_executor(self.executor, self._load, entry)
            except Exception as e:  # a bad model file must not take the node down
                log.exception("loading %s failed", entry.model_id)
                entry.state, entry.error = "failed", f"{type(e).__name__}: {e}"
        self._write_state()

    def state(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "api_url": self.api_root(),
            "api_port": self.config.port,
            "models": {e.model_id: e.state for e in self.registry.all()},
            "started_at": self.started_at,
            **self._mesh_state(),
        }

    def api_root(self) -> str:
        """Where a local client reaches this node's API (loopback when it listens on every address)."""
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "") else self.config.host
        return f"http://{host}:{self.config.port}"

    def _write_state(self) -> None:
        self.home.write_state(self.state())

    async def run(self) -> None:
        uv = uvicorn.Config(self.app, host=self.config.host, port=self.config.port, log_level="warning",
                            lifespan="off", access_log=False, timeout_graceful_shutdown=int(self.config.timers.shutdown_grace_s))
        self.server = uvicorn.Server(uv)
        if self.edge.backends is not None:
            await self.edge.backends.probe_all()  # their models are known before the node announces itself
            self.edge.backends.start(self.registry if self.edge.payments.charges else None)
        await self._start_mesh()
        if self.mesh_runtime is not None:
            loader = asyncio.create_task(self._start_distributed())
        else:
            loader = asyncio.create_task(self.load_models())
        self._write_state()
        try:
            await self.server.serve()
        finally:
            loader.cancel()
            if self.edge.backends is not None:
                await self.edge.backends.stop()
            if self.closer is not None:
                await self.closer.stop()
            if self.escrow is not None:
                await self.escrow.stop()
            if self.distributed is not None:
                await self.distributed.stop()
            await self._stop_mesh()
            self.home.clear_state()
            self.executor.shutdown(wait=False, cancel_futures=True)
            if self.home_lock is not None:
                self.home_lock.release()

    # ---- mesh: MeshService + management API in this loop ----------------------------------

    async def _start_mesh(self) -> None:
        """Join/create the mesh before the API starts; raises InviteError/JoinError/ConsoleError."""
        if self.config.mesh is None:
            return

        self.mesh_runtime = MeshRuntime(self, self.config.mesh, on_ready=self.on_mesh_ready)
        await self.mesh_runtime.start()

    async def _start_distributed(self) -> None:
        """In a mesh, what this node loads follows the plans (placement), not the command line alone."""
        # Import off the loop: heartbeats must keep flowing while a slow machine loads modules (torch).
        await asyncio.to_thread(_import_serving)
        from mesh402.engine.runtime_env import detected_memory_bytes  # lazy: loads gguf, numpy, torch only when needed
        from mesh402.serving.distributed import DistributedRuntime  # lazy: loads gguf, numpy, torch only when needed

        assert self.mesh_runtime is not None
        cfg = self.config
        detected = await asyncio.to_thread(detected_memory_bytes, cfg.device)
        capacity = node_capacity(cfg.max_vram_gb, detected)
        self.distributed = DistributedRuntime(self, self.mesh_runtime.mesh, capacity,
                                              max_split_rtt_ms=cfg.max_split_rtt_ms, wire_dtype=cfg.wire_dtype,
                                              chain=self._validation_chain(), quorum=self._quorum_chain())
        self.edge.distributed = self.distributed
        self.distributed.stake_filter = self._stake_filter()

        # Tunnelled requests run through this node's own app in-process (never over a socket or a URL).
        self.mesh_runtime.mesh.register_handler(
            StreamType.HTTP_TUNNEL, make_handler(self.app, TunnelLimits(max_body_bytes=cfg.limits.max_request_bytes)))
        self._start_escrow()
        self.distributed.start()
        self._start_payouts()

    def _start_escrow(self) -> None:
        """--escrow: the stages this node uses are paid with vouchers, and its stage work is paid by them."""
        if not self.config.payments.escrow or self.distributed is None:
            return
        from mesh402.node.escrow_pay import EscrowPay  # lazy: web3 only on a node that pays with vouchers

        self.escrow = EscrowPay(self.config.payments, self.home.path)
        self.escrow.attach(self.distributed)
        if self.edge.buyer is not None:  # routed requests to hosts on the same escrow: paid with vouchers
            self.edge.buyer.vouchers = self.escrow.routed_vouchers()
        gate = self.app.state.payment_gate
        if gate is not None:  # and routed requests to this node, from entries on it, are taken with vouchers
            from mesh402.serving.work_pay import RoutedPay

            gate.routed = RoutedPay(self.escrow.ledger, payer_of=self.escrow.wallet_of)
        self.escrow.start()

    def _stake_filter(self) -> StakeFilter | None:
        """--min-stake: paid work only for peers whose agent has the minimum staked (read on chain, cached)."""
        trust = self.config.trust
        if not trust.min_stake or self.distributed is None or self.mesh_runtime is None:
            return None
        if not (trust.rpc_url and trust.staking and trust.registries.get("IdentityRegistry")):
            raise ValueError("--min-stake needs --deployment with MeshStaking and an IdentityRegistry")
        from mesh402.economics.chain import web3_for  # lazy: web3 only on a node that checks stake
        from mesh402.economics.staking import StakeRequirement
        from mesh402.serving.stake_filter import StakeFilter

        mesh = self.mesh_runtime.mesh
        lookup = StakeRequirement(web3_for(trust.rpc_url), trust.staking, trust.registries["IdentityRegistry"],
                                  trust.min_stake, lambda: mesh.mesh_id)
        return StakeFilter(mesh.node_id.hex(), lookup, self.executor, on_change=self.distributed.kick,
                           ok_ttl_s=trust.stake_recheck_s, bad_ttl_s=min(10.0, trust.stake_recheck_s))

    def _validation_chain(self) -> ValidationChain | None:
        """This node's side of the ERC-8004 ValidationRegistry, when it has an owner key and a chain."""
        trust = self.config.trust
        if not (trust.owner_key and trust.rpc_url):
            return None

        return RegistryValidation(trust.rpc_url, trust.owner_key, trust.registries)

    def _quorum_chain(self) -> QuorumChain | None:
        """This node's side of SpotCheckQuorum (--quorum): its owner key opens checks (an entry) and votes
        (a validator)."""
        trust = self.config.trust
        if not (trust.quorum and trust.owner_key and trust.rpc_url):
            return None
        return QuorumChecks(trust.rpc_url, trust.owner_key, trust.quorum, trust.registries)

    def _start_payouts(self) -> None:
        """A paid entry with --payout-key-file pays each epoch after it ends."""
        dist = self.distributed
        if dist is None or dist.receipts is None or not self.config.payments.auto_payout:
            return

        try:
            self.closer = entry_closer(dist, self.config)
            self.closer.start()
        except ValueError as e:
            log.error("automatic payouts off: %s", e)

    async def _stop_mesh(self) -> None:
        """Graceful leave: peers hear PeerLeaving before the process exits."""
        if self.mesh_runtime is not None:
            await self.mesh_runtime.stop()

    def _mesh_state(self) -> dict[str, object]:
        return {"mesh": self.mesh_runtime.state()} if self.mesh_runtime is not None else {}


def _import_serving() -> None:
    """Load the distributed runtime (and with it torch) in a thread: the loop keeps answering meanwhile."""
    import mesh402.serving.distributed  # noqa: F401
