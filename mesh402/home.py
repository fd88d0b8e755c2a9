"""The node's home directory: keys, secrets (0600), and the record of a running node's ports."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_HOME = Path.home() / ".mesh402"
STATE_FILE = "node.json"


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
        tmp = self.file(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.file(STATE_FILE))

    def read_state(self) -> dict[str, Any] | None:
        path = self.file(STATE_FILE)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def clear_state(self) -> None:
        self.file(STATE_FILE).unlink(missing_ok=True)


def write_private(path: str | Path, data: str | bytes) -> None:
    """Write a file readable only by its owner (0600), atomically: it is never briefly world-readable
    and a crash leaves the old or the new content, not a torn file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data.encode() if isinstance(data, str) else data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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
