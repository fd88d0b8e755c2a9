"""llama-cpp-python's OpenAI-compatible server for tests and benchmarks: `python -m harness.llama_server
--model FILE --port N ...` (the server's own flags), with the CPU weight repack switched off
(`use_extra_bufts = False` patched into `llama_model_default_params`): on this machine's CPU the AMX
repack segfaults. `start_llama_server` runs it as a process on loopback and waits until it answers."""

from __future__ import annotations

import sys
from pathlib import Path

from harness.procs import NodeProcess, free_port


def no_repack() -> None:
    """Default model params without the CPU weight repack (Llama() has no switch for it)."""
    import llama_cpp

    default = llama_cpp.llama_model_default_params

    def params() -> object:
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params


def start_llama_server(home: Path, model: str | Path, *, alias: str, n_ctx: int = 2048,
                       api_key: str | None = None) -> tuple[NodeProcess, str]:
    """The server as a process (its log in `home`); returns it and its base URL (…/v1)."""
    port = free_port()
    args = [sys.executable, "-m", "harness.llama_server", "--model", str(model), "--model_alias", alias,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "1",
            "--n_threads_batch", "1", "--verbose", "False"]
    if api_key:
        args += ["--api_key", api_key]
    proc = NodeProcess(args, home)
    base = f"http://127.0.0.1:{port}/v1"
    proc.wait_http(f"{base}/models", timeout=120, ok=(200, 401))
    return proc, base


if __name__ == "__main__":
    no_repack()
    from llama_cpp.server.__main__ import main

    main()
