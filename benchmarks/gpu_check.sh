#!/usr/bin/env bash
# The one prepared GPU check of issue 12, sized for <= 8 minutes on one H200 (GPU time is scarce: one run).
#   1 env             install the wheels the bare machine lacks (.whl/), the versions, the imports
#   2 train           training samples/s and peak memory, ours and the reference's step, at the release's
#                     shapes (batch 40 x 512, bf16): benchmarks/bench_vs_reference.py, eager
#   3 decode_eager    stream_generate's speed, full-size model, one stream: steps/s, time to first audio
#   4 decode_compiled the same with the decode steps compiled (CUDA graphs): benchmarks/bench_generate.py
#   5 resume          a 1-process torchrun (NCCL) run of train.py killed and resumed: benchmarks/check_resume.py
#   6 train_compiled  stage 2 with --compile
#   7 conformance     the conformance generate cases through the compiled steps: benchmarks/compiled_decode.py
# Each stage has its own time limit, trimmed to what is left of GPU_CHECK_BUDGET_S (the issue's goals first,
# issue 10's compiled conformance last); a stage that fails or times out is recorded and the next one runs.
# Writes summary.json, summary.txt and gpu_check.log (every stage's output) under $OUT and prints the summary last.
#
# Prepare on the development machine first: bash benchmarks/gpu_prepare.sh (fills .whl/ and .gpu/). Then the
# device tool's run, from the repo root:
#   command "bash benchmarks/gpu_check.sh", carry [".whl", ".gpu"], timeout_s 540
# (the stages end by GPU_CHECK_BUDGET_S = 470 s; the rest is margin for a stage's kill and the copy back).
# Again, some stages only (env always runs):
#   GPU_CHECK_STAGES="train_compiled conformance" bash benchmarks/gpu_check.sh
# Dry run on a CPU (tiny sizes, gloo, short limits; every stage's logic, not its numbers; ~6 min here):
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STAGES=${GPU_CHECK_STAGES:-train decode_eager decode_compiled resume train_compiled conformance}
OUT=${OUT:-/tmp/gpu_check_out}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)   # the stages' outputs, until the summary is written
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
START=$SECONDS
SUMMARY_RESERVE_S=20   # kept back for the summary

if [ "$DEVICE" = cuda ]; then
  BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
  BATCH=40 SEQ=512 DTYPE=bfloat16 COMPILE_BACKEND=inductor
  DECODE=(--dtype bfloat16 --steps 200 --text_steps 48 --repeats 3)
  TRAIN_STEPS=(--steps 10 --warmup 2) CONFORMANCE_REPEATS=3
  SITE=/tmp/site               # the device README's install target, put on PYTHONPATH
  LIMITS=(env=90 train=120 decode_eager=60 decode_compiled=150 resume=120 conformance=120 train_compiled=200)
else                           # the dry run: tiny shapes; compiling only traced (aot_eager) or skipped
  BUDGET_S=${GPU_CHECK_BUDGET_S:-900}
  BATCH=2 SEQ=64 DTYPE=float32 COMPILE_BACKEND=aot_eager
  DECODE=(--steps 12 --text_steps 2 --prompt_tokens 8 --repeats 1 --threads 2)
  TRAIN_STEPS=(--steps 1 --warmup 1 --hidden_size 64 --num_hidden_layers 2) CONFORMANCE_REPEATS=1
  SITE=$WORK/site              # installed to check the wheel set, but this machine's own packages are used
  LIMITS=(env=60 train=200 decode_eager=150 decode_compiled=200 resume=200 conformance=400 train_compiled=200)
fi
TOKENIZER=.gpu/tokenizer
REFERENCE=.gpu/reference
FIXTURE=.gpu/fixtures/conformance_generate.pt

limit_of() { local kv; for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

# stage NAME FUNCTION [ARGS]: run a stage, its output in the log and in $WORK/NAME.out, a JSON line of the outcome
# in $WORK/stages.jsonl. The function runs each long command through `limited`, which stops it at the stage's
# limit: NAME's own, or what is left of the budget.
stage() {
  local name=$1; shift
  local left=$(( BUDGET_S - (SECONDS - START) - SUMMARY_RESERVE_S ))
  STAGE_NAME=$name STAGE_LIMIT=$(limit_of "$name")
  [ "$left" -lt "$STAGE_LIMIT" ] && STAGE_LIMIT=$left
  if [ "$STAGE_LIMIT" -lt 15 ]; then
    echo "{\"stage\": \"$name\", \"status\": \"skipped: out of time\"}" >> "$WORK/stages.jsonl"
    return
  fi
  echo "== $name (limit ${STAGE_LIMIT} s, at $(( SECONDS - START )) s)" | tee -a "$LOG"
  local began=$SECONDS
  "$@" 2>&1 | tee "$WORK/$name.out" >> "$LOG"
  local rc=${PIPESTATUS[0]} status=ok
  [ "$rc" -ne 0 ] && status="failed (exit $rc)"
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status="timed out after ${STAGE_LIMIT} s"
  echo "{\"stage\": \"$name\", \"status\": \"$status\", \"seconds\": $(( SECONDS - began ))}" >> "$WORK/stages.jsonl"
  echo "== $name: $status in $(( SECONDS - began )) s" | tee -a "$LOG"
}

limited() { timeout -k 10 "$STAGE_LIMIT" "$@"; }

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# ---- 1. env ------------------------------------------------------------------------------------------------
env_stage() {
  if [ "$DEVICE" = cuda ]; then
    limited nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || return 1
    limited python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl || return 1
  else  # the same wheels into a scratch folder, for the machine's Python 3.12 (checks the set installs)
    limited python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 .whl/*.whl || return 1
  fi
  limited python3 - "$REFERENCE" <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
failed = []
for name in ["numpy", "pyarrow", "soundfile", "tokenizers", "transformers", "huggingface_hub", "librosa",
             "moshi.models.loaders", "minimind_o", "train", "chat"]:
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '')}")
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
sys.path.insert(0, sys.argv[1])
for name in ["model.model_omni", "dataset.omni_dataset"]:  # the reference's: a note only, as bench_vs_reference.py
    try:                                                    # puts stand-ins for `datasets` and `onnxruntime`
        importlib.import_module(name)
        print(f"  reference {name}")
    except Exception as e:
        print(f"  note: reference {name} does not import by itself: {type(e).__name__}: {e}")
print("\n".join(f"FAIL import {f}" for f in failed))
sys.exit(1 if failed else 0)
EOF
}

# ---- 2 and 6. training, ours vs the reference --------------------------------------------------------------
# bench_vs_reference.py's command line: THE ONE PLACE to change if its flags differ. It prints one JSON line
# per side ("side": reference, ours, ours_longest; samples_per_s, tokens_per_s, peak_memory_mib), then the ratios.
train_vs_reference() {  # $@: extra flags (--compile)
  limited python3 benchmarks/bench_vs_reference.py step --reference "$REFERENCE" --tokenizer "$TOKENIZER" \
    --device "$DEVICE" --batch_size "$BATCH" --max_seq_len "$SEQ" --dtype "$DTYPE" "${TRAIN_STEPS[@]}" "$@"
}
train_compiled_stage() {
  if [ "$DEVICE" = cpu ]; then  # the dry run checks the command line, not inductor's training compile
    TORCH_COMPILE_DISABLE=1 train_vs_reference --compile
  else
    train_vs_reference --compile
  fi
}

# ---- 3 and 4. decode speed ---------------------------------------------------------------------------------
COMPILE_LOGS=recompiles,graph_breaks,perf_hints   # perf_hints: why a graph would not run as a CUDA graph
decode_stage() {  # $@: extra flags (--compile)
  TORCH_LOGS=$COMPILE_LOGS limited python3 benchmarks/bench_generate.py --device "$DEVICE" "${DECODE[@]}" \
    --compile_backend "$COMPILE_BACKEND" --json "$WORK/$STAGE_NAME.jsonl" "$@"
}

# ---- 5. torchrun resume ------------------------------------------------------------------------------------
resume_stage() {
  OMP_NUM_THREADS=1 limited python3 benchmarks/check_resume.py --device "$DEVICE" --tokenizer "$TOKENIZER" \
    --timeout "$(( $(limit_of resume) / 3 ))" --json "$WORK/resume.jsonl"
}

# ---- 7. conformance generate cases, compiled ---------------------------------------------------------------
conformance_stage() {
  TORCH_LOGS=$COMPILE_LOGS limited python3 benchmarks/compiled_decode.py "$FIXTURE" --device "$DEVICE" \
    --compile_backend "$COMPILE_BACKEND" --repeats "$CONFORMANCE_REPEATS" --json "$WORK/conformance.jsonl"
}

if [ "$DEVICE" = cuda ]; then  # the carried wheels come first (the site folder is filled by the env stage)
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
stage env env_stage  # always: a fresh machine has none of the wheels
wanted train && stage train train_vs_reference
wanted decode_eager && stage decode_eager decode_stage
wanted decode_compiled && stage decode_compiled decode_stage --compile
wanted resume && stage resume resume_stage
wanted train_compiled && stage train_compiled train_compiled_stage
wanted conformance && stage conformance conformance_stage

python3 benchmarks/gpu_summary.py "$WORK" "$OUT" "$DEVICE" "$(( SECONDS - START ))"
