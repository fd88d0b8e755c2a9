"""The whole console app a node serves: the management API (``app.py``) plus the page, traffic, money and
playground (``console.py``), the blackboard, earnings and the validation round. Built in one place so that
the access test walks exactly the routes a node serves (``/mcp`` joins later, when its SDK has loaded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from mesh402.api.management import board, console, earnings, validation
from mesh402.api.management.app import create_management_app
from mesh402.api.management.playground import Playground
from mesh402.api.traffic import Traffic
from mesh402.mesh.board_sync import BoardSync
from mesh402.mesh.service import MeshService

if TYPE_CHECKING:
    from mesh402.serving.distributed import DistributedRuntime


def console_app(mesh: MeshService, *, token: str, node_info: Callable[[], dict[str, Any]], traffic: Traffic,
                money: console.Money, pg: Playground, board_sync: BoardSync, home: Path,
                runtime: Callable[[], DistributedRuntime | None]) -> FastAPI:
    app = create_management_app(mesh, node_info=node_info, token=token, ticker=console.ticker(traffic, money))
    console.install(app, traffic=traffic, money=money, pg=pg)  # the web page, traffic, money, playground
    board.install(app, board_sync)  # /api/board: post, read, watch the mesh blackboard
    earnings.install(app, home)  # GET /api/earnings: epoch payouts per node
    validation.install(app, runtime)  # POST /api/epochs/{n}/validate: the validation round
    return app
