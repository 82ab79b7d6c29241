#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/gpu_check.sh needs on a bare GPU machine that reaches no
# network: two ignored folders that travel with the device tool's `carry`:
#   .whl/   the wheels that machine lacks (its own Python 3.12, torch, numpy, pyarrow, scipy, ... are used)
#   .gpu/   the reference's Python files and tokenizer, the released tokenizer, and the conformance fixture's
#           generate cases (read from ../shared, which does not travel)
# Run from anywhere, as often as you like: what is already there is kept, what no longer belongs is removed.
#   bash benchmarks/gpu_prepare.sh
# Then, where a GPU is lent, call the device tool's run with carry [".whl", ".gpu"] and the command
#   bash benchmarks/gpu_check.sh
# (README, "Checking on a GPU", has the whole call).
set -euo pipefail
cd "$(dirname "$0")/.."
REFERENCE_GIT=${REFERENCE_GIT:-/work/.mirror/jingyaogong+minimind-o/repo}  # jingyaogong/minimind-o, any clone
SHARED=${SHARED:-../shared}

# The wheels, one version each (two versions of one package stop the whole install there). What needs them:
WHEELS=(
  soundfile==0.14.0 cffi==2.0.0 pycparser==3.0 soxr==1.1.0   # train.py reads audio with soundfile at import
  moshi==0.2.13                                             # Mimi: bench_generate.py's time to first audio
  transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2  # our pins; the reference's model code
                                                            # is written for them (the machine has 5.x / 1.x)
  librosa==0.11.0 audioread==3.1.0 decorator==5.2.1 pooch==1.9.0 platformdirs==4.14.9  # the reference's
)                                                           # model code imports librosa at the top
# The reference's files its training step needs (its model, data set and trainer code, and its tokenizer).
REFERENCE_FILES=(model/__init__.py model/model_minimind.py model/model_omni.py model/tokenizer.json
                 model/tokenizer_config.json dataset/omni_dataset.py trainer/train_sft_omni.py
                 trainer/trainer_utils.py)

wheels() {
  mkdir -p .whl
  local wanted=" "
  for spec in "${WHEELS[@]}"; do  # file names spell the project with underscores, any case
    wanted+="$(echo "${spec%%==*}" | tr 'A-Z-' 'a-z_')-${spec##*==}-* "
  done
  for f in .whl/*.whl; do       # versions no longer wanted (or other files) go
    [ -e "$f" ] || continue
    local keep=0 name
    name=$(basename "$f" | tr 'A-Z' 'a-z')
    for pattern in $wanted; do
      # shellcheck disable=SC2053
      [[ $name == $pattern ]] && keep=1
    done
    [ $keep = 1 ] || { echo "removing $f"; rm -f "$f"; }
  done
  # the device README's command: CPython 3.12, the manylinux x86-64 platforms; already there is not fetched again
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
}

reference() {
  if [ ! -d "$REFERENCE_GIT" ]; then
    echo "gpu_prepare: no reference clone at $REFERENCE_GIT (set REFERENCE_GIT to one)" >&2
    exit 1
  fi
  rm -rf .gpu/reference && mkdir -p .gpu/reference
  git --git-dir "$REFERENCE_GIT" archive HEAD "${REFERENCE_FILES[@]}" | tar -x -C .gpu/reference
  git --git-dir "$REFERENCE_GIT" rev-parse HEAD > .gpu/reference/COMMIT
}

shared_parts() {
  local fixture="$SHARED/fixtures/conformance_public.pt"
  for f in "$SHARED/tokenizer/tokenizer.json" "$SHARED/tokenizer/tokenizer_config.json" "$fixture"; do
    [ -f "$f" ] || { echo "gpu_prepare: $f is missing (../shared beside the project)" >&2; exit 1; }
  done
  mkdir -p .gpu/tokenizer .gpu/fixtures
  cp "$SHARED/tokenizer/tokenizer.json" "$SHARED/tokenizer/tokenizer_config.json" .gpu/tokenizer/
  # Only the models with generate cases (the whole fixture is 49 MB; the travelling tree may hold 64 MiB).
  python3 - "$fixture" .gpu/fixtures/conformance_generate.pt <<'EOF'
import sys, torch
fx = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
models = [m for m in fx["models"] if m["generate"]]
torch.save({"models": [dict(m, forward=[]) for m in models], "samples": [], "full_size_state_dict_shapes": {}},
           sys.argv[2] + ".tmp")
import os; os.replace(sys.argv[2] + ".tmp", sys.argv[2])
EOF
}

wheels
reference
shared_parts
if ! { git check-ignore -q .whl/x && git check-ignore -q .gpu/x; }; then
  echo "gpu_prepare: .whl/ and .gpu/ must be ignored by git (.gitignore lists them)" >&2
  exit 1
fi
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .gpu | tail -1 | cut -f1)
echo "wheels: $(ls .whl | wc -l) ($(du -sh .whl | cut -f1)); .gpu: $(du -sh .gpu | cut -f1); the travelling tree:" \
     "$(( (tracked + carried) / 1048576 )) MiB of 64 (tracked files $(( tracked / 1024 )) KiB)"
[ $(( tracked + carried )) -lt $(( 64 * 1048576 )) ] || { echo "gpu_prepare: over the 64 MiB limit" >&2; exit 1; }
