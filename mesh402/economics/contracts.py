"""Compile contracts/*.sol with solcjs (from npm) and cache the artifacts by source hash.

Nothing committed is trusted as bytecode: every artifact comes from the sources in this repository, the
pinned OpenZeppelin sources they import and the pinned compiler. The cache lives in .cache/contracts
(gitignored), keyed by a hash over all of those.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

from mesh402.economics.toolchain import (
    CACHE_DIR,
    CONTRACTS_DIR,
    NODE_MODULES,
    ToolchainError,
    ensure_tools,
    node_binary,
)
from mesh402.home import write_atomic

SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    "viaIR": True,
    "evmVersion": "cancun",
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}

# Reads a standard-JSON input on stdin, resolves imports from the repo and node_modules, prints the output.
_COMPILE_JS = r"""
const fs = require('fs'), path = require('path');
const solc = require(process.argv[1]);
const roots = process.argv.slice(2);
const input = fs.readFileSync(0, 'utf8');
function findImports(p) {
  for (const r of roots) {
    const f = path.join(r, p);
    if (fs.existsSync(f)) return { contents: fs.readFileSync(f, 'utf8') };
  }
  return { error: 'not found: ' + p };
}
process.stdout.write(solc.compile(input, { import: findImports }));
"""

_IMPORT_RE = re.compile(r'^\s*import\s+(?:[^"\']*from\s+)?["\']([^"\']+)["\']', re.M)


@dataclass
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str  # creation code, 0x-prefixed
    runtime: str  # deployed code, 0x-prefixed


def _sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(CONTRACTS_DIR.glob("*.sol"))}


def _import_closure(sources: dict[str, str]) -> dict[str, str]:
    """Every imported file's text, so the cache key changes if a dependency does."""
    seen: dict[str, str] = {}
    todo = [(name, text) for name, text in sources.items()]
    while todo:
        name, text = todo.pop()
        for imp in _IMPORT_RE.findall(text):
            key = os.path.normpath(os.path.join(os.path.dirname(name), imp)) if imp.startswith(".") else imp
            if key in seen or key in sources:
                continue
            path = NODE_MODULES / key
            if not path.exists():
                raise ToolchainError(f"{name} imports {imp}, which is not in node_modules (run npm ci)")
            seen[key] = path.read_text()
            todo.append((key, seen[key]))
    return seen


def _solc_version() -> str:
    return json.loads((NODE_MODULES / "solc" / "package.json").read_text())["version"]


def compile_contracts(*, force: bool = False) -> dict[str, Artifact]:
    """All contracts in contracts/*.sol, by contract name; compiled once per source change."""
    ensure_tools(quiet=True)
    sources = _sources()
    if not sources:
        raise ToolchainError(f"no .sol files in {CONTRACTS_DIR}")
    deps = _import_closure(sources)
    h = hashlib.sha256()
    h.update(_solc_version().encode())
    h.update(json.dumps(SETTINGS, sort_keys=True).encode())
    for name, text in sorted({**sources, **deps}.items()):
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    key = h.hexdigest()[:24]
    cached = CACHE_DIR / f"{key}.json"
    if cached.exists() and not force:
        raw = json.loads(cached.read_text())
    else:
        raw = _run_solc(sources)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, json.dumps(raw))
    return {name: Artifact(name, a["abi"], a["bytecode"], a["runtime"]) for name, a in raw.items()}


def _run_solc(sources: dict[str, str]) -> dict[str, dict[str, Any]]:
    std_in = {"language": "Solidity", "sources": {n: {"content": t} for n, t in sources.items()},
              "settings": SETTINGS}
    proc = subprocess.run(
        [node_binary(), "-e", _COMPILE_JS, str(NODE_MODULES / "solc"), str(CONTRACTS_DIR), str(NODE_MODULES)],
        input=json.dumps(std_in), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise ToolchainError(f"solcjs failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    errors = [e for e in out.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise ToolchainError("contract compilation failed:\n" + "\n".join(e["formattedMessage"] for e in errors))
    result: dict[str, dict[str, Any]] = {}
    for fname in sources:
        for cname, c in out.get("contracts", {}).get(fname, {}).items():
            result[cname] = {"abi": c["abi"], "bytecode": "0x" + c["evm"]["bytecode"]["object"],
                             "runtime": "0x" + c["evm"]["deployedBytecode"]["object"]}
    return result
