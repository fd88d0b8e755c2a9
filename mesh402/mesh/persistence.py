"""Writing ``mesh.json`` (mesh402.mesh.membership) soon after a change, once per burst of changes."""

from __future__ import annotations

import asyncio

from mesh402.mesh.membership import Membership
from mesh402.mesh.tasks import Debounce, TaskGroup

SAVE_DELAY = 0.2  # seconds: a join or a gossip burst changes the file many times in a row


class MembershipSaver:
    def __init__(self, membership: Membership, tasks: TaskGroup) -> None:
        self.membership = membership
        self.tasks = tasks
        # real time on purpose: this spares the disk, it is not a protocol timer
        self._later = Debounce(tasks, lambda: asyncio.sleep(SAVE_DELAY), self._save)

    def schedule(self) -> None:
        if self.tasks.stopping:
            return
        if not self._later():  # no loop (state built by hand): write now
            self.save_now()

    async def _save(self) -> None:
        self.save_now()

    def save_now(self) -> None:
        if self.membership.mesh_id:
            self.membership.save()
