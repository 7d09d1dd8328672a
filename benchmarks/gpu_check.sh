#!/usr/bin/env bash
# One prepared visit to a lent GPU machine (one H200 with 16 CPU cores; see ../shared/GPU.md) that decides what to
# change: the most important part first, every part under its own time limit and all of them within BUDGET_S
# (390 s on the GPU: with the install and the archive the visit stays within 7 minutes; what does not fit is
# skipped and named in the table, for a second call with PARTS=...):
#   reference_step  ViT-B/16 teacher -> ViT-S/16 student, 224 px, bf16, batch 256, DALI, compiled, beside its floor
#                   measured in the same run (step_floor.py): ms/step, × floor, data / teacher / student /
#                   optimizer / rest, stall, GPU JPEG decoder utilisation
#   two_teachers_step  the same with two teachers, ViT-B/16 and ResNet-50 -> ViT-S/16, beside its own floor
#                   (each teacher's forward timed apart in the floor)
#   ablation        python -m dali_kd.tune on the reference step: each speed option flipped, 48 steps each, the
#                   compile caches reused -> one table and the overrides that were faster
#   profile         torch.profiler over 8 steady reference steps, summarised (step_profile.py): GPU busy %, top 10
#                   kernels, idle gaps, host syncs
#   cache_step      a cached step vs a student-only step (the same models), the student-only one vs its floor
#   multi_crop      multi-crop augmentation cost per image: 2 global + 8 local crops vs the 2 globals alone
#   tiny_step       ResNet-10-T -> ResNet-10-T, 64 px, batch 32, 120 steps: the fixed cost of a step
#   augment         torchvision with 16 workers vs DALI on the GPU, CPU cost per image beside img/s
#   dali_op_costs   DALI CPU-mode cost per image by stage on this machine's CPU (decode, resize, normalise, colour)
#   mix_cost        function matching's mixing per batch
#   gpu_tests       the `gpu` tests;  paths: a few compiled steps of every training path
# The images are ImageNet-like (500x375, quality 90, ~110 KB). Every result goes under $WORK/results; after each
# part the table (gpu_check.md) is brought up to date and the whole results folder archived, so $OUT holds
# gpu_check.tar.gz + gpu_check.md (+ log.txt) also when a part fails or the visit is cut off.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the project root
#   PARTS="gpu_tests paths" bash benchmarks/gpu_check.sh   # some parts only (a second call)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh   # here, on the CPU: the same parts at toy sizes (the test suite runs it)
#
# DALI is not installed on the GPU machine: carry its wheels first (dali-wheels-for-device.sh puts them in
# $HOME/devwhl), and carry .devwhl/extra (made by benchmarks/device_extra_wheels.sh: pydantic, which the
# machine lacks too) with this call. Generated images and run folders go to $WORK, never to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then WORK=${WORK:-${TMPDIR:-/tmp}/dali_kd_gpu_check_dry}; else WORK=${WORK:-${TMPDIR:-/tmp}/dali_kd_gpu_check}; fi
RES="$WORK/results"  # kept across calls: a PARTS=... call adds to the first one's results
mkdir -p "$OUT" "$RES/parts"
started=$(date +%s)
log() { echo "[gpu_check +$(($(date +%s) - started))s] $*" | tee -a "$RES/log.txt"; }

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
  BUDGET_S=${BUDGET_S:-390}
  NUM_IMAGES=4096  # 16 steps a pass at batch 256; made on 16 cores while the first part starts
  # Seconds per part: the measured durations of the 2026-12-04 visit plus a margin (reference 51 s cold + the
  # floor's two compiles; cache 39 s; augmentation 30 s; multi-crop 56 s; mix 5 s; gpu tests 88 s; paths 89 s).
  # Two teachers, not measured yet: the reference's figure plus a ResNet-50 compiled in the run and in its floor.
  LIMIT_REFERENCE=130 LIMIT_TWO_TEACHERS=150 LIMIT_ABLATION=170 LIMIT_PROFILE=60 LIMIT_CACHE=60 LIMIT_MULTI_CROP=70 LIMIT_TINY=60
  LIMIT_AUGMENT=45 LIMIT_OP_COSTS=30 LIMIT_MIX=15 LIMIT_TESTS=110 LIMIT_PATHS=110
  MIX=(--device cuda --batch-size 256 --size 224 --dtype float16 --repeats 50)
  PATHS=(--device cuda --num-images 256 --batch-size 32 --steps 6 --image-size 64 --local-size 32 --local-crops 8
         --workers 8 --dali-threads 8)
  STEP=(--teacher vit_base_patch16_224 --student vit_small_patch16_224 --image-size 224 --batch-size 256
        --precision bf16 --compile --dali-threads 8 --device cuda)
  REFERENCE=(--backends dali --steps 48 --log-every 4 --floor)
  # Fewer steps than the reference: two teachers compile (the ViT-B's graph is the reference's, in the same cache).
  TWO_TEACHERS=(--teacher vit_base_patch16_224,resnet50 --backends dali --steps 32 --log-every 4 --floor
                --floor-steps 10)
  TUNE=(--steps 48 --warmup 6 --repeats 1
        --options model.teacher.compile,optimizer.fused,telemetry,output_dtype,hw_decoder_load,prefetch_batches
        data.image_size=224 data.dali_threads=8 model.teacher.name=vit_base_patch16_224
        model.student.name=vit_small_patch16_224 train.batch_size=256 train.precision=bf16
        train.compile_student=true train.device=cuda train.log_every_n_steps=4)
  PROFILE=(--warmup 6 --steps 8)
  CACHE=(--backends dali+cache,dali+student-only --one-process --steps 48 --log-every 4 --floor)
  TINY=(--teacher resnet10t --student resnet10t --image-size 64 --batch-size 32 --precision bf16 --compile
        --dali-threads 8 --device cuda --backends dali --steps 120 --log-every 20 --floor)
  AUGMENT=(--batch-size 256 --workers 16 --dali-threads "" --gpu-threads 8 --warmup 2 --batches 4 --repeats 3)
  MULTI_CROP=(--multi-crop --batch-size 128 --workers "" --dali-threads "" --gpu-threads 8 --warmup 1 --batches 3
              --repeats 2 --multi-crop-graph batched,per_crop)
  OP_COSTS=(--device cpu --threads 16 --batch-size 64)
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # Toy tensors need no thread team; on a small shared machine one waits for descheduled threads at every op
  # (2 cores, other jobs running: 2.5 s a step with two threads, 50 ms with one).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  BUDGET_S=${BUDGET_S:-600}
  NUM_IMAGES=32  # 4 steps a pass at batch 8
  LIMIT_REFERENCE=90 LIMIT_TWO_TEACHERS=90 LIMIT_ABLATION=120 LIMIT_PROFILE=90 LIMIT_CACHE=120 LIMIT_MULTI_CROP=90 LIMIT_TINY=90
  LIMIT_AUGMENT=90 LIMIT_OP_COSTS=60 LIMIT_MIX=60 LIMIT_TESTS=60 LIMIT_PATHS=120
  MIX=(--device cpu --batch-size 8 --size 32 --repeats 3)
  # torch.compile's eager backend: every path still traces compiled, without minutes of C++ code generation.
  PATHS=(--device cpu --data "$WORK/data" --batch-size 8 --steps 3 --image-size 32 --local-size 16 --local-crops 2
         --workers 0 --dali-threads 2 --compile-backend eager)
  STEP=(--teacher test_resnet --student test_vit --image-size 32 --batch-size 8 --dali-threads 2 --device cpu)
  REFERENCE=(--backends dali --steps 4 --log-every 1 --floor --floor-backend eager --floor-steps 2)
  TWO_TEACHERS=(--teacher test_resnet,test_convnext --backends dali --steps 4 --log-every 1 --floor
                --floor-backend eager --floor-steps 2)
  # Options that need no compilation on the CPU (the others are the GPU's; test_tune covers the skipping).
  TUNE=(--steps 2 --warmup 1 --repeats 1 --options telemetry,prefetch_batches data.image_size=32 data.dali_threads=2
        model.teacher.name=test_resnet model.student.name=test_vit train.batch_size=8 train.compile_student=false
        train.device=cpu train.log_every_n_steps=1)
  PROFILE=(--warmup 1 --steps 2)
  CACHE=(--backends dali+cache,dali+student-only --one-process --steps 8 --log-every 1 --floor --floor-backend eager
         --floor-steps 2)
  TINY=(--teacher test_resnet --student test_vit --image-size 32 --batch-size 8 --dali-threads 2 --device cpu
        --backends dali --steps 4 --log-every 1 --floor --floor-backend eager --floor-steps 2)
  AUGMENT=(--batch-size 8 --workers 2 --dali-threads 2 --warmup 1 --batches 2 --repeats 2)
  MULTI_CROP=(--multi-crop --batch-size 8 --workers "" --dali-threads "" --warmup 1 --batches 2 --repeats 2
              --local-crops 4 --local-size 48)
  OP_COSTS=(--device cpu --threads 2 --quick)
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
} > "$RES/versions.txt" 2>&1 &
versions_pid=$!

# The table and the archive, after every part: what comes back is never older than the last finished part.
summarize() {
  python3 benchmarks/gpu_summary.py "$RES" > /dev/null 2>> "$RES/log.txt"
  cp "$RES/gpu_check.md" "$OUT/gpu_check.md" 2>/dev/null
  cp "$RES/log.txt" "$OUT/log.txt" 2>/dev/null
  tar czf "$OUT/gpu_check.tar.gz.partial" -C "$RES" . && mv "$OUT/gpu_check.tar.gz.partial" "$OUT/gpu_check.tar.gz"
}

parts_started=$(date +%s)
failed_parts=()
# run_part NAME LIMIT_S COMMAND...: COMMAND under the smaller of its own limit and what is left of BUDGET_S,
# output in $RES/NAME.log, exit code and seconds in $RES/parts/NAME.json; then the table is brought up to date.
run_part() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then
    printf '{"part": "%s", "rc": null, "note": "not selected (PARTS=%s)"}\n' "$name" "$PARTS" > "$RES/parts/$name.json"
    return
  fi
  local left=$((BUDGET_S - ($(date +%s) - parts_started)))
  if [ "$left" -lt 10 ]; then
    log "$name: skipped (the ${BUDGET_S} s of the visit are spent)"
    printf '{"part": "%s", "rc": null, "note": "skipped: the %s s of the visit were spent"}\n' "$name" "$BUDGET_S" \
      > "$RES/parts/$name.json"
    summarize
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (limit ${limit} s)"
  local t0 rc
  t0=$(date +%s)
  # timeout signals its whole process group: DataLoader workers and per-backend processes stop with the part.
  timeout -k 5 "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  echo "exit $rc" >> "$RES/$name.log"
  printf '{"part": "%s", "rc": %d, "seconds": %d, "timeout_s": %d}\n' "$name" "$rc" "$(($(date +%s) - t0))" \
    "$limit" > "$RES/parts/$name.json"
  log "$name: exit $rc after $(($(date +%s) - t0)) s"
  [ "$rc" -ne 0 ] && failed_parts+=("$name")
  summarize
}

# The shared ImageNet-like images (500x375, quality 90, ~110 KB); the versions are read meanwhile.
python3 benchmarks/make_dataset.py "$WORK/data" --num-images "$NUM_IMAGES" --size 500x375 --detail 2 \
  > "$RES/make_dataset.log" 2>&1 || log "make_dataset failed: see make_dataset.log"

run_part reference_step "$LIMIT_REFERENCE" python3 benchmarks/train_throughput.py "${STEP[@]}" "${REFERENCE[@]}" \
  --data "$WORK/data" --json "$RES/reference_step.json"
wait "$versions_pid"
cat "$RES/versions.txt"

# The later --teacher wins over the one in STEP.
run_part two_teachers_step "$LIMIT_TWO_TEACHERS" python3 benchmarks/train_throughput.py "${STEP[@]}" \
  "${TWO_TEACHERS[@]}" --data "$WORK/data" --json "$RES/two_teachers_step.json"

run_part ablation "$LIMIT_ABLATION" python3 -m dali_kd.tune "${TUNE[@]}" "data.root=$WORK/data" data.val_root=null \
  data.scan=off model.teacher.checkpoint=null --json "$RES/ablation.json"

run_part profile "$LIMIT_PROFILE" python3 benchmarks/step_profile.py "${STEP[@]}" "${PROFILE[@]}" \
  --data "$WORK/data" --json "$RES/profile.json"

run_part cache_step "$LIMIT_CACHE" python3 benchmarks/train_throughput.py "${STEP[@]}" "${CACHE[@]}" \
  --floor-from "$RES/reference_step.json" --data "$WORK/data" --json "$RES/cache_step.json"

run_part multi_crop "$LIMIT_MULTI_CROP" python3 benchmarks/augment_throughput.py "${MULTI_CROP[@]}" \
  --data "$WORK/data" --json "$RES/multi_crop.json"

run_part tiny_step "$LIMIT_TINY" python3 benchmarks/train_throughput.py "${TINY[@]}" --data "$WORK/data" \
  --json "$RES/tiny_step.json"

run_part augment "$LIMIT_AUGMENT" python3 benchmarks/augment_throughput.py "${AUGMENT[@]}" --data "$WORK/data" \
  --json "$RES/augment.json"

run_part dali_op_costs "$LIMIT_OP_COSTS" python3 benchmarks/dali_op_costs.py "${OP_COSTS[@]}" --data "$WORK/data" \
  --json "$RES/dali_op_costs.json"

# Function matching's mixing step per batch, at the reference step's batch and size (its share of that step).
run_part mix_cost "$LIMIT_MIX" python3 benchmarks/mix_cost.py "${MIX[@]}" --json "$RES/mix_cost.json"

run_part gpu_tests "$LIMIT_TESTS" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
  tests/test_decode_options.py

run_part paths "$LIMIT_PATHS" python3 benchmarks/gpu_paths.py "${PATHS[@]}" --out "$RES/paths"

log "done: parts took $(($(date +%s) - parts_started)) s of ${BUDGET_S} s"
{
  echo "## gpu_check $(date -u +%Y-%m-%d)$([ "$DRY_RUN" = 1 ] && echo ' (dry run on the CPU: toy sizes, not a measurement)')"
  echo
  cat "$RES/versions.txt"
  echo; echo "### gpu tests"; echo; tail -2 "$RES/gpu_tests.log" 2>/dev/null
  for part in reference_step two_teachers_step ablation profile cache_step multi_crop tiny_step augment paths/paths; do
    [ -f "$RES/$part.md" ] && { echo; echo "### ${part#paths/}"; echo; cat "$RES/$part.md"; }
  done
  [ -f "$RES/dali_op_costs.log" ] && { echo; echo "### DALI CPU-mode cost by stage"; echo; grep -v '^exit' "$RES/dali_op_costs.log"; }
} > "$RES/report.md"
summarize
[ ${#failed_parts[@]} -gt 0 ] && log "parts that did not finish cleanly: ${failed_parts[*]} (see their .log)"
echo
cat "$OUT/gpu_check.md"
[ ${#failed_parts[@]} -eq 0 ]
