#!/usr/bin/env bash
# Extra dev setup: the pinned npm packages (solc, OpenZeppelin, anvil for payments; axe-core for the
# console's accessibility tests), the contracts compiled from contracts/*.sol, and the headless browser
# of the console tests (scripts/setup-browser.sh). Idempotent; a no-op in about a second when already done.
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
bash scripts/setup-browser.sh
