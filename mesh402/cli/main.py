"""The `mesh402` command line: one typer app; each command lives in a thin module of this package."""

from __future__ import annotations

import sys

import typer

from mesh402 import __version__
from mesh402.cli import board, economics, mesh, serve, status, work_money
from mesh402.cli.common import console

app = typer.Typer(help="mesh402: pool machines into one LLM inference mesh, and pay the ones doing the work.",
                  no_args_is_help=True, add_completion=False)

app.command("serve")(serve.serve)
app.command("client")(serve.client_cmd)
app.command("invite")(mesh.invite_cmd)
app.command("status")(status.status_cmd)
app.command("discover")(mesh.discover_cmd)
app.add_typer(economics.chain_app, name="chain")
app.add_typer(board.board_app, name="board")
app.command("facilitator")(economics.facilitator_cmd)
app.command("chat")(economics.chat_cmd)
app.command("register")(economics.register_cmd)
app.command("payout")(economics.payout_cmd)
app.add_typer(work_money.escrow_app, name="escrow")
app.add_typer(work_money.stake_app, name="stake")
app.add_typer(work_money.validator_app, name="validator")
app.command("redeem")(work_money.redeem_cmd)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
