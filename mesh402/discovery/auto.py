"""Discovery inside a running node: `--auto` mesh choice, the Nostr publisher and merging.

- Before the mesh starts, an `--auto` node reads the listings and joins the best open mesh
  (:func:`mesh402.discovery.listing.choose_mesh`), or starts its own open mesh and publishes it.
- `--publish` (or an `--auto` node that started its own mesh) keeps a listing on the relays,
  refreshed every `nostr_refresh` seconds and whenever the mesh changes, withdrawn on leave.
- An `--auto` node keeps reading the listings. A listing's node count is only a claim, so it
  never decides a move: the node probes the candidates (:mod:`mesh402.discovery.probe`: joins
  the invite with a throwaway identity and counts the serving members it reaches) and moves only
  when a verified count beats its own mesh's (:func:`mesh402.discovery.probe.beats`: more nodes;
  two lone nodes, the larger id), at most once per ``SWITCH_COOLDOWN_S``. Meshes that verified
  too small are not probed again for ``REJECT_TTL_S``. Two `--auto` nodes that started at once
  end in one mesh; a stranger's inflated listing pulls nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional, Protocol

from mesh402 import labels as L
from mesh402.discovery.lan import txt_for
from mesh402.discovery.listing import (
    MeshListing,
    ScoredMesh,
    Seeker,
    choose_mesh,
    by_mesh,
    named_mesh_id,
    valid_prices,
)
from mesh402.discovery.nostr import NostrDirectory, load_or_create_keys
from mesh402.economics.charging import OFFER_LABEL, HostOffer
from mesh402.discovery.probe import ProbeResult, beats, probe_mesh, rank_verified
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.service import MeshService
from mesh402.settings import MeshSettings


class DiscoveryHost(Protocol):
    """What discovery needs from the node it runs in (the node's mesh runtime provides it)."""

    settings: MeshSettings
    mesh: MeshService

    @property
    def home(self) -> Path: ...

    def model_ids(self) -> frozenset[str]: ...

    def capacity_bytes(self) -> int: ...

    def after_switch(self) -> None: ...

log = logging.getLogger(__name__)

MAX_PROBES = 3  # candidates probed per round (highest claims first): bounds what junk listings cost
SWITCH_COOLDOWN_S = 60.0  # after a move, no other move this long: meshes settle instead of flapping
REJECT_TTL_S = 300.0  # a mesh that verified too small (or failed its probe) is not probed again this long


def mesh_view(mesh: Any) -> dict[str, Any]:
    """Self plus live peers' announcements, summarised for a listing."""
    anns = []
    own = mesh.self_announcement()
    if own is not None:
        anns.append(own)
    if mesh.gossip is not None:
        for nid, entry in mesh.gossip.peers().items():
            lv = mesh.liveness.get(nid)
            if entry.ann.leaving or lv is None or lv.state.value not in ("alive", "suspect"):
                continue
            anns.append(entry.ann)
    serving = sorted({m.model_id for a in anns for m in a.models if m.ready and m.role == pb.MODEL_ROLE_HOST})
    on_disk = sorted({m.model_id for a in anns for m in a.models})
    demand = mesh.demand_view()
    wanted = sorted(k for k in demand if k not in serving)
    servers = [a for a in anns if a.kind != pb.NODE_KIND_CLIENT]
    cap = sum(L.capacity(a.labels) for a in servers)
    return {"serving": serving, "wanted": wanted, "on_disk": on_disk, "capacity": cap,
            "nodes": len(servers), "clients": len(anns) - len(servers), "prices": mesh_prices(anns)}


def mesh_prices(anns: list[Any]) -> list[dict[str, Any]]:
    """What the mesh's selling nodes charge for the models they answer themselves (hosted, or their own
    `--backend` models, unverified): the lowest price per (model, network, asset), per request first. Offers
    and backend claims are peers' labels, read through their validating parsers."""
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    for a in anns:
        offer = HostOffer.from_label(a.labels.get(OFFER_LABEL))
        if offer is None or not offer.charges:
            continue
        own = {m.model_id: True for m in a.models if m.ready and m.role == pb.MODEL_ROLE_HOST}
        for model_id, b in L.backend_models(a.labels).items():
            if b.ready:
                own.setdefault(model_id, False)
        for model_id, verified in own.items():
            row = {"model": model_id, "network": offer.network, "asset": offer.asset,
                   "per_request": str(offer.per_request), "per_1k": str(offer.per_1k), "verified": verified}
            key = (model_id, offer.network, offer.asset)
            price = (offer.per_request, offer.per_1k)
            if key not in best or price < (int(best[key]["per_request"]), int(best[key]["per_1k"])):
                best[key] = row
    return valid_prices([best[k] for k in sorted(best)])


class Discovery:
    def __init__(self, rt: DiscoveryHost) -> None:
        self.rt = rt
        s = rt.settings
        self.settings = s
        self.keys = load_or_create_keys(rt.home)
        self.pubkey = self.keys.public_key().to_hex()
        self.directory = NostrDirectory(s.nostr_relays, self.keys)
        # Nostr unless the node was told to look only on the LAN (--discover-lan, no --nostr-relay)
        self.use_nostr = bool(s.nostr_relays) or not (s.discover_lan or s.discover_registry) or s.publish
        self.lan = None
        if s.discover_lan:
            from mesh402.discovery.lan import LanAnnouncer  # lazy: kept off this module's import path

            self.lan = LanAnnouncer(rt.mesh.node_id.hex())
        self.publishing = bool(s.publish)
        self.choice: Optional[ScoredMesh] = None
        self.join_s: Optional[float] = None  # discovery-to-join time (fetch + dial)
        self.fetch_s: Optional[float] = None
        self.merged_into: Optional[str] = None
        self._tasks: list[asyncio.Task] = []
        self._kick = asyncio.Event()
        self._last_sig: Any = None
        self.last_error = ""
        self.probes: dict[str, int] = {}  # mesh id -> verified serving nodes of the latest probe
        self._rejected: dict[str, float] = {}  # mesh id -> monotonic time it may be probed again
        self._switched_at = -SWITCH_COOLDOWN_S
        self.probe_s: Optional[float] = None  # how long the latest probe took

    # ------------------------------------------------------------ before the mesh starts

    def new_mesh_id(self) -> Optional[str]:
        return named_mesh_id(self.settings.mesh_name, self.pubkey) if self.settings.mesh_name else None

    def seeker(self, last_mesh_id: str) -> Seeker:
        return Seeker(models_on_disk=self.rt.model_ids(), capacity_bytes=self.rt.capacity_bytes(),
                      region=self.settings.region, name=self.settings.mesh_name, last_mesh_id=last_mesh_id)

    async def choose(self, last_mesh_id: str) -> Optional[ScoredMesh]:
        t0 = time.perf_counter()
        listings = await self.fetch_all()
        self.fetch_s = time.perf_counter() - t0
        self.choice = await self._choose_verified(listings, self.seeker(last_mesh_id))
        if self.choice:
            log.info("--auto: mesh %s scored %.0f (%s)", self.choice.listing.mesh_id[:12], self.choice.score,
                     ", ".join(self.choice.reasons))
        return self.choice

    async def _choose_verified(self, listings: list[MeshListing], me: Seeker) -> Optional[ScoredMesh]:
        """The best mesh once the node counts of the best-scored ones are replaced by probed counts.

        A candidate whose probe reaches nobody is dropped; one remembered from last time is kept
        (this home was a member, and its members may simply not be up yet)."""
        left = list(by_mesh(listings).values())
        checked: list[MeshListing] = []
        for _ in range(MAX_PROBES):
            # which to probe first ignores the claimed counts, so inflated claims cannot crowd out the rest
            top = choose_mesh([dataclasses.replace(x, node_count=1) for x in left], me)
            if top is None:
                break
            lst = next(x for x in left if x.mesh_id == top.listing.mesh_id)
            left = [x for x in left if x.mesh_id != lst.mesh_id]
            if lst.mesh_id == me.last_mesh_id:
                checked.append(lst)
                continue
            r = await self._probe(lst)
            if r.verified_nodes > 0:
                checked.append(dataclasses.replace(lst, node_count=r.verified_nodes))
        return choose_mesh(checked, me)

    async def _probe(self, lst: MeshListing) -> ProbeResult:
        t0 = time.perf_counter()
        r = await probe_mesh(self.rt.mesh.config, lst.mesh_id, lst.invite)
        self.probe_s = time.perf_counter() - t0
        self.probes[lst.mesh_id] = r.verified_nodes
        log.info("--auto: mesh %s claims %d nodes, verified %d%s", lst.mesh_id[:12], lst.node_count,
                 r.verified_nodes, f" ({r.error})" if r.error else "")
        return r

    async def fetch_all(self) -> list[MeshListing]:
        """Listings from the Nostr relays and/or the LAN (failures are logged, not raised)."""
        out: list[MeshListing] = []
        if self.use_nostr:
            try:
                out += await self.directory.fetch(self.settings.discover_timeout)
            except Exception as e:
                self.last_error = f"nostr fetch failed: {e}"
                log.warning("%s", self.last_error)
        if self.lan is not None:
            from mesh402.discovery.lan import browse  # lazy: kept off this module's import path

            try:
                out += await browse(self.settings.lan_browse_s, exclude_node=self.rt.mesh.node_id.hex())
            except Exception as e:
                self.last_error = f"LAN browse failed: {e}"
                log.warning("%s", self.last_error)
        if self.settings.discover_registry:  # ERC-8004: registered nodes whose node binding verifies
            from mesh402.discovery.registry import (
                registry_listings,
                resolve_registry_source,
            )  # lazy: kept off this module's import path

            try:
                rpc, registry = resolve_registry_source(self.settings.discover_registry)
                out += await asyncio.to_thread(registry_listings, rpc, registry, timeout=self.settings.discover_timeout,
                                               exclude_node=self.rt.mesh.node_id.hex())
            except Exception as e:
                self.last_error = f"registry discovery failed: {e}"
                log.warning("%s", self.last_error)
        return out

    # ------------------------------------------------------------ while running

    def start(self, created_own: bool) -> None:
        if self.settings.auto and created_own:
            self.publishing = True  # an --auto mesh is found by the next --auto node
        self._tasks.append(asyncio.create_task(self._publish_loop()))
        if self.settings.auto:
            self._tasks.append(asyncio.create_task(self._merge_loop()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        if self.publishing:
            await self.directory.withdraw()
        await self.directory.close()
        if self.lan is not None:
            await self.lan.close()

    def kick(self) -> None:
        self._kick.set()

    def listing(self) -> MeshListing:
        mesh = self.rt.mesh
        v = mesh_view(mesh)
        open_ = mesh.membership.policy == pb.ADMISSION_OPEN and not self.settings.private
        return MeshListing(
            mesh_id=mesh.mesh_id or "", name=self.settings.mesh_name, region=self.settings.region,
            policy="open" if open_ else "private",
            invite=mesh.mint_invite(max(self.settings.nostr_ttl * 4, 3600.0)) if open_ else "",
            serving=v["serving"], wanted=v["wanted"], total_capacity_bytes=v["capacity"], node_count=v["nodes"],
            client_count=v["clients"], version=mesh.local.version, publisher_node=mesh.node_id.hex(),
            prices=v["prices"])

    async def _publish_loop(self) -> None:
        while True:
            if self.lan is not None:
                try:
                    await self._announce_lan()
                except Exception as e:
                    self.last_error = f"LAN announce failed: {e}"
                    log.warning("%s", self.last_error)
            if self.publishing and self.use_nostr:
                try:
                    lst = self.listing()
                    sig = (lst.mesh_id, lst.serving, lst.wanted, lst.node_count, lst.client_count, lst.policy,
                           lst.prices)
                    due = time.time() - self.directory.published_at >= self.settings.nostr_refresh
                    if sig != self._last_sig or due:
                        if await self.directory.publish(lst, self.settings.nostr_ttl):
                            self._last_sig = sig
                except Exception as e:
                    self.last_error = f"nostr publish failed: {e}"
                    log.warning("%s", self.last_error)
            self._kick.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), min(1.0, self.settings.nostr_refresh))

    async def _announce_lan(self) -> None:

        mesh = self.rt.mesh
        lst = self.listing()
        addrs = [a for a in mesh.local_addrs() if not a.startswith("127.")] or mesh.local_addrs()
        ips = sorted({a.rsplit(":", 1)[0] for a in addrs})
        port = int(addrs[0].rsplit(":", 1)[1]) if addrs else 0
        token = lst.invite or mesh.invite_token
        await self.lan.update(txt_for(lst, mesh.node_id.hex(), addrs, token), ips, port)

    async def _merge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.auto_interval)
            await self.merge_once()

    async def merge_target(self) -> Optional[MeshListing]:
        """The listed mesh this node should move to, by probed (verified) counts, or None."""
        mesh = self.rt.mesh
        now = time.monotonic()
        if now - self._switched_at < SWITCH_COOLDOWN_S:
            return None
        listings = await self.fetch_all()
        if self.settings.mesh_name:
            listings = [x for x in listings if x.name == self.settings.mesh_name]
        mine = (mesh_view(mesh)["nodes"], mesh.mesh_id or "")
        self._rejected = {k: t for k, t in self._rejected.items() if t > now}
        # a claim only decides which candidates are worth a probe (and a claim below ours, none)
        cands = sorted((x for x in by_mesh(listings).values()
                        if x.is_open and x.mesh_id != mine[1] and x.mesh_id not in self._rejected
                        and beats((x.node_count, x.mesh_id), mine)),
                       key=lambda x: (-x.node_count, x.mesh_id))[:MAX_PROBES]
        results = []
        for lst in cands:
            r = await self._probe(lst)
            if not beats((r.verified_nodes, lst.mesh_id), mine):
                self._rejected[lst.mesh_id] = time.monotonic() + REJECT_TTL_S
                continue
            results.append(r)
        best = rank_verified(results)
        return next((x for x in cands if best is not None and x.mesh_id == best.mesh_id), None)

    async def merge_once(self) -> None:
        mesh = self.rt.mesh
        target = await self.merge_target()
        if target is None:
            return
        mine = (mesh_view(mesh)["nodes"], mesh.mesh_id or "")
        log.info("--auto: merging mesh %s (%d nodes) into %s (%d verified nodes)", mine[1][:12], mine[0],
                 target.mesh_id[:12], self.probes.get(target.mesh_id, 0))
        was_publishing = self.publishing
        if was_publishing:
            await self.directory.withdraw()
            self.publishing = False
        self._switched_at = time.monotonic()
        try:
            await mesh.switch_mesh(target.invite)
            self.merged_into = target.mesh_id
            self.rt.after_switch()
        except Exception as e:
            self.last_error = f"merge into {target.mesh_id[:12]} failed: {e}"
            log.warning("%s", self.last_error)
            self.publishing = was_publishing

    def status(self) -> dict[str, Any]:
        return {
            "nostr_pubkey": self.pubkey, "relays": self.directory.relays, "publishing": self.publishing,
            "auto": self.settings.auto, "lan": self.lan is not None, "nostr": self.use_nostr, "chosen": (self.choice.listing.mesh_id if self.choice else None),
            "chosen_score": (self.choice.score if self.choice else None),
            "chosen_reasons": list(self.choice.reasons) if self.choice else [],
            "fetch_s": self.fetch_s, "join_s": self.join_s, "merged_into": self.merged_into,
            "verified_nodes": dict(self.probes), "probe_s": self.probe_s,
            "last_error": self.last_error,
        }
