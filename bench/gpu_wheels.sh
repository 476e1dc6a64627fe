#!/usr/bin/env bash
# Run here, with network, from anywhere in the checkout, before a device call: fetches into .whl/
# (git-ignored) the Python 3.12 x86-64 wheels the GPU machine lacks, at the versions this checkout's
# .venv runs ($PYTHON, default .venv/bin/python, answers which). That machine has torch, transformers 5.17,
# numpy, httpx, accelerate, huggingface-hub, tokenizers, safetensors, prometheus-client, onnxruntime, click
# and more, and no network (.library/device/KINDS.md). About 41 MB; only what a gpu_check.sh section imports
# travels, since the device call carries at most 64 MiB with the tracked tree: PyAV (36 MB) stays behind, since
# the server imports it only for containers libsndfile cannot read and the benches send WAV (tests/data/jfk.wav
# travels with the tree); bitsandbytes (43 MB; only `--quantization bitsandbytes`, which no section loads) and
# jiwer (with rapidfuzz and click; only `voxtral-server eval`) too. onnxruntime is the image's (1.30.0): the
# server imports it only for a realtime session's semantic_vad or noise_reduction, which no section opens.
# It ends by failing, saying by how much, when the tracked tree and .whl/ together pass 62 MiB.
# Then: bench/gpu_check.sh (or bench/gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
  transformers mistral-common llguidance fastapi starlette uvicorn python-multipart opentelemetry-api
  pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
  pydantic-extra-types pycountry jsonschema jsonschema-specifications referencing rpds-py soundfile cffi
  pycparser soxr silero-vad websockets torchao typing-extensions
)
# pyproject's dependencies that are NOT fetched: ON_IMAGE, the GPU image has them (bench/gpu_preflight.py checks
# their versions there); LEFT_OUT, no section imports them (above; gpu_preflight.py's NOT_NEEDED, so their pins
# are not counted as problems). tests/project/test_gpu_wheels.py holds that every dependency in pyproject.toml is
# in exactly one of PACKAGES, ON_IMAGE and LEFT_OUT, and that LEFT_OUT is NOT_NEEDED.
ON_IMAGE=(torch accelerate numpy prometheus-client onnxruntime)
LEFT_OUT=(av bitsandbytes jiwer)
PYTHON=${PYTHON:-.venv/bin/python}
pins=()
for name in "${PACKAGES[@]}"; do
  pins+=("$name==$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl && mkdir -p .whl
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
# silero-vad's wheel without its seven ONNX and safetensors exports (9 of its 11 MB): app/vad.py loads only the
# TorchScript network (load_silero_vad(onnx=False): silero_vad/data/silero_vad.jit). Its RECORD loses their lines,
# so the wheel stays consistent; pip installs it as any other.
python3 - .whl/silero_vad-*.whl <<'PY'
import sys, zipfile
from pathlib import Path

path = Path(sys.argv[1])
dropped = lambda name: name.startswith("silero_vad/data/") and name.endswith((".onnx", ".safetensors"))
with zipfile.ZipFile(path) as wheel:
    members = {info: wheel.read(info) for info in wheel.infolist() if not dropped(info.filename)}
trimmed = path.with_suffix(".trimmed")
with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
    for info, data in members.items():
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(True) if not dropped(line.decode().split(",")[0]))
        out.writestr(info, data)
trimmed.replace(path)
PY
# What the device call carries: tracked and untracked-not-ignored files (what git would add), and .whl/.
LIMIT=$((62 * 1024 * 1024))
tree=$(git ls-files -z --cached --others --exclude-standard \
  | { du -cb --files0-from=- 2>/dev/null || true; } | tail -1 | cut -f1)
wheels=$(du -sb .whl | cut -f1)
total=$((tree + wheels))
echo "gpu_wheels: .whl/ $((wheels / 1024)) KiB + tree $((tree / 1024)) KiB = $((total / 1024)) KiB of 62 MiB"
if [ $total -gt $LIMIT ]; then
  echo "gpu_wheels: $(((total - LIMIT) / 1024 + 1)) KiB over 62 MiB (a device call carries 64 MiB at most)" >&2
  exit 1
fi
