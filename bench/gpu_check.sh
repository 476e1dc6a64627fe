#!/usr/bin/env bash
# The server at real scale on one GPU (H100, H200, ...), in at most 9 minutes, as one device call:
#   here, once:  bash bench/gpu_wheels.sh            (the wheels the GPU machine lacks, into .whl/)
#   then:        run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
# Every result is a JSON line in $OUT/gpu_check.jsonl the moment it exists, so a timeout keeps what
# ran; each section has its own time limit (`timeout -k 10`), and one that fails or times out leaves an error
# line and the next one runs. Every section's stderr goes to $OUT/stderr.log, each part under an `== name ==`
# line ($OUT then holds 4 files: gpu_check.jsonl, stderr.log, nvidia-smi.txt, throughput.json). The call as a
# whole keeps to BUDGET_S (default 525 s, counted from the start): a section gets at most what is left (less the
# 10 s its kill may take), and one that would get less than its minimum is skipped with a
# {"section": ..., "skipped": ...} line. On one GPU a full run reaches checks, replay, mini and http: their
# limits (70 + 160 + 100 + 170 s, after ~30 s of wheels and preflight) leave http about 155 s when each
# earlier section runs to its limit; tp2 is skipped (one GPU), and realtime runs only when the sections before
# it finish well inside their limits (its own call: below). Sections, in order (bench/gpu_check.py says what
# each measures):
#   checks  env, parity, split (~1 min together: the tiny model on CUDA, and split over cuda:0 and the CPU)
#   replay  decode step: eager vs replayed (issue 26; ~2.5 min, its parts past its own budget skipped with a
#           line each): Voxtral Mini's shapes, random bf16 weights
#           built in memory, 128 slots x 1,024 positions; the step at batch 1, 8, 32, 128 eager, then after
#           capture (its time, graph memory), against the weight-read floor; greedy tokens replayed == eager;
#           the steady step under torch.cuda.set_sync_debug_mode
#   mini    the same model: the sampler, prefill of 32 x 30 s and of one 30-minute row, then the decode step
#           per weight format (none, int8, fp8: torchao in place, taking turns; issue 30) (~2 min: a run cut at
#           its 100 s keeps the lines it wrote)
#   http    the Mini-shaped checkpoint saved, served, and loaded at concurrency 32 with 64 transcriptions and
#           64 default-sampling chats: req/s, audio-s/s (RTFx), p50/p99 (~2.5 min with the build), each run a
#           line as it ends; when it fails or times out, the last 60 lines of its servers' logs follow in
#           stderr.log (and on the call's stderr)
#   tp2     only on a machine with 2 GPUs or more (else a skipped line): --tensor-parallel-size 2 (NCCL) against
#           one GPU, per-token decode time taking turns (bench/tensor_parallel.py), on the Mini-shaped
#           checkpoint the http section built (else the tiny model) (~2 min)
#   realtime  Voxtral-Mini-4B-Realtime-2602's shapes, random bf16 weights (issue 28; ~1.5 min,
#           bench/realtime_ticks.py): the realtime engine's tick at 1, 32 and 128 streams against the 80 ms
#           a token that real time allows; last, so a full run seldom reaches it: issue 28's call is
#           `bash bench/gpu_check.sh checks realtime`
#   paged   issue 27's unmet point: a decode step's attention read through a per-row block table (FlexAttention,
#           compiled), rows sharing a prefix's blocks, against today's SDPA over contiguous slots, at Mini's
#           head shapes: parity, compile time, ms a call, captured in a CUDA graph and replayed
#           (bench/paged_read.py; ~1 min); after realtime: its own call is `bash bench/gpu_check.sh checks paged`
# `bash bench/gpu_check.sh replay` (any of the names above, in any order) runs only those.
# It stops at once, with one line saying why, when .whl/ is missing (exit 2) or when there is no CUDA device
# (exit 4). A version on the machine that conflicts with pyproject.toml or with the wheels' own requirements
# (bench/gpu_preflight.py; the image's numpy 2.5.2 against pyproject's <2.5 and mistral-common's <2.4, say)
# is logged (the preflight line in gpu_check.jsonl, one stderr line each) and the run goes on: every section
# contains its own failures. `--dry-run` (for a CPU machine; first) goes on past each stop as far as it can:
# the checks above, then every section's smoke test on the CPU (gpu_check.py --device cpu --small, the replay
# section's code included; bench/realtime_ticks.py at tiny shapes), and says where a real run would have
# stopped.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1 && shift
WANT=" ${*:-checks replay mini http tp2 realtime paged} "
BUDGET_S=${BUDGET_S:-525}
OUT=${OUT:-/tmp/voxtral-gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.jsonl"
ERR="$OUT/stderr.log"
GRACE=10  # seconds `timeout -k` gives a section between its TERM and its KILL
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 LOG
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
  || echo "gpu_check: version conflicts (see $LOG); going on" >&2
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || stop 4 "no CUDA device (torch.cuda.is_available() is false)"
if [ $DRY -eq 1 ]; then
  timeout -k $GRACE 420 python3 bench/gpu_check.py env parity split replay mini --device cpu --small --out "$LOG"
  timeout -k $GRACE 180 python3 bench/realtime_ticks.py --shapes tiny --device cpu --sessions 1,4 --ticks 3 \
    --out "$LOG"
  timeout -k $GRACE 120 python3 bench/paged_read.py --device cpu --small --out "$LOG"
  echo "dry run done in $SECONDS s; a real run would have stopped at the first of: $(IFS=";"; echo "${STOPS[*]:-nothing}")"
  exit 0
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
tag() {  # tag NAME: stdin's JSON lines into $LOG as they come, "section": NAME first; other lines to stderr
  local line
  while IFS= read -r line; do
    case "$line" in
      "{"*) echo "{\"section\": \"$1\", ${line#\{}" >>"$LOG" ;;
      *) echo "$line" >&2 ;;
    esac
  done
}
export -f tag
section() {  # section NAME SECONDS MINIMUM COMMAND...: run it under a limit, at most what the call has left;
  local name=$1 limit=$2 least=$3  # skip it, saying so, when that is under MINIMUM; log a failure, return its status
  shift 3
  case "$WANT" in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET_S - SECONDS - GRACE))
  [ $left -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "$least" ]; then
    echo "gpu_check: $name skipped: ${left} s of the call's ${BUDGET_S} s left, it needs ${least}" >&2
    echo "{\"section\": \"$name\", \"skipped\": \"${left} s of the call's ${BUDGET_S} s left\"}" >>"$LOG"
    return 0
  fi
  local started=$SECONDS
  echo "== $name ==" >>"$ERR"
  # timeout runs the command in a process group of its own (its pid's): once it ends, whatever is left in that
  # group (a server still in its graceful shutdown after a timeout, holding GPU memory) is killed
  LIMIT=$limit timeout -k $GRACE "$limit" "$@" 2>>"$ERR" &
  local pid=$!
  wait $pid
  local rc=$?
  kill -KILL -- -$pid 2>/dev/null
  [ $rc -eq 0 ] || echo "{\"section\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - started))}" >>"$LOG"
  return $rc
}
section checks 70 40 python3 bench/gpu_check.py env parity split --out "$LOG"
# its own budget ends it (with a line for each part skipped) before the limit kills it
section replay 160 90 bash -c 'python3 bench/gpu_check.py replay --budget-s $((LIMIT - 20)) --out "$0"' "$LOG"
section mini 100 50 python3 bench/gpu_check.py mini --out "$LOG"
MODEL=/tmp/voxtral-mini-random
HTTP_TMP=/tmp/voxtral-gpu-check-http  # throughput.py's work folder (mkdtemp), its servers' logs in it, lands here
rm -rf "$HTTP_TMP" && mkdir -p "$HTTP_TMP"
# The tail is read here, not inside the command: a timeout kills the command's whole process group.
section http 170 120 bash -c '
  set -o pipefail
  timeout 90 python3 bench/random_mini.py "$1" --device cuda >&2 || exit 1
  TMPDIR=$2 python3 bench/throughput.py --model-dir "$1" --device cuda --audio tests/data/jfk.wav \
    --n 64 --concurrency 32 --rounds 1 --workloads transcription,chat_default --max-batch-tokens 32768 \
    --skip-single --skip-ceiling --skip-peer --out "$0" | tag http' "$OUT/throughput.json" "$MODEL" "$HTTP_TMP" \
  || { echo "gpu_check: http failed; the last 60 lines of its servers' logs:"
       tail -n 60 "$HTTP_TMP"/voxtral-bench-*/*.log 2>&1; } | tee -a "$ERR" >&2
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -ge 2 ]; then
  section tp2 150 90 bash -c '
    model=tiny; [ -f "$0/config.json" ] && model=$0
    set -o pipefail
    python3 bench/tensor_parallel.py --model "$model" --device cuda --rounds 3 | tag tp2
  ' "$MODEL"
else
  case "$WANT" in *" tp2 "*) echo "{\"section\": \"tp2\", \"skipped\": \"$GPUS GPU(s): needs 2\"}" >>"$LOG" ;; esac
fi
section realtime 150 70 python3 bench/realtime_ticks.py --shapes mini --device cuda --sessions 1,32,128 --out "$LOG"
section paged 120 60 python3 bench/paged_read.py --device cuda --rows 1,8,32,128 --out "$LOG"
echo "done in $SECONDS s; $(wc -l <"$LOG") lines in $LOG"
