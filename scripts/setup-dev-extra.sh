#!/usr/bin/env bash
# Extra dev setup for payments: the pinned npm toolchain (solc, OpenZeppelin, anvil) and the
# contracts compiled from contracts/*.sol. Idempotent; a no-op in about a second when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=${PYTHON:-python3}
if ! command -v npm >/dev/null 2>&1; then
  echo "setup-dev-extra: npm not found; install Node.js 18+ (with npm) for the payment tests" >&2
  exit 1
fi
"$PY" - <<'PYEOF'
from mesh402.economics.toolchain import ensure_tools, tools_ready
from mesh402.economics.contracts import compile_contracts
if not tools_ready():
    print("installing the contract toolchain from package-lock.json (npm ci)")
ensure_tools(quiet=True)
arts = compile_contracts()
print("contracts ready:", ", ".join(sorted(arts)))
PYEOF
