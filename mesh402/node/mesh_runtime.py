"""Glue between a Node and the mesh: runs MeshService and the management API
inside the Node's asyncio loop, and tells the mesh what the node serves.

The Node calls :meth:`MeshRuntime.start` before its API server starts and
:meth:`MeshRuntime.stop` when it shuts down. SIGINT/SIGTERM end the node
gracefully: peers get a PeerLeaving before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import uvicorn
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from mesh402 import __version__
from mesh402 import labels as L
from mesh402.api.management.access import MCP_PATH
from mesh402.api.management.money import money_view
from mesh402.api.management.playground import Playground
from mesh402.api.management.routes import console_app
from mesh402.api.router import MODEL_LABEL
from mesh402.home import read_secret_file
from mesh402.mesh.board_sync import BoardSync
from mesh402.mesh.config import MeshConfig, MeshTimers
from mesh402.mesh.hardware import default_hardware
from mesh402.mesh.identity import write_private
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.service import MeshService
from mesh402.models.profile import model_profile
from mesh402.settings import MeshSettings

if TYPE_CHECKING:
    from mesh402.api.mcp import MeshMcp
    from mesh402.discovery.auto import Discovery
    from mesh402.node.node import Node

log = logging.getLogger(__name__)

CONSOLE_TOKEN_FILE = "console.token"
FINGERPRINT_CACHE = "fingerprints.json"
MODEL_POLL_S = 1.0


class ConsoleError(Exception):
    pass


class _ConsoleServer(uvicorn.Server):
    """The console shares the loop with the API server: it must not take over signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


def console_token_path(home: Path) -> Path:
    return Path(home) / CONSOLE_TOKEN_FILE


def read_console_token(home: Path) -> Optional[str]:
    p = console_token_path(home)
    try:
        return p.read_text().strip() or None
    except OSError:
        return None


def home_console_token(home: Path) -> str:
    """The token kept in the home (0600) from an earlier start, so a logged-in page stays logged in across
    restarts; a new one when there is none or the file is readable by others (then it may have leaked)."""
    try:
        return read_secret_file(console_token_path(home))
    except (ValueError, OSError):
        return new_console_token()


class MeshRuntime:
    def __init__(self, node: "Node", settings: MeshSettings, on_ready: Optional[Callable[["MeshRuntime"], None]] = None):
        self.node = node
        self.settings = settings
        self.on_ready = on_ready
        cfg = node.config
        self.mesh = MeshService(
            MeshConfig(
                home=cfg.home,
                bind_ip=settings.bind_ip,
                bind_port=settings.bind_port,
                relay_url=settings.relay_url,
                kind=settings.kind,
                name=settings.name,
                policy=settings.policy,
                api_port=cfg.port,
                console_port=0,
                version=__version__,
                invite_expires=settings.invite_expires,
                timers=MeshTimers.fast() if settings.fast_timers else MeshTimers(),
            )
        )
        self.console_server: Optional[_ConsoleServer] = None
        self.console_task: Optional[asyncio.Task] = None
        self.mcp: Optional[MeshMcp] = None  # /mcp on the console, once its SDK is imported
        self._mcp_lock = asyncio.Lock()
        self._mcp_failed = False
        self.console_port: Optional[int] = None
        self.console_host = "0.0.0.0" if settings.console_listen_all else "127.0.0.1"
        self._poll_task: Optional[asyncio.Task] = None
        self._fingerprints: dict[str, Any] = {}
        self._meta_cache: dict[str, pb.ModelEntry] = {}
        self._signals_seen = 0
        self._old_handlers: dict[int, Any] = {}
        self.discovery: Discovery | None = None  # with --publish / --auto
        self.board = BoardSync(self.mesh, self.mesh.home)  # the mesh blackboard, kept in <home>/board.json

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._install_signal_handlers()
        hw = self._hardware()
        self.mesh.local.hardware = hw
        join = list(self.settings.join or [])
        created_own = False
        s = self.settings
        if s.publish or s.auto or s.discover_lan:
            from mesh402.discovery.auto import Discovery  # lazy: kept off this module's import path

            self.discovery = Discovery(self)
            self.mesh.config.new_mesh_id = self.discovery.new_mesh_id()
            if s.auto and not join:
                import time as _time

                t0 = _time.perf_counter()
                choice = await self.discovery.choose(self.mesh.membership.mesh_id or "")
                if choice is not None:
                    try:
                        await self.mesh.start(join=[choice.listing.invite])
                        self.discovery.join_s = _time.perf_counter() - t0
                        join = ["(discovered)"]
                    except Exception as e:  # the listed mesh is gone: start our own
                        log.warning("--auto: joining %s failed (%s); starting a new mesh",
                                    choice.listing.mesh_id[:12], e)
                        self.discovery.last_error = f"join failed: {e}"
                        self.discovery.choice = None
                        self.mesh.endpoint = None
                if not join and self.settings.kind == "client" and not self.mesh.membership.is_member:
                    from mesh402.mesh.errors import JoinError  # lazy: kept off this module's import path

                    raise JoinError("--auto found no open mesh to join (an API-only client cannot start one)")
                if not join:
                    # --auto found nothing: rejoin the mesh this home belongs to, else a fresh open mesh
                    m = self.mesh.membership
                    if not m.is_member:
                        m.mesh_id = None
                        self.mesh.config.policy = "open"
                    created_own = m.mesh_id is None or m.policy_name == "open"
                    await self.mesh.start()
        if not self.mesh.running:
            created_own = not join and not self.mesh.membership.mesh_id
            await self.mesh.start(join=join or None)  # InviteError / JoinError: one line
        self.board.start()
        try:
            await self._start_console()
        except BaseException:
            await self.mesh.stop(graceful=False)
            raise
        with contextlib.suppress(Exception):  # name the console in node.json as soon as it answers
            self.node._write_state()
        self.mesh.update_local(console_port=self.console_port or 0, models=self._model_entries(hash_files=False))
        self._poll_task = asyncio.create_task(self._poll_models())
        if self.discovery is not None:
            self.discovery.start(created_own)
        if self.on_ready is not None:
            self.on_ready(self)

    # ------------------------------------------------------------ what discovery asks (DiscoveryHost)

    @property
    def home(self) -> Path:
        return Path(self.node.config.home)

    def model_ids(self) -> frozenset[str]:
        return frozenset(e.model_id for e in self.node.registry.all())

    def capacity_bytes(self) -> int:
        """The weight budget a listing advertises (--max-vram; 0 when unset)."""
        return int((self.node.config.max_vram_gb or 0) * 1e9)

    def after_switch(self) -> None:
        """The node moved to another mesh (an --auto merge): re-announce what it serves."""
        self.mesh.update_local(console_port=self.console_port or 0, models=self._model_entries(hash_files=False))
        with contextlib.suppress(Exception):
            self.node._write_state()
        dist = self.node.distributed
        if dist is not None:
            dist.kick()

    async def stop(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
        if self.discovery is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.discovery.stop(), 5.0)
        await self.board.stop()
        await self.mesh.stop(graceful=True)
        if self.console_server is not None:
            self.console_server.should_exit = True
            if self.console_task is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(self.console_task, 3.0)
        if self.mcp is not None:
            await self.mcp.stop()
        self._restore_signal_handlers()

    def state(self) -> dict[str, Any]:
        """Merged into the node's ``<home>/node.json`` so CLI subcommands find the console."""
        host = "127.0.0.1"
        return {
            "node_id": self.mesh.node_id.hex(),
            "mesh_id": self.mesh.mesh_id,
            "kind": self.settings.kind,
            "console_port": self.console_port,
            "console_url": f"http://{host}:{self.console_port}" if self.console_port else None,
            "console_auth": True,  # a console always has a token (home_console_token)
            "mesh_addrs": self.mesh.local_addrs(),
        }

    # ------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        if sys.platform == "win32":
            return
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._signals_seen += 1
            if self._signals_seen > 2:
                raise KeyboardInterrupt
            server = self.node.server
            if server is not None:
                server.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, h in self._old_handlers.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, h)
        self._old_handlers.clear()

    # ------------------------------------------------------------ console

    def _bind_console(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.console_host, port))
        except OSError:
            sock.close()
            raise
        return sock

    async def _start_console(self) -> None:

        s = self.settings
        if s.console_listen_all and not s.console_token:
            raise ConsoleError("--console-listen-all needs a console token (--console-token-file or MESH402_CONSOLE_TOKEN)")
        # Always a token: without one any local process could read the invite token and mint invites.
        token = s.console_token or home_console_token(self.node.config.home)
        write_private(console_token_path(self.node.config.home), token + "\n")  # what the CLI presents
        try:
            sock = self._bind_console(s.console_port)
        except OSError as e:
            if s.console_port_explicit:
                raise ConsoleError(
                    f"console port {s.console_port} is busy ({e.strerror}); pick another with --console PORT"
                ) from None
            sock = self._bind_console(0)
            log.warning("console port %d busy; using %d", s.console_port, sock.getsockname()[1])
        self.console_port = sock.getsockname()[1]
        node = self.node
        home = node.config.home

        def money() -> dict[str, Any]:
            return money_view(node.edge.payments, home)

        app = console_app(self.mesh, token=token, node_info=self._node_info, traffic=node.traffic, money=money,
                          pg=Playground(node.api_root(), node.config.api_key), board_sync=self.board, home=home,
                          runtime=lambda: self.node.distributed)
        app.router.routes.append(Route(MCP_PATH, _LazyMcp(self._mcp_server), methods=["GET", "POST", "DELETE"]))
        cfg = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1)
        self.console_server = _ConsoleServer(cfg)
        self.console_task = asyncio.create_task(self.console_server.serve(sockets=[sock]))
        for _ in range(200):
            if self.console_server.started or self.console_task.done():
                break
            await asyncio.sleep(0.01)

    async def _mcp_server(self) -> Optional[MeshMcp]:
        """The MCP server behind /mcp, started on its first request (the SDK costs about a second of CPU to
        import, more than the rest of a node's start, and most nodes never serve an MCP client)."""
        async with self._mcp_lock:
            if self.mcp is None and not self._mcp_failed:
                await asyncio.to_thread(_import_mcp)  # off the loop: the console keeps answering meanwhile
                from mesh402.api.mcp import MeshMcp  # lazy: imported just above, in the thread

                try:
                    mcp = MeshMcp(self.mesh, self.board, lambda: self.node.app,
                                  api_key=lambda: self.node.config.api_key, node_info=self._node_info,
                                  loopback=not self.settings.console_listen_all)
                    await mcp.start()
                    self.mcp = mcp
                except Exception:  # the console and the mesh keep working without it
                    self._mcp_failed = True
                    log.exception("the MCP server did not start")
        return self.mcp

    def _node_info(self) -> dict[str, Any]:
        node = self.node
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "version": __version__,
            "api_port": node.config.port,
            "api_url": f"http://127.0.0.1:{node.config.port}/v1",
            "console_port": self.console_port,
            "models": {e.model_id: e.state for e in node.registry.all()},
            # what a later version reports (escrow vouchers, stake, slashes): null = not reported (docs/console.md)
            "economics": {"vouchers": None, "stake": None, "slashes": None},
        }
        dist = node.distributed
        if dist is not None:
            info["distributed"] = dist.status()
            staked = dist.trust.stake_status  # --quorum: this node's agent's stake and slashes (atomic USDC)
            if staked:
                info["economics"].update(stake={"agent_id": staked["agent_id"], **staked["stake"]},
                                         slashes=staked["slashes"])
            closer = node.closer
            if closer is not None:
                info["distributed"]["payouts"] = closer.status()
            if node.escrow is not None:
                info["distributed"]["escrow"] = node.escrow.status()
            if dist.stake_filter is not None:  # --min-stake: which peers' stake was read, and the verdicts
                info["distributed"]["min_stake"] = {"required": node.config.trust.min_stake,
                                                    **dist.stake_filter.status()}
        if self.discovery is not None:
            info["discovery"] = self.discovery.status()
        if node.edge.backends is not None:
            info["backends"] = node.edge.backends.status()  # health of each --backend and its models
        return info

    # ------------------------------------------------------------ what this node serves

    def _hardware(self) -> pb.Hardware:
        hw = default_hardware()
        device = self.node.config.device or "cpu"
        hw.device_kind = device.split(":")[0]
        torch = sys.modules.get("torch")  # only if the engine already loaded it
        if torch is not None and hw.device_kind == "cuda":
            with contextlib.suppress(Exception):
                idx = int(device.split(":")[1]) if ":" in device else 0
                props = torch.cuda.get_device_properties(idx)
                hw.gpu_name = props.name
                hw.vram_bytes = int(props.total_memory)
                hw.gpu_count = torch.cuda.device_count()
        return hw

    def fingerprint(self, path: Path) -> str:
        """Content hash of a model file (or safetensors folder), cached by size and mtime."""
        home = self.node.config.home
        cache_path = Path(home) / FINGERPRINT_CACHE
        if not self._fingerprints:
            with contextlib.suppress(OSError, ValueError):
                self._fingerprints = json.loads(cache_path.read_text())
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        key = str(path)
        stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        hit = self._fingerprints.get(key)
        if hit and hit.get("stamp") == stamp:
            return hit["sha256"]
        from mesh402.models.gguf_meta import file_fingerprint  # lazy: loads gguf, numpy only when needed

        if path.is_dir():
            import hashlib

            h = hashlib.sha256()
            for f in files:
                if f.suffix in (".safetensors", ".json"):
                    h.update(f.name.encode() + b"\0" + bytes.fromhex(file_fingerprint(f)))
            digest = h.hexdigest()
        else:
            digest = file_fingerprint(path)
        self._fingerprints[key] = {"stamp": stamp, "sha256": digest}
        with contextlib.suppress(OSError):
            cache_path.write_text(json.dumps(self._fingerprints))
        return digest

    def _model_entry(self, entry, hash_files: bool) -> pb.ModelEntry:
        src = entry.source
        path = Path(src.path)
        m = pb.ModelEntry()
        m.CopyFrom(self._static_model_facts(entry.model_id, src.format, path))
        m.role = {"ready": pb.MODEL_ROLE_HOST, "loading": pb.MODEL_ROLE_STANDBY}.get(entry.state, pb.MODEL_ROLE_ON_DISK)
        m.ready = entry.state == "ready"
        dist = self.node.distributed
        role = dist.role_for(entry) if dist is not None else None
        if role is not None:  # placement decides: host, stage (with its layers) or standby
            role_kind, m.layer_start, m.layer_end, m.plan_epoch = role
            m.role = pb.ModelRole.ValueType(role_kind)
            m.ready = m.role in (pb.MODEL_ROLE_HOST, pb.MODEL_ROLE_STAGE)
        if hash_files:
            with contextlib.suppress(Exception):
                m.content_hash = self.fingerprint(path)
        else:
            hit = self._fingerprints.get(str(path))
            if hit:
                m.content_hash = hit["sha256"]
        return m

    def _static_model_facts(self, model_id: str, fmt: str, path: Path) -> pb.ModelEntry:
        key = f"{model_id}\0{path}"
        cached = self._meta_cache.get(key)
        if cached is not None:
            return cached
        m = pb.ModelEntry(model_id=model_id)
        src_format = fmt
        with contextlib.suppress(Exception):
            if src_format == "gguf":
                from mesh402.models.gguf_meta import read_gguf_meta  # lazy: loads gguf, numpy only when needed

                meta = read_gguf_meta(path)
                m.n_layers = meta.n_layers
                m.size_bytes = meta.file_size
                m.architecture = meta.architecture
                m.context_length = meta.n_ctx
                m.quant = meta.quant
                m.moe.is_moe = meta.expert_count > 0
                m.moe.expert_count = meta.expert_count
                m.moe.experts_used = meta.expert_used_count
            else:
                cfg = json.loads((path / "config.json").read_text())
                m.n_layers = int(cfg.get("num_hidden_layers", 0))
                m.architecture = str(cfg.get("model_type", ""))
                m.context_length = int(cfg.get("max_position_embeddings", 0))
                m.size_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
                n_exp = int(cfg.get("num_local_experts", cfg.get("num_experts", 0)) or 0)
                m.moe.is_moe = n_exp > 0
                m.moe.expert_count = n_exp
                m.moe.experts_used = int(cfg.get("num_experts_per_tok", 0) or 0)
        self._meta_cache[key] = m
        return m

    def _model_labels(self) -> dict[str, str]:
        """The announcement's labels plus model:<id> routing facts (metadata, observed speed)."""

        labels = {k: v for k, v in self.mesh.local.labels.items() if not k.startswith(MODEL_LABEL)}
        router = self.node.edge.router
        for e in self.node.registry.all():
            try:
                prof = model_profile(str(e.source.path), e.source.format)
            except Exception:
                continue
            labels[MODEL_LABEL + e.model_id] = router.label_for(e.model_id, prof) if router else json.dumps(prof)
        backends = self.node.edge.backends
        if backends is not None:  # `--backend` models, so peers route to them (health re-announced on change)
            listed = backends.listing({e.model_id for e in self.node.registry.all()})
            listed.sort(key=lambda m: m["state"] != "ready")  # ready first: the rest would not fit the announcement
            for m in listed[:L.MAX_BACKEND_MODELS]:
                labels[MODEL_LABEL + m["id"]] = L.backend_label(m["state"] == "ready", m.get("context_length", 0))
        offer = self.node.edge.payments.offer()
        if offer is not None:  # what this node sells: an entry routing here prices its requests by it
            from mesh402.economics.charging import OFFER_LABEL  # lazy: kept off this module's import path
            labels[OFFER_LABEL] = offer.to_label()
        with contextlib.suppress(Exception):  # ERC-8004 agent claim after `mesh402 register` (peers verify it)
            from mesh402.economics.erc8004 import announcement_label  # lazy: kept off this module's import path
            labels.update(announcement_label(self.node.config.home))
        dist = self.node.distributed
        if dist is not None:  # a --validator announces itself: entries send it their spot checks
            labels.update(dist.trust.labels)
            labels.update(dist.pay_labels)  # --escrow: the wallet entries pay this node's stage work to
        return labels

    def _model_entries(self, hash_files: bool) -> list[pb.ModelEntry]:
        return [self._model_entry(e, hash_files) for e in self.node.registry.all()]

    async def _poll_models(self) -> None:
        """Re-announce when a model finishes loading (or fails); hash files off the loop."""
        last = None
        hashed = False
        while True:
            if not hashed:
                entries = await asyncio.to_thread(self._model_entries, True)
                hashed = True
            else:
                entries = self._model_entries(hash_files=False)
            labels = self._model_labels()
            sig = [m.SerializeToString(deterministic=True) for m in entries] + sorted(
                kv for kv in labels.items() if kv[0].startswith(("model:", "erc8004", "validator", "x402", "escrow")))
            if sig != last:
                last = sig
                self.mesh.update_local(models=entries, labels=labels)
            await asyncio.sleep(MODEL_POLL_S)


def new_console_token() -> str:
    return secrets.token_urlsafe(24)


class _LazyMcp:
    """The ASGI endpoint of /mcp: starts the MCP server on the first request, then hands every request to it.
    It sits in the console app from the start, so the console's token check covers it like every route."""

    def __init__(self, server: Callable[[], Awaitable[Optional[MeshMcp]]]) -> None:
        self._server = server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        mcp = await self._server()
        if mcp is None:
            await PlainTextResponse("the MCP server did not start (see the node's log)", 503)(scope, receive, send)
            return
        await mcp.starlette(scope, receive, send)


def _import_mcp() -> None:
    """Load the MCP SDK in a thread: the loop keeps answering meanwhile."""
    import mesh402.api.mcp  # noqa: F401
