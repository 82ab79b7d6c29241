#!/usr/bin/env bash
# What needs a GPU to measure, in about 8 minutes on one GPU, with a summary printed last:
#   env              the GPU, the Python and package versions, the project's imports
#   train            a training step, ours vs the release's (bench_vs_reference.py step; batch 40 x 512, bf16)
#   decode_eager     streaming generation, full-size model, one stream (bench_generate.py)
#   decode_compiled  the same with the decode steps compiled as CUDA graphs
#   resume           a torchrun (NCCL) run of train.py killed and resumed (check_resume.py)
#   train_compiled   the training step with --compile
#   conformance      the conformance generate cases through the compiled steps (bench_generate.py --conformance)
#
#   bash benchmarks/gpu_check.sh [REFERENCE]
#
# REFERENCE (or $MINIMIND_O_REFERENCE): a checkout of jingyaogong/minimind-o; without one no training stages.
# From the environment: MINIMIND_TOKENIZER (default models/minimind-3o); GPU_CHECK_FIXTURE, a conformance
# fixture (generate cases with their expected outputs; without one that stage is skipped); GPU_CHECK_STAGES,
# the stages besides env (default all); GPU_CHECK_DEVICE=cpu, a dry run on a CPU (tiny shapes: every stage's commands,
# not its numbers); OUT, where gpu_check.log and summary.txt go (default out/gpu_check). A stage that fails or
# runs past its limit (LIMITS) is recorded and the next one runs. A GPU machine without network:
# docs/performance.md says how to bring the packages along.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
REFERENCE=${1:-${MINIMIND_O_REFERENCE:-}}
TOKENIZER=${MINIMIND_TOKENIZER:-models/minimind-3o}
FIXTURE=${GPU_CHECK_FIXTURE:-}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STAGES=${GPU_CHECK_STAGES:-train decode_eager decode_compiled resume train_compiled conformance}
OUT=${OUT:-out/gpu_check}
WORK=$(mktemp -d)   # each stage's output and results, until the summary is written
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"

if [ "$DEVICE" = cuda ]; then
  BATCH=40 SEQ=512 DTYPE=bfloat16 BACKEND=inductor REPEATS=3
  DECODE=(--dtype bfloat16 --steps 200 --text_steps 48)
  TRAIN=(--steps 10 --warmup 2) TRAIN_ENV=()
  LIMITS=(env=60 train=120 decode_eager=60 decode_compiled=150 resume=120 train_compiled=200 conformance=120)
else                   # the dry run: tiny shapes; compiling only traced (aot_eager) or switched off
  BATCH=2 SEQ=256 DTYPE=float32 BACKEND=aot_eager REPEATS=1
  DECODE=(--steps 12 --text_steps 2 --prompt_tokens 8 --threads 2)
  TRAIN=(--steps 1 --warmup 1 --hidden_size 64 --num_hidden_layers 2)
  TRAIN_ENV=(TORCH_COMPILE_DISABLE=1)   # checks --compile's command line, not inductor's training compile
  LIMITS=(env=60 train=200 decode_eager=150 decode_compiled=200 resume=200 train_compiled=200 conformance=400)
fi
COMPILE_LOGS=recompiles,graph_breaks,perf_hints   # perf_hints: why a graph would not run as a CUDA graph

limit_of() { local kv; for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }
record() { echo "$(printf '%-16s' "$1") $2" >> "$WORK/stages.txt"; }

# stage NAME COMMAND...: runs a stage within its limit, its output into the log and $WORK/NAME.out, its
# outcome into $WORK/stages.txt; unless it is wanted and what it needs is there, it records why not.
stage() {
  local name=$1 limit began=$SECONDS status=ok
  shift
  [[ " $STAGES " == *" $name "* || $name = env ]] || return
  case $name in
    train*) [ -n "$REFERENCE" ] || { record "$name" "skipped: no reference checkout (an argument or MINIMIND_O_REFERENCE)"; return; } ;;
    conformance) [ -f "$FIXTURE" ] || { record "$name" "skipped: no fixture (set GPU_CHECK_FIXTURE)"; return; } ;;
  esac
  limit=$(limit_of "$name")
  echo "== $name (limit $limit s)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.out" >> "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && status="failed (exit $rc)"
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status="timed out after $limit s"
  record "$name" "$status in $(( SECONDS - began )) s"
  echo "== $name: $status" | tee -a "$LOG"
}

START=$SECONDS
TRAINING=(env "${TRAIN_ENV[@]}" python3 benchmarks/bench_vs_reference.py step --reference "$REFERENCE"
  --tokenizer "$TOKENIZER" --device "$DEVICE" --batch_size "$BATCH" --max_seq_len "$SEQ" --dtype "$DTYPE" "${TRAIN[@]}")
GENERATE=(env TORCH_LOGS=$COMPILE_LOGS python3 benchmarks/bench_generate.py --device "$DEVICE" --repeats "$REPEATS"
  --compile_backend "$BACKEND")
stage env python3 - "$DEVICE" <<'EOF'
import platform, subprocess, sys
import numpy, pyarrow, torch, transformers, moshi, minimind_o, train, chat  # a missing one fails here
if sys.argv[1] == "cuda":
    subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], check=True)
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, numpy "
      f"{numpy.__version__}, pyarrow {pyarrow.__version__}, transformers {transformers.__version__}")
EOF
stage train "${TRAINING[@]}"
stage decode_eager "${GENERATE[@]}" "${DECODE[@]}" --json "$WORK/decode_eager.jsonl"
stage decode_compiled "${GENERATE[@]}" "${DECODE[@]}" --compile --json "$WORK/decode_compiled.jsonl"
stage resume env OMP_NUM_THREADS=1 python3 benchmarks/check_resume.py --device "$DEVICE" --tokenizer "$TOKENIZER" \
  --timeout "$(( $(limit_of resume) / 3 ))" --json "$WORK/resume.jsonl"
stage train_compiled "${TRAINING[@]}" --compile
stage conformance "${GENERATE[@]}" --conformance "$FIXTURE" --json "$WORK/conformance.jsonl"

# The summary: each stage's outcome, then its results (the versions; the JSON lines a benchmark wrote or
# printed), and the end of the output of a stage that did not end well.
{
  echo "gpu_check on $DEVICE in $(( SECONDS - START )) s"
  cat "$WORK/stages.txt"
  for name in env $STAGES; do
    out=$WORK/$name.out
    [ -f "$out" ] || continue
    echo "-- $name"
    if [ "$name" = env ]; then
      cat "$out"
    else
      grep -h '^{' "$WORK/$name.jsonl" 2>/dev/null || grep '^{' "$out"
    fi
    grep -q "^$name .* ok in" "$WORK/stages.txt" || tail -n 12 "$out" | cut -c1-300
  done
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
