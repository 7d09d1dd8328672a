#!/usr/bin/env bash
# One prepared visit to a lent GPU machine (one H200 with 16 CPU cores; see ../shared/GPU.md), most important part
# first, every part under its own time limit and all of them within BUDGET_S (285 s on the GPU):
#   1. the `gpu` tests (tests/test_gpu.py, tests/test_decode_options.py)
#   2. a few training steps of every path, student compiled (benchmarks/gpu_paths.py): DALI and torchvision
#      online, DALI teacher cache fill + replay, DALI and torchvision multi-crop
#   3. the reference step: ViT-B/16 teacher -> ViT-S/16 student, 224 px, bf16, batch 256, DALI, compiled student:
#      ms/step, img/s, data stall, GPU JPEG decoder utilisation
#   4. a cached step vs a student-only step (the same models)
#   5. augmentation: torchvision with 16 workers vs DALI on the GPU (window vs full decode where the benchmark
#      has --decode)
#   6. multi-crop augmentation cost per image: 2 global + 8 local crops vs the 2 globals alone
# Each part writes its results under $OUT as it finishes (the device tool brings that folder back, even from a run
# cut off at its limit), and $OUT/gpu_check.json / gpu_check.md (each target: measured, target, met?) are rewritten
# after every part. The last thing printed is that table.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the project root: at most ~5 minutes
#   PARTS="reference_step cache_step" bash benchmarks/gpu_check.sh   # a rerun of some parts only
#   DRY_RUN=1 bash benchmarks/gpu_check.sh   # here, on the CPU: the same parts at toy sizes (the test suite runs it)
# Parts: gpu_tests paths reference_step cache_step augment multi_crop.
#
# DALI is not installed on the GPU machine: carry its wheels first (dali-wheels-for-device.sh puts them in
# $HOME/devwhl), and carry .devwhl/extra (made by benchmarks/device_extra_wheels.sh: pydantic, which the
# machine lacks too) with this call. Generated images and run folders go to $WORK, never to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/parts"
DRY_RUN=${DRY_RUN:-0}
started=$(date +%s)
log() { echo "[gpu_check +$(($(date +%s) - started))s] $*" | tee -a "$OUT/log.txt"; }

if [ "$DRY_RUN" != 1 ]; then
  if ! python3 -c "import nvidia.dali" 2>/dev/null; then
    log "installing DALI from \$HOME/devwhl"
    mkdir -p "$HOME/devwhl/w" && cat "$HOME"/devwhl/all.tar.* | tar xf - -C "$HOME/devwhl/w" &&
      python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" "$HOME"/devwhl/w/*.whl
  fi
  if ! python3 -c "import pydantic" 2>/dev/null && [ -d .devwhl/extra ]; then
    log "installing pydantic from .devwhl/extra"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" .devwhl/extra/*.whl
  fi
  export PYTHONPATH="$HOME/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  BUDGET_S=${BUDGET_S:-285}
  WORK=${WORK:-${TMPDIR:-/tmp}/dali_kd_gpu_check}
  NUM_IMAGES=4096  # 16 steps a pass at batch 256; ~10 s to make on 16 cores, while the gpu tests run
  # Seconds per part, 285 in all; the compiling parts get most (a cold torch.compile: one graph for the reference
  # student, two for the paths' tiny student; the cache part reuses the reference's from the on-disk cache).
  LIMIT_TESTS=40 LIMIT_PATHS=55 LIMIT_REFERENCE=85 LIMIT_CACHE=40 LIMIT_AUGMENT=25 LIMIT_MULTI_CROP=25
  LIMIT_MIX=15
  MIX=(--device cuda --batch-size 256 --size 224 --dtype float16 --repeats 50)
  PATHS=(--device cuda --num-images 256 --batch-size 32 --steps 6 --image-size 64 --local-size 32 --local-crops 8
         --workers 8 --dali-threads 8)
  STEP=(--teacher vit_base_patch16_224 --student vit_small_patch16_224 --image-size 224 --batch-size 256
        --precision bf16 --compile --dali-threads 8 --device cuda)
  REFERENCE=(--backends dali --steps 48 --log-every 4)
  CACHE=(--backends dali+cache,dali+student-only --one-process --steps 48 --log-every 4)
  AUGMENT=(--batch-size 256 --workers 16 --dali-threads "" --gpu-threads 8 --warmup 2 --batches 4 --repeats 3)
  MULTI_CROP=(--multi-crop --batch-size 128 --workers "" --dali-threads "" --gpu-threads 8 --warmup 1 --batches 3
              --repeats 2)
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # Toy tensors need no thread team; on a small shared machine one waits for descheduled threads at every op
  # (2 cores, other jobs running: 2.5 s a step with two threads, 50 ms with one).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  BUDGET_S=${BUDGET_S:-600}
  WORK=${WORK:-${TMPDIR:-/tmp}/dali_kd_gpu_check_dry}
  NUM_IMAGES=32  # 4 steps a pass at batch 8
  LIMIT_TESTS=60 LIMIT_PATHS=120 LIMIT_REFERENCE=90 LIMIT_CACHE=120 LIMIT_AUGMENT=90 LIMIT_MULTI_CROP=90
  LIMIT_MIX=60
  MIX=(--device cpu --batch-size 8 --size 32 --repeats 3)
  # torch.compile's eager backend: every path still traces compiled, without minutes of C++ code generation.
  PATHS=(--device cpu --data "$WORK/data" --batch-size 8 --steps 3 --image-size 32 --local-size 16 --local-crops 2
         --workers 0 --dali-threads 2 --compile-backend eager)
  STEP=(--teacher test_resnet --student test_vit --image-size 32 --batch-size 8 --dali-threads 2 --device cpu)
  REFERENCE=(--backends dali --steps 4 --log-every 1)
  CACHE=(--backends dali+cache,dali+student-only --one-process --steps 8 --log-every 1)
  AUGMENT=(--batch-size 8 --workers 2 --dali-threads 2 --warmup 1 --batches 2 --repeats 2)
  MULTI_CROP=(--multi-crop --batch-size 8 --workers "" --dali-threads "" --warmup 1 --batches 2 --repeats 2
              --local-crops 4 --local-size 48)
fi
# Another change adds --decode to the augmentation benchmark; use it once it is there.
if grep -q -- '"--decode"' benchmarks/augment_throughput.py; then
  AUGMENT+=(--decode window,full)
fi
mkdir -p "$WORK"

{  # in the background: its imports overlap the first part
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "gpu: none"
  python3 - <<'EOF'
import os, platform, torch
import nvidia.dali, timm
try:
    from importlib.metadata import version
    nvml = version("nvidia-ml-py")
except Exception:
    nvml = "none"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"DALI {nvidia.dali.__version__}, timm {timm.__version__}, nvidia-ml-py {nvml}, CPU cores {os.cpu_count()}")
EOF
} > "$OUT/versions.txt" 2>&1 &
versions_pid=$!

summarize() { python3 benchmarks/gpu_summary.py "$OUT" > /dev/null 2>> "$OUT/log.txt"; }

parts_started=$(date +%s)
failed_parts=()
# run_part NAME LIMIT_S COMMAND...: COMMAND under the smaller of its own limit and what is left of BUDGET_S,
# output in $OUT/NAME.log, exit code and seconds in $OUT/parts/NAME.json; then the table is brought up to date.
run_part() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then
    printf '{"part": "%s", "rc": null, "note": "not selected (PARTS=%s)"}\n' "$name" "$PARTS" > "$OUT/parts/$name.json"
    return
  fi
  local left=$((BUDGET_S - ($(date +%s) - parts_started)))
  if [ "$left" -lt 10 ]; then
    log "$name: skipped (the ${BUDGET_S} s of the visit are spent)"
    printf '{"part": "%s", "rc": null, "note": "skipped: the %s s of the visit were spent"}\n' "$name" "$BUDGET_S" \
      > "$OUT/parts/$name.json"
    summarize
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (limit ${limit} s)"
  local t0 rc
  t0=$(date +%s)
  # timeout signals its whole process group: DataLoader workers and per-backend processes stop with the part.
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "exit $rc" >> "$OUT/$name.log"
  printf '{"part": "%s", "rc": %d, "seconds": %d, "timeout_s": %d}\n' "$name" "$rc" "$(($(date +%s) - t0))" \
    "$limit" > "$OUT/parts/$name.json"
  log "$name: exit $rc after $(($(date +%s) - t0)) s"
  [ "$rc" -ne 0 ] && failed_parts+=("$name")
  summarize
}

# The shared images, made while the gpu tests run (those bring their own).
python3 benchmarks/make_dataset.py "$WORK/data" --num-images "$NUM_IMAGES" > "$OUT/make_dataset.log" 2>&1 &
data_pid=$!

run_part gpu_tests "$LIMIT_TESTS" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
  tests/test_decode_options.py
wait "$data_pid" || log "make_dataset failed: see make_dataset.log"
wait "$versions_pid"
cat "$OUT/versions.txt"

run_part paths "$LIMIT_PATHS" python3 benchmarks/gpu_paths.py "${PATHS[@]}" --out "$OUT/paths"

run_part reference_step "$LIMIT_REFERENCE" python3 benchmarks/train_throughput.py "${STEP[@]}" "${REFERENCE[@]}" \
  --compute-floor-ms 20 --data "$WORK/data" --json "$OUT/reference_step.json"

run_part cache_step "$LIMIT_CACHE" python3 benchmarks/train_throughput.py "${STEP[@]}" "${CACHE[@]}" \
  --data "$WORK/data" --json "$OUT/cache_step.json"

# Function matching's mixing step per batch, at the reference step's batch and size (its share of that step).
run_part mix_cost "$LIMIT_MIX" python3 benchmarks/mix_cost.py "${MIX[@]}" --json "$OUT/mix_cost.json"

run_part augment "$LIMIT_AUGMENT" python3 benchmarks/augment_throughput.py "${AUGMENT[@]}" --data "$WORK/data" \
  --json "$OUT/augment.json"

run_part multi_crop "$LIMIT_MULTI_CROP" python3 benchmarks/augment_throughput.py "${MULTI_CROP[@]}" \
  --data "$WORK/data" --json "$OUT/multi_crop.json"

log "done: parts took $(($(date +%s) - parts_started)) s of ${BUDGET_S} s"
{
  echo "## gpu_check $(date -u +%Y-%m-%d)$([ "$DRY_RUN" = 1 ] && echo ' (dry run on the CPU: toy sizes, not a measurement)')"
  echo
  cat "$OUT/versions.txt"
  echo; echo "### gpu tests"; echo; tail -2 "$OUT/gpu_tests.log" 2>/dev/null
  for part in paths/paths reference_step cache_step augment multi_crop; do
    [ -f "$OUT/$part.md" ] && { echo; echo "### ${part#paths/}"; echo; cat "$OUT/$part.md"; }
  done
} > "$OUT/report.md"
summarize
[ ${#failed_parts[@]} -gt 0 ] && log "parts that did not finish cleanly: ${failed_parts[*]} (see their .log)"
echo
cat "$OUT/gpu_check.md"
[ ${#failed_parts[@]} -eq 0 ]
