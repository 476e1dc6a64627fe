#!/usr/bin/env bash
# Run here, with network, from anywhere in the checkout, before a device call: fetches into .whl/
# (git-ignored) the Python 3.12 x86-64 wheels the GPU machine lacks, at the versions this checkout's
# .venv runs. That machine has torch, transformers 5.17, numpy, httpx, accelerate, huggingface-hub,
# tokenizers, safetensors, prometheus-client and more, and no network (.library/device/KINDS.md).
# About 36 MB: PyAV (36 MB more) stays behind, since the server imports it only for containers
# libsndfile cannot read and the benches send WAV (tests/data/jfk.wav travels with the tree).
# Then: bench/gpu_check.sh (or bench/gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
  transformers mistral-common llguidance fastapi starlette uvicorn python-multipart opentelemetry-api
  pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
  pydantic-extra-types pycountry jsonschema jsonschema-specifications referencing rpds-py soundfile cffi
  pycparser soxr silero-vad websockets onnxruntime flatbuffers protobuf torchao bitsandbytes jiwer rapidfuzz
)
# pyproject's dependencies that are NOT fetched: the GPU image has them (bench/gpu_preflight.py checks their
# versions there), or the server does without them (av, above). tests/project/test_gpu_wheels.py holds that
# every dependency in pyproject.toml is in PACKAGES or here.
ON_IMAGE=(torch accelerate numpy prometheus-client av)
pins=()
for name in "${PACKAGES[@]}"; do
  pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl && mkdir -p .whl
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
du -sh .whl
