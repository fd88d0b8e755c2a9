"""What `serve` and `client` check before a node announces itself anywhere (mesh, Nostr, LAN) or prints an
invite token: the home is a writable directory and this process's alone, its keys are valid and private,
the model files are readable and valid, and the ports it will bind are free. Each failure is a
StartupError of one line (the CLI prints it and exits 2), so a bad start leaves no trace on the mesh."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from mesh402.home import Home, HomeBusy, HomeLock, read_secret_file
from mesh402.mesh.identity import KEY_FILE, IdentityError, NodeIdentity
from mesh402.mesh.membership import SECRET_FILE
from mesh402.models.catalog import ModelNotFound, ModelSource, check_model_files
from mesh402.settings import NodeConfig

API_PORT_SEARCH = 50  # a discovered node on the default API port takes the next free one of these


class StartupError(Exception):
    """Why the node cannot start, in one line."""


def preflight(config: NodeConfig, sources: list[ModelSource], *, search_api_port: bool = False) -> HomeLock:
    """Run every start-up check; the home's lock, held for the node's life. With `search_api_port` a busy
    API port moves the node to the next free port (config.port is updated) instead of failing."""
    lock = claim_home(config.home)
    try:
        check_keys(config.home)
        for src in sources:
            check_model(src)
        config.port = free_api_port(config.host, config.port, search=search_api_port)
        check_mesh_ports(config)
    except BaseException:
        lock.release()
        raise
    return lock


def claim_home(path: Path) -> HomeLock:
    """The home as a writable directory, locked for this process (a second node on it is refused)."""
    home = Home(path)
    if path.exists() and not path.is_dir():
        raise StartupError(f"--home {path} is not a directory")
    try:
        home.ensure()
        with tempfile.TemporaryFile(dir=home.path):  # node.json, keys and ledgers are written here
            pass
        return home.lock()
    except HomeBusy as e:
        raise StartupError(f"{e}: stop it first, or give this node another --home") from None
    except OSError as e:
        raise StartupError(f"--home {path} is not a writable directory ({e.strerror or e})") from None


def check_keys(home: Path) -> None:
    """The node key and the mesh secret: private (0600) and readable; the node key valid (made if missing)."""

    try:
        for name in (KEY_FILE, SECRET_FILE):
            if (Path(home) / name).exists():
                read_secret_file(Path(home) / name)
        NodeIdentity.load_or_create(home)
    except (ValueError, IdentityError) as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(f"cannot read the node's keys in {home}: {e.strerror or e}") from None


def check_model(src: ModelSource) -> None:
    try:
        check_model_files(src)
    except ModelNotFound as e:
        raise StartupError(str(e)) from None


def free_api_port(host: str, port: int, *, search: bool = False) -> int:
    """`port` if it is free, else with `search` the next free one; else StartupError."""
    for p in range(port, port + (API_PORT_SEARCH if search else 1)):
        if port_busy(socket.SOCK_STREAM, host, p) is None:
            return p
    why = port_busy(socket.SOCK_STREAM, host, port)
    raise StartupError(f"API port {port} is busy ({why}); pick another with --port PORT")


def check_mesh_ports(config: NodeConfig) -> None:
    """The console port when it was asked for (a busy default falls back to any free one) and the mesh's
    QUIC port when one is given (0: any)."""
    s = config.mesh
    if s is None:
        return
    if s.console_port_explicit:
        host = "0.0.0.0" if s.console_listen_all else "127.0.0.1"
        why = port_busy(socket.SOCK_STREAM, host, s.console_port)
        if why:
            raise StartupError(f"console port {s.console_port} is busy ({why}); pick another with --console PORT")
    if s.bind_port:
        why = port_busy(socket.SOCK_DGRAM, s.bind_ip, s.bind_port)
        if why:
            raise StartupError(f"mesh port {s.bind_port}/udp on {s.bind_ip} is busy ({why}); "
                               "pick another with --bind-port PORT")


def port_busy(kind: socket.SocketKind, host: str, port: int) -> str | None:
    """Why `port` cannot be bound on `host` (None if it can). The probe binds as the servers will (TCP with
    SO_REUSEADDR, like uvicorn) and lets go at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None
