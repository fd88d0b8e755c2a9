"""The models a node serves and the state each is in (loading, ready, failed)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from mesh402.models.catalog import ModelSource
from mesh402.serving.generation import LocalModel

# loading; ready (served here); standby (served elsewhere in the mesh, this node can take over);
# waiting (no plan fits the mesh's capacity yet); failed
ModelState = Literal["loading", "ready", "standby", "waiting", "failed"]


@dataclass
class ModelEntry:
    source: ModelSource
    state: ModelState = "loading"
    local: LocalModel | None = None
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_id(self) -> str:
        return self.source.model_id


class ModelRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}

    def add(self, source: ModelSource) -> ModelEntry:
        entry = ModelEntry(source)
        self._entries[source.model_id] = entry
        return entry

    def get(self, model_id: str) -> ModelEntry | None:
        return self._entries.get(model_id)

    def all(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def default(self) -> ModelEntry | None:
        """The first ready model, else the first listed (so a loading node still answers 503, not 404)."""
        ready = [e for e in self._entries.values() if e.state == "ready"]
        if ready:
            return ready[0]
        return next(iter(self._entries.values()), None)

    def all_ready(self) -> bool:
        """Every model is servable: loaded here, or on standby while another node serves it.
        A node with no model (API-only) is ready: it routes to the mesh."""
        return all(e.state in ("ready", "standby") for e in self._entries.values())
