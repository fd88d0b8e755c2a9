"""The npm-installed contract toolchain: solcjs (compiler), OpenZeppelin (sources), anvil (local chain).

Versions are pinned in the repository's package.json / package-lock.json. `ensure_tools()` installs them
with `npm ci` on first use and is a quick no-op afterwards.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTRACTS_DIR = REPO / "contracts"
NODE_MODULES = REPO / "node_modules"
CACHE_DIR = REPO / ".cache" / "contracts"


class ToolchainError(RuntimeError):
    pass


def _anvil_package() -> str:
    system = {"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}.get(platform.system(), "linux")
    machine = platform.machine().lower()
    arch = "arm64" if machine in ("arm64", "aarch64") else "amd64"
    return f"@foundry-rs/anvil-{system}-{arch}"


def anvil_binary() -> Path:
    """The native anvil binary shipped in the platform's optional npm package (no node wrapper)."""
    name = "anvil.exe" if platform.system() == "Windows" else "anvil"
    return NODE_MODULES / _anvil_package() / "bin" / name


def _installed_version(pkg: str) -> str | None:
    try:
        return json.loads((NODE_MODULES / pkg / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def _wanted() -> dict[str, str]:
    data = json.loads((REPO / "package.json").read_text())
    return {**data.get("dependencies", {}), **data.get("devDependencies", {})}


def tools_ready() -> bool:
    try:
        wanted = _wanted()
    except (OSError, ValueError):
        return False
    if any(_installed_version(pkg) != ver for pkg, ver in wanted.items()):
        return False
    return anvil_binary().exists()


def ensure_tools(*, quiet: bool = False) -> None:
    """Install the pinned npm packages if any is missing or at another version."""
    if tools_ready():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise ToolchainError(
            "npm is not installed; it is needed once to fetch the contract toolchain (solc, anvil).\n"
            "Install Node.js 18+ (which includes npm), then run: bash scripts/setup-dev-extra.sh")
    cmd = [npm, "ci" if (REPO / "package-lock.json").exists() else "install", "--no-audit", "--no-fund"]
    if quiet:
        cmd.append("--silent")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=quiet, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"{' '.join(cmd)} failed:\n{(proc.stderr or '')[-2000:]}")
    binary = anvil_binary()
    if binary.exists() and not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    if not tools_ready():
        raise ToolchainError(f"npm finished but the toolchain is incomplete (anvil expected at {binary})")


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise ToolchainError("node is not installed; install Node.js 18+ to compile the contracts")
    return node
