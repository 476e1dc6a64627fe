#!/usr/bin/env bash
# The server at real scale on one GPU (H100, H200, ...), in at most 8 minutes, as one device call:
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
# It stops at once, with one line saying why, when .whl/ is missing (exit 2), when a version on the machine
# conflicts with pyproject.toml or with the wheels' own requirements (exit 3, bench/gpu_preflight.py), or when
# there is no CUDA device (exit 4). `--dry-run` (for a CPU machine) goes on past each of these as far as it
# can: the checks above, then every section's smoke test on the CPU (gpu_check.py --device cpu --small), and
# says where a real run would have stopped.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/voxtral-gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.jsonl"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STOPS=()
stop() {  # stop CODE MESSAGE: a real run ends here; a dry run notes it and goes on
  echo "gpu_check: $2" >&2
  echo "{\"section\": \"stop\", \"exit\": $1, \"why\": \"$2\"}" >>"$LOG"
  [ $DRY -eq 1 ] || exit "$1"
  STOPS+=("$2")
}
SITE=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || stop 2 "the wheels in .whl/ did not install"
  export PYTHONPATH=$SITE:$PWD
else
  stop 2 "no wheels in .whl/: run 'bash bench/gpu_wheels.sh' on a machine with network, then carry .whl"
  export PYTHONPATH=$PWD
fi
python3 bench/gpu_preflight.py --site "$SITE" --out "$LOG" >/dev/null \
  || stop 3 "versions on this machine conflict with what the server needs (the lines above; $LOG)"
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || stop 4 "no CUDA device (torch.cuda.is_available() is false)"
if [ $DRY -eq 1 ]; then
  timeout 300 python3 bench/gpu_check.py env parity split mini --device cpu --small --out "$LOG"
  echo "dry run done in $SECONDS s; a real run would have stopped at the first of: $(IFS=";"; echo "${STOPS[*]:-nothing}")"
  exit 0
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
