"""What the collaborators of one mesh node share: its identity, its tables and its plumbing.

The service owns one :class:`MeshContext` and hands it to each collaborator. ``gossip`` and
``liveness`` are replaced when the node enters a mesh (start, switch_mesh), so collaborators read
them here each time and never keep their own reference.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Optional

from mesh402.clock import Clock
from mesh402.mesh.config import MeshConfig, MeshTimers
from mesh402.mesh.conns import PeerConn
from mesh402.mesh.events import EventBus
from mesh402.mesh.gossip import GossipState
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.liveness import LivenessTable
from mesh402.mesh.membership import Membership
from mesh402.mesh.quota import QuotaBook
from mesh402.mesh.tasks import TaskGroup


@dataclass
class MeshContext:
    config: MeshConfig
    identity: NodeIdentity
    membership: Membership
    boot_id: int  # this incarnation: peers tell a restart from a reconnect by it
    counters: collections.Counter[str]
    events: EventBus
    tasks: TaskGroup
    liveness: LivenessTable
    quotas: QuotaBook  # per-peer allowances on the streams peers open here, and peers refused for abuse
    gossip: Optional[GossipState] = None  # None until the node is in a mesh
    conns: dict[bytes, PeerConn] = field(default_factory=dict)

    @classmethod
    def create(cls, config: MeshConfig, identity: NodeIdentity, membership: Membership) -> "MeshContext":
        counters: collections.Counter[str] = collections.Counter()
        return cls(
            config=config,
            identity=identity,
            membership=membership,
            boot_id=int.from_bytes(os.urandom(8), "big") >> 1 or 1,
            counters=counters,
            events=EventBus(config.clock, counters),
            tasks=TaskGroup(counters),
            liveness=LivenessTable(config.timers, config.clock),
            quotas=QuotaBook(config.limits, config.clock),
        )

    @property
    def node_id(self) -> bytes:
        return self.identity.node_id

    @property
    def timers(self) -> MeshTimers:
        return self.config.timers

    @property
    def clock(self) -> Clock:
        return self.config.clock

    @property
    def stopping(self) -> bool:
        return self.tasks.stopping

    @property
    def mesh_gossip(self) -> GossipState:
        """The gossip of the mesh the node is in (only used once it is in one)."""
        if self.gossip is None:
            raise RuntimeError("the node is not in a mesh yet")
        return self.gossip
