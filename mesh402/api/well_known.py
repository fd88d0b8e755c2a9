"""GET /.well-known/agent-registration.json: the node's ERC-8004 registration file.

`mesh402 register` writes the file into the node's home (and fills in `registrations` once the agent
is on chain); this route serves it, public like /health, with `x402Support` taken from whether the
running node charges. A node that never registered answers 404.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh402.api.errors import APIError
from mesh402.economics.erc8004 import REGISTRATION_FILE, REGISTRATION_PATH


def read_registration(home: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((Path(home) / REGISTRATION_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def install(app: Any, home: Path, live_listing: Callable[[], dict[str, Any] | None] = lambda: None, *,
            x402_support: bool = False) -> None:
    """`live_listing()`: the node's mesh as a discovery listing (the node wires it once it is in a mesh);
    `x402_support`: the node charges with x402."""
    from fastapi.responses import JSONResponse


    @app.get(REGISTRATION_PATH, include_in_schema=False)
    async def agent_registration():  # noqa: ANN202 (FastAPI reads annotations; JSONResponse is local)
        doc = read_registration(home)
        if doc is None:
            raise APIError(404, "this node has no ERC-8004 registration (run: mesh402 register)",
                           type="not_found_error")
        doc["x402Support"] = x402_support
        if isinstance(doc.get("mesh402"), dict):
            try:  # the mesh as a discovery listing, live (--discover-registry joins open meshes with it)
                listing = live_listing()
                if listing is not None:
                    doc["mesh402"]["listing"] = listing
                    doc["mesh402"]["meshId"] = listing["mesh_id"]
            except Exception:
                pass
        return JSONResponse(doc, headers={"Cache-Control": "max-age=60"})
