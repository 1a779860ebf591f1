# Sourced by the GPU phases (.ci/gpu/phase1..3), never run: the environment they share, the CUDA
# gate, steps that stop at a time limit and record their outcome in $OUT/status.tsv as each ends,
# and the table printed last. A phase is one device `run` of at most 10 minutes: every step is cut
# at the phase's deadline (GPU_T0 + GPU_PHASE_BUDGET_S, default now + 540 s), so the phase always
# ends, bounds its files and prints its table inside the limit. See .ci/gpu/README.md.
# shellcheck shell=bash
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-results}
MODELS=${GPU_MODELS_DIR:-/tmp/gpt2onnx-models}  # the 124M export, made once per machine
LINKS=/tmp/gpt2onnx-pkg                           # gpt2onnx importable without pip (see link_project)
mkdir -p "$OUT"
export OUT
export PYTHONPATH=${ORTGPU_SITE:-/tmp/site}:$LINKS${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 GPT2_ONNX_REQUIRE_GPU=1  # test_gpu.py: a skip there fails instead
# No working directory on sys.path: from the repo's root, `python -m` would find the source folder
# gpt2onnx/ (which holds no engine/ or export/) before the linked package.
export PYTHONSAFEPATH=1
deadline=$(( ${GPU_T0:-$(date +%s)} + ${GPU_PHASE_BUDGET_S:-540} ))
failed=0

# Refuse in one line, before anything else runs, unless onnxruntime-gpu's CUDA provider is usable.
require_cuda() {
  "$PYTHON" .ci/gpu/check_cuda.py gate || exit 4
}

# gpt2onnx from this checkout by links: no pip run, nothing written into the machine's Python,
# the same on every call (an editable install would point at wherever the first call's tree was).
link_project() {
  mkdir -p "$LINKS/gpt2onnx"
  local part
  for part in "$PWD"/gpt2onnx/*.py; do ln -sfn "$part" "$LINKS/gpt2onnx/"; done
  for part in export engine benchmarks; do ln -sfn "$PWD/$part" "$LINKS/gpt2onnx/$part"; done
}

record() {  # record STEP EXIT SECONDS [NOTE]: one row of $OUT/status.tsv
  printf '%s\t%s\t%s\t%s\t%s\n' "$PHASE" "$1" "$2" "$3" "${4:-}" >> "$OUT/status.tsv"
}

seconds_left() { echo $(( deadline - $(date +%s) )); }

# step NAME LIMIT_S CMD...: CMD's output into the phase log (and the output), cut at LIMIT_S or at
# 20 s before the deadline, whichever comes first; skipped when under 30 s would be left.
step() {
  local name=$1 limit=$2 rc t0 note=""
  shift 2
  local left=$(( $(seconds_left) - 20 ))
  (( limit > left )) && limit=$left
  if (( limit < 30 )); then
    record "$name" skipped 0 "no time left in this command"
    failed=1
    return 1
  fi
  echo "== $name (at most ${limit}s)" | tee -a "$LOG"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  (( rc == 124 || rc == 137 )) && note="stopped at its ${limit}s limit"
  record "$name" "$rc" $(( $(date +%s) - t0 )) "$note"
  (( rc == 0 )) || failed=1
  return "$rc"
}

# What the device tool returns: at most 8 files of 16 MiB; a log over 15 MiB keeps its end.
bound_out() {
  local f
  for f in "$OUT"/*; do
    if [[ -f $f ]] && (( $(stat -c %s "$f") > 15 * 1024 * 1024 )); then
      tail -c $(( 15 * 1024 * 1024 )) "$f" > "$f.tail" && mv "$f.tail" "$f"
    fi
  done
}

# Last: bounded files, the table, the next run if the phase set NEXT, and the phase's exit status
# (0 only if every step passed).
finish() {
  bound_out
  "$PYTHON" .ci/gpu/table.py "$OUT"
  local verdict=ok
  ((failed)) && verdict="FAILED or incomplete (see the table)"
  echo "phase $PHASE: $verdict; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  [[ -n ${NEXT:-} ]] && echo "next run: $NEXT"
  exit "$failed"
}

start_phase() {  # start_phase N: the project's links (the gate uses the engine), the gate, the log
  PHASE=$1
  link_project
  require_cuda
  LOG=$OUT/phase$PHASE.log
}

# The 124M shape in fp16 with the shared cache, exported once per machine into $MODELS under the
# name `gpt2-onnx bench/generate --random-init gpt2 --seed 0 --dtype fp16 --kv-cache shared
# --models-dir $MODELS` look for (export/model_source.py resolve_model; tests/ci/test_gpu_sequence.py pins it),
# so that the benchmarks and the CLI reuse it. It cannot travel (about 250 MB): a fresh machine
# exports it again, inside the same command as the work that needs it.
FP16_124M=$MODELS/random-gpt2-seed0-fp16-shared
MODEL_ARGS=(--random-init gpt2 --seed 0 --dtype fp16 --kv-cache shared --models-dir "$MODELS")
export_124m() {
  if [[ -f $FP16_124M/manifest.json ]]; then
    record export-124m 0 0 "exported earlier on this machine"
    return 0
  fi
  step export-124m 300 "$PYTHON" -m gpt2onnx export --random-init gpt2 --seed 0 --dtype fp16 \
    --kv-cache shared --output "$FP16_124M"
}
