#!/usr/bin/env bash
# The prepared GPU check: run on a lent GPU machine (nvidia-h200: no network, python3 with torch 2.11+cu130)
# from the repo root, after `bash scripts/device-wheels.sh` here filled .whl/ (the project's missing
# dependencies as wheels, the bundled model's skeleton). Through the device tool:
#     run(command="bash benchmarks/device.sh", carry=[".whl"], timeout_s=600)
# Steps, each with its own time limit (480 s in all, the set-up included; a CPU rehearsal took 100 s):
#   set-up   the wheels into $SITE, the bundled model's random-weight copy (benchmarks/device_model.py: the real
#            94 MiB file cannot travel; speeds are the real model's, tokens are not), an import check
#   tests    pytest tests/engine -k "cuda or accel" with MESH402_TEST_DEVICE=$DEVICE (exit 5, no test
#            selected, counts as no tests, not as a failure)
#   engine   benchmarks/engine.py --device $DEVICE on the bundled model, then on the synthetic 1B Q4_K
#            (written there, ~0.6 GB; fast mode only, as its CPU figures in docs were taken)
#   split    benchmarks/split.py --device $DEVICE --quick --no-delay --no-wire (delay rows need netns privileges)
# A failed or timed-out step does not stop the next; the exit status is 1 when any failed. The log and every
# JSON result are copied flat into $OUT when it is set (the device tool brings back what is there, even after a
# kill). A CPU rehearsal, with a Python that has the packages already:
#     DEVICE=cpu WHEELS=0 PY=/path/to/python SITE=/tmp/rehearsal-site bash benchmarks/device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-1}
OUT=${OUT:-}
LOG=${OUT:+$OUT/device.log}
LOG=${LOG:-/tmp/mesh402-device.log}
TAG=$([ "$DEVICE" = cpu ] || echo "-${DEVICE/:/}")  # the results' names: engine-cuda-t1.json, split-cuda.json
RESULTS=(benchmarks/results/engine"$TAG"-t1.json benchmarks/results/engine"$TAG"-q4_k-t1.json
         benchmarks/results/split"$TAG".json)
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit; SIGINT first, so the benchmarks stop their nodes
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo
  echo "=== $name (limit ${limit}s): $*"
  timeout -s INT -k 15 "$limit" "$@"
  rc=$?
  if [ "$name" = tests ] && [ $rc -eq 5 ]; then
    echo "=== tests: none selected (pytest exit 5): counted as no tests, not a failure"
    rc=0
  fi
  [ $rc -eq 124 ] && echo "=== $name: timed out after ${limit}s"
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  [ $rc -eq 0 ] || failed+=("$name")
  collect
}

collect() {  # the JSON results so far, flat into $OUT (the log and these: at most 8 files come back)
  [ -n "$OUT" ] || return 0
  for f in "${RESULTS[@]}"; do
    if [ -f "$f" ]; then cp "$f" "$OUT/"; fi
  done
}

main() {
  echo "=== machine"
  date -u
  nvidia-smi || echo "(no nvidia-smi)"
  "$PY" -c "
import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '|', gpu)"
  echo "cores: $(nproc)"
  # a result copied back is this run's, never an earlier one's (a CPU rehearsal keeps the CPU's files)
  [ "$DEVICE" = cpu ] || rm -f "${RESULTS[@]}"

  if [ "$WHEELS" = 1 ]; then
    step wheels 40 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl
  fi
  # the carried packages, and this checkout for every process the benchmarks start (nothing here is pip-installed)
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  step model 30 "$PY" benchmarks/device_model.py install .whl/smollm2-skeleton "$SITE"
  step imports 40 "$PY" -c "
import importlib.metadata as md
import fastapi, gguf, httpx_sse, iroh, llguidance, mcp, nostr_sdk, uvicorn, web3, x402, zeroconf  # carried
import mesh402.cli.serve, mesh402.node.node, mesh402.engine  # the node's and the engine's own imports
from mesh402.models.catalog import bundled_model_path
print('bundled model:', bundled_model_path())
names = 'torch numpy tokenizers jinja2 httpx anyio rich typer psutil safetensors protobuf pydantic typing_extensions'
print(' '.join(f'{n} {md.version(n)}' for n in (names + ' pytest pytest-xdist pytest-timeout hypothesis').split()))
"
  export MESH402_TEST_DEVICE=$DEVICE  # the tests of fast mode's accelerator path run there (tests/support/engine.py)
  step tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/engine -k "cuda or accel"
  step engine 80 "$PY" benchmarks/engine.py --device "$DEVICE"
  step engine-1b 90 "$PY" benchmarks/engine.py --device "$DEVICE" --synthetic Q4_K --no-exact
  step split 140 "$PY" benchmarks/split.py --device "$DEVICE" --quick --no-delay --no-wire

  echo
  if [ ${#failed[@]} -eq 0 ]; then
    echo "=== device.sh: every step passed"
    return 0
  fi
  echo "=== device.sh: failed: ${failed[*]}"
  return 1
}

mkdir -p "$(dirname "$LOG")"
main 2>&1 | tee "$LOG"  # the whole log, written as it goes: a killed run still leaves it in $OUT
