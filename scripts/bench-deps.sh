#!/usr/bin/env bash
# Extra packages the benchmarks compare against (llama-cpp-python builds llama.cpp: ~4 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import llama_cpp" 2>/dev/null || .venv/bin/python -m pip install -q llama-cpp-python==0.3.36
