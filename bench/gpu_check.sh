#!/usr/bin/env bash
# The server at real scale on one H200, in at most 8 minutes, as one device call:
#   here, once:  bash bench/gpu_wheels.sh            (the wheels the GPU machine lacks, into .whl/)
#   then:        run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Every result is a JSON line in $OUT/gpu_check.jsonl the moment it exists, so a timeout keeps what
# ran; each section has its own time limit, and one that fails or times out leaves an error line and
# the next one runs. Sections, in order (bench/gpu_check.py says what each measures):
#   env, parity, split (~1 min together: the tiny model on CUDA, and split over cuda:0 and the CPU)
#   mini (~2 min: Voxtral Mini's shapes, random bf16 weights built in memory: decode steps at batch
#         1-128, the sampler, prefill of 32 x 30 s and of one 30-minute row)
#   http (~3 min: the Mini-shaped checkpoint saved, served, and loaded at concurrency 32 with
#         transcription and default-sampling chat: req/s, audio-s/s (RTFx), p50/p99)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/voxtral-gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.jsonl"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
section() {  # section NAME SECONDS COMMAND...: run it under a limit; say so in the log if it failed
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" 2>>"$OUT/$name.err"
  local rc=$?
  [ $rc -eq 0 ] || echo "{\"section\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - started))}" >>"$LOG"
}
section checks 80 python3 bench/gpu_check.py env parity split --out "$LOG"
section mini 130 python3 bench/gpu_check.py mini --out "$LOG"
MODEL=/tmp/voxtral-mini-random
section build 90 python3 bench/random_mini.py "$MODEL" --device cuda
section http 160 python3 bench/throughput.py --model-dir "$MODEL" --device cuda --audio tests/data/jfk.wav \
  --n 128 --concurrency 32 --rounds 1 --workloads transcription,chat_default --max-batch-tokens 32768 \
  --skip-single --skip-ceiling --skip-peer --out "$OUT/throughput.json"
[ -f "$OUT/throughput.json" ] && python3 - "$OUT/throughput.json" >>"$LOG" <<'PY'
import json, sys
for run in json.load(open(sys.argv[1])):
    print(json.dumps({"section": "http", **run}))
PY
echo "done in $SECONDS s; $(wc -l <"$LOG") lines in $LOG"
