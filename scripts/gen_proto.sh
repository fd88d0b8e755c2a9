#!/usr/bin/env bash
# Regenerate mesh402/mesh/proto/mesh_pb2.py and .pyi with grpcio-tools' bundled protoc.
# The generated files are committed; only `protobuf` is needed at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. mesh402/mesh/proto/mesh.proto
echo "generated mesh402/mesh/proto/mesh_pb2.py{,i}"
