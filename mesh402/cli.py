"""The `mesh402` command line."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mesh402 import __version__
from mesh402.config import DEFAULT_API_PORT, NodeConfig, load_api_key
from mesh402.home import resolve_home
from mesh402.models.catalog import BUNDLED_MODEL_ID, ModelNotFound, resolve_model

app = typer.Typer(help="mesh402: pool machines into one LLM inference mesh, and pay the ones doing the work.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="Node state directory (env MESH402_HOME; default ~/.mesh402).")]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def serve(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help=f"Model to serve: '{BUNDLED_MODEL_ID}' (bundled, default), a .gguf file, or a safetensors folder. Repeatable.")] = None,
    port: Annotated[int, typer.Option(help="OpenAI-compatible API port.")] = DEFAULT_API_PORT,
    listen_all: Annotated[bool, typer.Option("--listen-all", help="Bind the API on all interfaces (default: loopback only).")] = False,
    home: HomeOpt = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File (mode 0600) holding the API key that /v1 requires; or set MESH402_API_KEY.")] = None,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N or mps.")] = "cpu",
    mode: Annotated[str, typer.Option(help="Numerics: 'fast' (packed quantized kernels) or 'exact' (fp32 dequantized).")] = "fast",
    threads: Annotated[int, typer.Option(help="Torch threads for this node.")] = 1,
    max_sessions: Annotated[int, typer.Option(help="Concurrent generations per model before 503.")] = 16,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Start a node: load models and serve the OpenAI-compatible API."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if mode not in ("fast", "exact"):
        _fail("--mode must be 'fast' or 'exact'")
    try:
        sources = [resolve_model(m) for m in (model or [BUNDLED_MODEL_ID])]
        api_key = load_api_key(api_key_file)
    except (ModelNotFound, ValueError) as e:
        _fail(str(e))
    config = NodeConfig(home=resolve_home(home), models=[s.model_id for s in sources],
                        host="0.0.0.0" if listen_all else "127.0.0.1", port=port, api_key=api_key,
                        device=device, mode=mode, threads=threads)  # type: ignore[arg-type]
    config.limits.max_sessions = max_sessions
    from mesh402.node import Node

    node = Node(config, sources)
    console.print(f"mesh402 {__version__} node: OpenAI API on [bold]http://{'0.0.0.0' if listen_all else '127.0.0.1'}:{port}/v1[/]"
                  f"  models: {', '.join(config.models)}  home: {config.home}", highlight=False)
    if api_key:
        console.print("API key required (Authorization: Bearer …)")
    try:
        asyncio.run(node.run())
    except KeyboardInterrupt:
        pass


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
