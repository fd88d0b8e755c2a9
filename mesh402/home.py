"""The node's home directory: keys, secrets (0600), the record of a running node's ports, and the locks
that give the home to one process at a time."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_HOME = Path.home() / ".mesh402"
STATE_FILE = "node.json"
NODE_LOCK = "node.lock"  # held by `serve` / `client` for the node's whole life


class HomeBusy(RuntimeError):
    """Another process holds a lock of this home; the message names it (pid, and a node's ports)."""


def resolve_home(home: str | Path | None) -> Path:
    """--home wins, then MESH402_HOME, then ~/.mesh402."""
    if home is None:
        home = os.environ.get("MESH402_HOME") or DEFAULT_HOME
    return Path(home).expanduser().resolve()


class Home:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def ensure(self) -> "Home":
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        return self

    def file(self, name: str) -> Path:
        return self.path / name

    def write_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.file(STATE_FILE), json.dumps(state, indent=2))

    def read_state(self) -> dict[str, Any] | None:
        path = self.file(STATE_FILE)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def clear_state(self) -> None:
        """Remove node.json, but only the one this process wrote: a refused or late process must not hide
        the node that runs with this home from `mesh402 status`."""
        state = self.read_state()
        if state is not None and state.get("pid") == os.getpid():
            self.file(STATE_FILE).unlink(missing_ok=True)

    def lock(self, name: str = NODE_LOCK, what: str = "a node") -> "HomeLock":
        """Take the home's `name` lock for this process, or raise HomeBusy naming the process holding it."""
        try:
            return HomeLock.acquire(self.file(name))
        except BlockingIOError:
            raise HomeBusy(f"{what} already runs with home {self.path} ({self.holder(name)})") from None

    def holder(self, name: str = NODE_LOCK) -> str:
        """Who holds a lock, for a refusal: its pid, and the ports of the node it runs when node.json is its."""
        pid = HomeLock.holder_pid(self.file(name))
        if pid is None:
            return "pid unknown"
        state = self.read_state() or {}
        if state.get("pid") != pid:
            return f"pid {pid}"
        console = (state.get("mesh") or {}).get("console_port")
        return f"pid {pid}, API port {state.get('api_port')}" + (f", console port {console}" if console else "")


class HomeLock:
    """An exclusive flock on a lock file in the home. The OS drops it when the process ends, however it
    ends (kill -9 included), so a lock is never stale and nobody has to clean up after a crash. The file
    holds the holder's pid for refusal messages and is left in place: removing it could race a process
    that has just opened it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> "HomeLock":
        """Raises BlockingIOError when another open file (of any process) holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited: no child outlives us holding it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    @staticmethod
    def holder_pid(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def write_atomic(path: str | Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write a file atomically with `mode`: a crash leaves the old or the new content, never a torn file,
    and a private file is never briefly readable by others."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data.encode() if isinstance(data, str) else data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_private(path: str | Path, data: str | bytes) -> None:
    """A file only its owner can read (0600), written atomically (keys, secrets, wallets)."""
    write_atomic(path, data, 0o600)


def read_secret_file(path: str | Path) -> str:
    """Read a secret from a file, refusing files that others can read."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"secret file not found: {p}") from None
    if mode & 0o077:
        raise ValueError(f"secret file {p} is readable by others (mode {oct(mode & 0o777)}); run: chmod 600 {p}")
    value = p.read_text().strip()
    if not value:
        raise ValueError(f"secret file {p} is empty")
    return value
