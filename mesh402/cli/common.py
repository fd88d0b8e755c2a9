"""What every command shares: the consoles, the one error helper, the node-home option, and how a
subcommand finds the running node (its console port is in <home>/node.json)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console

from mesh402.economics.networks import Deployment
from mesh402.home import Home, HomeBusy, read_secret_file, resolve_home
from mesh402.node.mesh_runtime import read_console_token

console = Console(soft_wrap=True)
err = Console(stderr=True)

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="Node state directory, one running node per home (env MESH402_HOME; default ~/.mesh402).")]


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and exit `code` (2: bad input or a refused start)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def find_console(home: Optional[Path]) -> tuple[str, dict[str, str], dict]:

    h = Home(resolve_home(home))
    state = h.read_state()
    if state is None:
        fail(f"no node running with home {h.path} (start one with: mesh402 serve --home {h.path})")
    pid = state.get("pid")
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            fail(f"the node recorded in {h.path / 'node.json'} (pid {pid}) is not running")
        except PermissionError:
            pass
    port = (state.get("mesh") or {}).get("console_port")
    if not port:
        fail(f"the node with home {h.path} runs no mesh console")
    headers = {}
    tok = read_console_token(h.path)
    if tok:
        headers["Authorization"] = f"Bearer {tok}"
    return f"http://127.0.0.1:{port}", headers, state


def console_get(url: str, headers: dict[str, str]) -> Any:
    import httpx

    try:
        r = httpx.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        fail(f"cannot reach the node's console at {url}: {e}")
    if r.status_code != 200:
        fail(f"{url}: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


def read_token_file(path: Path, flag: str) -> str:
    """An invite token from a file; a read error exits with one line."""
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as e:
        fail(f"cannot read {flag} {path}: {e.strerror or e}")
        raise  # unreachable: _fail exits


@contextlib.contextmanager
def locked_or_fail(home: Path, name: str, what: str) -> Iterator[None]:
    """A lock of the home held for one command that writes its state, or one line naming who holds it."""
    try:
        lock = Home(home).lock(name, what)
    except HomeBusy as e:
        fail(str(e))
        raise  # unreachable: _fail exits
    except OSError as e:
        fail(f"cannot lock {home / name}: {e.strerror or e}")
        raise
    try:
        yield
    finally:
        lock.release()


def load_key(key_file: Optional[Path], env: str, what: str, dep: Any = None, account: Optional[str] = None) -> str:
    """Private keys come from a 0600 file or an env var, never from the command line; with a deployment and
    an account name (and neither given), that account's key file in the deployment."""
    if key_file is None and dep is not None and account and not os.environ.get(env):
        key_file = dep.key_file(account)
    if key_file is not None:
        return read_secret_file(key_file)
    value = os.environ.get(env, "").strip()
    if not value:
        fail(f"{what}: pass --key-file PATH (mode 0600) or set {env}")
    return value


def load_deployment(path: Optional[Path]) -> Any:
    """The deployment file, or None; a missing or broken one is a one-line error."""
    if path is None:
        return None
    try:
        return Deployment.load(path)
    except ValueError as e:
        fail(str(e))

def fmt_bytes(n: int) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)
