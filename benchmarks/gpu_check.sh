#!/usr/bin/env bash
# One prepared visit to a lent GPU machine (an H200 with 16 CPU cores; see ../shared/GPU.md): install what the
# machine lacks, run the `gpu` tests, the augmentation benchmark (torchvision with 16 workers vs DALI on the GPU)
# with DINO multi-crop (2 global + 8 local crops vs the 2 globals alone), the ViT-B/16 → ViT-S/16 bf16
# distillation-step benchmark at batch 256 with each backend, and the same step with multi-crop. Results go under
# $OUT (the device tool brings that folder back); the last thing printed is a short table.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the project root
#   DRY_RUN=1 bash benchmarks/gpu_check.sh   # here, on the CPU: the same steps at toy sizes
#
# DALI is not installed on the GPU machine: carry its wheels first (dali-wheels-for-device.sh puts them in
# $HOME/devwhl), and carry .devwhl/extra (made by benchmarks/device_extra_wheels.sh: pydantic, which the
# machine lacks too) with this call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
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
  DEVICE=cuda
  AUG=(--num-images 4000 --batch-size 256 --workers 16 --dali-threads 16 --gpu-threads 8 --batches 10 --repeats 5
       --multi-crop)
  OPS=(--device gpu --threads 8 --batch-size 256 --num-images 2000)
  STEP=(--num-images 8000 --teacher vit_base_patch16_224 --student vit_small_patch16_224 --image-size 224
        --batch-size 256 --steps 30 --log-every 5 --workers 16 --dali-threads 8 --precision bf16)
  MC_STEP=(--num-images 4000 --teacher vit_base_patch16_224 --student vit_small_patch16_224 --image-size 224
        --batch-size 128 --steps 20 --log-every 5 --dali-threads 8 --precision bf16)
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  DEVICE=cpu
  AUG=(--quick --multi-crop)
  OPS=(--quick)
  STEP=(--quick)
  MC_STEP=(--quick)
fi

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "gpu: none"
  python3 - <<'EOF'
import os, platform, torch
import nvidia.dali, timm
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"DALI {nvidia.dali.__version__}, timm {timm.__version__}, CPU cores {os.cpu_count()}")
EOF
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

log "gpu tests"
if [ "$DRY_RUN" != 1 ]; then
  timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py > "$OUT/pytest_gpu.txt" 2>&1
else
  timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest_gpu.txt" 2>&1
fi
echo "exit $?" >> "$OUT/pytest_gpu.txt"
tail -3 "$OUT/pytest_gpu.txt"

log "augmentation throughput"
timeout 200 python3 benchmarks/augment_throughput.py "${AUG[@]}" --json "$OUT/augment.json" > "$OUT/augment.log" 2>&1
echo "exit $?" >> "$OUT/augment.log"

log "DALI stage costs"
timeout 120 python3 benchmarks/dali_op_costs.py "${OPS[@]}" > "$OUT/dali_op_costs.md" 2>"$OUT/dali_op_costs.log"
echo "exit $?" >> "$OUT/dali_op_costs.log"

log "distillation step throughput"
timeout 240 python3 benchmarks/train_throughput.py "${STEP[@]}" --device "$DEVICE" --json "$OUT/train_step.json" \
  > "$OUT/train_step.log" 2>&1
echo "exit $?" >> "$OUT/train_step.log"

log "multi-crop distillation step"
timeout 180 python3 benchmarks/train_throughput.py "${MC_STEP[@]}" --device "$DEVICE" --backends dali+globals,dali+multicrop \
  --json "$OUT/multi_crop_step.json" > "$OUT/multi_crop_step.log" 2>&1
echo "exit $?" >> "$OUT/multi_crop_step.log"

log "done"
{
  echo "## gpu_check $(date -u +%Y-%m-%d)"
  cat "$OUT/versions.txt"
  echo
  echo "### gpu tests"; tail -2 "$OUT/pytest_gpu.txt"
  echo
  echo "### augmentation (img/s)"; cat "$OUT/augment.md" 2>/dev/null || tail -5 "$OUT/augment.log"
  echo
  echo "### DALI stage costs"; cat "$OUT/dali_op_costs.md"
  echo
  echo "### distillation step"; cat "$OUT/train_step.md" 2>/dev/null || tail -5 "$OUT/train_step.log"
  echo
  echo "### multi-crop distillation step"; cat "$OUT/multi_crop_step.md" 2>/dev/null || tail -5 "$OUT/multi_crop_step.log"
  grep -h "multicrop_vs" "$OUT/multi_crop_step.log" 2>/dev/null
} > "$OUT/summary.md"
cat "$OUT/summary.md"
