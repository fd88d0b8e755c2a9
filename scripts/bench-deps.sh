#!/usr/bin/env bash
# Extra packages the benchmarks compare against (llama-cpp-python builds llama.cpp: ~4 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import llama_cpp" 2>/dev/null || .venv/bin/python -m pip install -q llama-cpp-python==0.3.36
# its OpenAI-compatible server (harness/llama_server.py, the --backend scenario) also needs starlette-context
.venv/bin/python -c "import starlette_context" 2>/dev/null || .venv/bin/python -m pip install -q --no-deps starlette-context==0.5.1
# The grammar libraries benchmarks/grammar.py compares with llguidance. xgrammar without its declared
# dependencies: they include torch (pinned here) and triton (a 286 MB wheel a CPU build never uses);
# the rest (pydantic, numpy, transformers) is already installed by setup.sh --dev.
.venv/bin/python -c "import xgrammar" 2>/dev/null || .venv/bin/python -m pip install -q --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
.venv/bin/python -c "import outlines_core" 2>/dev/null || .venv/bin/python -m pip install -q outlines-core==0.2.14
