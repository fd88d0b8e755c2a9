#!/usr/bin/env bash
# Fill .whl/ with what a lent GPU machine (nvidia-h200: Python 3.12, torch 2.11+cu130, no network) needs to run
# benchmarks/device.sh, and keep .whl/ out of git (.git/info/exclude):
# - wheels of the project's runtime dependencies (pyproject.toml, all but torch: that machine's own torch is
#   used) and their dependencies that its image lacks, plus httpx-sse (the benchmarks read streams with it),
#   each for CPython 3.12 on manylinux x86-64, one version of each: the versions installed in .venv where it
#   has them (what the suite here ran with), else the newest that fits;
# - the bundled model's header and tensor table (benchmarks/device_model.py): the 94 MiB model cannot travel.
# Run here, where PyPI is reachable:  bash scripts/device-wheels.sh
# Then on the GPU machine (the device tool's run, carrying .whl):  bash benchmarks/device.sh
# Everything that travels (the tracked and untracked-not-ignored files, and .whl) must stay under 64 MiB: the
# script fails when it would not.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=64

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

# The packages the GPU image already has (/work/.library/device/KINDS.md, "Python packages already there",
# read on a machine running it on 2026-11-17). Those are not carried, except protobuf: mesh402/mesh/proto's
# generated code needs a runtime at least as new as the protoc that generated it (pyproject pins >= 7.36).
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
wheel wrapt xarray xxhash yarl zipp"
CARRY_ANYWAY="protobuf"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" - "$work/reqs.txt" <<'PYEOF'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
# torch is the GPU machine's own (2.11 + CUDA); pip must not fetch the pinned CPU-less 2.13 nor its CUDA wheels
keep = [d for d in deps if not d.replace(" ", "").lower().startswith("torch")]
open(sys.argv[1], "w").write("\n".join(keep + ["httpx-sse>=0.4"]) + "\n")
PYEOF
# .venv's versions as constraints: the GPU machine runs what the suite here ran (torch and local builds left out)
"$PY" -m pip freeze --exclude-editable 2>/dev/null | grep -v -i -E '^(torch|llama[-_]cpp)|@ ' \
  >"$work/constraints.txt" || true

platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms="$platforms --platform $p"
done
echo "resolving the runtime dependencies for CPython 3.12 on manylinux x86-64 ..."
# shellcheck disable=SC2086  # $platforms is a list of flags
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms -c "$work/constraints.txt" -r "$work/reqs.txt" -d "$work/all" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: only this resolution's wheels
carried=0
skipped=""
for whl in "$work"/all/*.whl; do
  file=$(basename "$whl")
  name=$(echo "${file%%-*}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g')
  if [[ " $IMAGE " =~ [[:space:]]$name[[:space:]] ]] && [[ ! " $CARRY_ANYWAY " =~ [[:space:]]$name[[:space:]] ]]; then
    skipped="$skipped $name"
    continue
  fi
  cp "$whl" "$DEST/"
  carried=$((carried + 1))
done
if ls "$work"/all | grep -v '\.whl$' >/dev/null 2>&1; then
  echo "not a wheel (the GPU machine cannot build it):" && ls "$work"/all | grep -v '\.whl$' && exit 1
fi
echo "carried: $carried wheels; left to the image:$skipped"

rm -rf "$DEST/smollm2-skeleton"
"$PY" benchmarks/device_model.py skeleton "$DEST/smollm2-skeleton"

# What the device tool sends: tracked and untracked-not-ignored files, plus the carried .whl
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
whl=$(find "$DEST" -type f -exec stat -c %s {} + | awk '{s += $1} END {print s + 0}')
awk -v t="$tree" -v w="$whl" -v lim="$LIMIT_MIB" 'BEGIN {
  printf ".whl: %.1f MiB; working tree: %.1f MiB; together %.1f MiB of the %d MiB a device run may carry\n",
         w / 2^20, t / 2^20, (t + w) / 2^20, lim
  exit (t + w > lim * 2^20) }' || { echo "over the limit: carry less" >&2; exit 1; }
