#!/usr/bin/env bash
# The engine issue's GPU benchmark, as one device call (run bench/gpu_wheels.sh here first):
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
# Installs the carried wheels beside the machine's own torch, builds a random Voxtral with
# Voxtral-Mini-3B-2507's dimensions on the GPU in bfloat16, then runs bench/throughput.py against it:
# (a) batching, (b) batch size 1, (c) static model.generate batches, over HTTP on the same GPU.
# Figures land in $OUT (throughput.log, throughput.json, build.log, nvidia-smi.txt).
# Sized for the 15-minute device budget: machine start ~2 min, wheels and build ~2 min, server loads
# ~1 min, the runs below a few minutes ((b) decodes one request at a time: 64 requests at 1 and 32).
# STATIC=1 adds (e), static batching, and the chat_varied workload (answers of 8-120 tokens): what
# continuous batching is worth on the GPU; it adds a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/voxtral-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
MODEL=/tmp/voxtral-mini-random
[ -f "$MODEL/model.safetensors.index.json" ] || [ -f "$MODEL/model.safetensors" ] \
  || python3 bench/random_mini.py "$MODEL" --device cuda 2>&1 | tee "$OUT/build.log"
python3 bench/throughput.py --model-dir "$MODEL" --device cuda --audio tests/data/jfk.wav \
  --n "${N:-64}" --concurrency "${LEVELS:-1,32}" --rounds 1 \
  --workloads "transcription${STATIC:+,chat_varied}" ${STATIC:+--static} \
  --max-batch-tokens 32768 --skip-peer --out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
