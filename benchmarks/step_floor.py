"""The step's floor: the configured teacher and student on synthetic device tensors in the leanest loop — no data,
no telemetry, no trainer — so a measured training step can be read as a multiple of what its compute alone costs.

The models, their input adapters, the task (student forward with its projectors and dali_kd.training.losses) and the
optimiser's parameter groups are dali_kd's own, built from the same config a training run would use; only the
loop around them is stripped: both models compiled, the optimiser fused where the device supports it, the targets
left on the device. Reports ms per:
  teacher_ms    the teacher's forward (no grad), targets as the student's loss takes them; with several teachers
                (--teacher A,B) all of them one after another, and each one's as teacher_ms_<key>
  student_ms    the student's forward + loss + backward + gradient clip + optimiser step, on fixed targets
  optimizer_ms  the optimiser step alone (part of student_ms)
  step_ms       the whole step: teacher, then student
One-view steps only (multi-crop has no floor here), without per-teacher standardisation (a few elementwise
operations per teacher outside the compiled step).

    python benchmarks/step_floor.py [--teacher vit_base_patch16_224 --student vit_small_patch16_224
        --image-size 224 --batch-size 256 --precision bf16 --device cuda] [--steps 20] [--json floor.json]
    python benchmarks/step_floor.py --teacher vit_base_patch16_224,resnet50 ...    # two teachers, one student
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2

from dali_kd.config import Config, load_config
from dali_kd.data.batch import Batch
from dali_kd.data.outputs import ModelOutput
from dali_kd.models import FrozenTeacher, build_distill_models, model_outputs
from dali_kd.models.inputs import InputSpec
from dali_kd.runtime import autocast, autocast_dtype, resolve_device
from dali_kd.training.optim import param_groups, peak_lr
from dali_kd.training.task import DistillTask, teacher_losses

# timm names of the optimisers whose torch implementation takes fused=True.
FUSABLE = ("adam", "adamw")


def teacher_overrides(teachers: str, pretrained: bool | None = False) -> list[str]:
    """The config overrides for a benchmark's --teacher: one timm name (model.teacher), or several separated by
    commas (model.teachers, in that order); no checkpoint, and model.teacher.pretrained as given (None: the
    config's). Random init: weights do not change the cost."""
    names = teachers.split(",")
    said = {} if pretrained is None else {"pretrained": str(pretrained).lower()}
    if len(names) == 1:
        keys = {"name": names[0], "checkpoint": "null", **said}
        return [f"model.teacher.{key}={value}" for key, value in keys.items()]
    extra = "".join(f", {key}: {value}" for key, value in said.items())
    listed = ", ".join(f"{{name: {name}, checkpoint: null{extra}}}" for name in names)
    return ["model.teacher=null", f"model.teachers=[{listed}]"]


def floor_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides that give the models of a benchmark's command line (random init: weights do not
    change the cost)."""
    return [
        "data.root=.",  # never read
        "data.val_root=null",
        f"data.image_size={args.image_size}",
        *teacher_overrides(args.teacher),
        f"model.student.name={args.student}",
        "model.student.checkpoint=null",
        "model.student.pretrained=false",
        f"train.batch_size={args.batch_size}",
        f"train.precision={args.precision}",
    ]


def fused_optimizer(student: torch.nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer, bool]:
    """dali_kd's parameter groups under its configured optimiser, fused where torch can (else its default)."""
    opt = cfg.train.optimizer
    groups = param_groups(student, opt.weight_decay, opt.layer_decay)
    lr = peak_lr(opt, cfg.train.batch_size)
    if opt.name.lower() in FUSABLE:
        try:
            return create_optimizer_v2(
                groups, opt.name, lr=lr, weight_decay=opt.weight_decay, betas=opt.betas, fused=True
            ), True
        except (RuntimeError, TypeError, ValueError):
            pass  # this device or build has no fused kernel
    return create_optimizer_v2(groups, opt.name, lr=lr, weight_decay=opt.weight_decay, betas=opt.betas), False


def lean_teacher(teacher: FrozenTeacher, with_patches: bool, device: torch.device, amp_dtype) -> Callable:
    """The teacher's forward as one function to compile: input adapter, autocast, outputs in fp32."""

    def forward(images: torch.Tensor) -> ModelOutput:
        x = teacher.input(images) if teacher.input is not None else images
        with autocast(device, amp_dtype):
            out = model_outputs(teacher.model, x, with_patches)
        return ModelOutput(
            *(None if t is None else t.float() for t in (out.pooled, out.logits, out.patch_tokens))
        )

    return forward


def timed_ms(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Mean ms per call of fn after warm-up calls (compilation happens there); the device's queue drained at both
    ends, so the figure is throughput, not launch time."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - start) / steps


def measure_floor(
    cfg: Config,
    device: torch.device,
    steps: int = 20,
    warmup: int = 5,
    compile_backend: str | None = "inductor",
) -> dict:
    """The floor of cfg's one-view step on `device` (see the module docstring); compile_backend None: eager."""
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    size, batch_size = cfg.data.image_size, cfg.train.batch_size
    pipeline = InputSpec(cfg.view_size, cfg.data.augment.mean, cfg.data.augment.std)
    models = build_distill_models(
        cfg.model, size, cfg.train.loss.patch_weight, False, device, amp_dtype,
        teacher_image_size=cfg.teacher_image_size, pipeline=pipeline,
    )  # fmt: skip
    images_dtype = torch.float16 if cfg.data.output_dtype == "float16" else torch.float32
    images = torch.randn(batch_size, 3, cfg.view_size, cfg.view_size, device=device).to(images_dtype)
    batch = Batch(
        images=images,
        labels=torch.randint(0, 10, (batch_size,), device=device),
        sample_ids=torch.arange(batch_size, device=device),
    )
    compiled = compile_backend is not None
    teachers = [
        lean_teacher(teacher, patches, device, amp_dtype)
        for teacher, patches in zip(models.teachers, models.teacher_patches, strict=True)
    ]
    if compiled:
        teachers = [torch.compile(teacher, backend=compile_backend) for teacher in teachers]
    several = len(teachers) > 1
    # Several teachers: each with its own loss and weight, as the trainer builds them (one: train.loss as it is).
    losses = teacher_losses(cfg.model, cfg.train.loss) if several else ()
    task = DistillTask(models.student, cfg.train.loss, device, amp_dtype, compile=False, teachers=losses)
    if compiled:
        # The student's forward with its losses, one graph, as the trainer compiles it.
        task.student_step = torch.compile(task.forward_with_loss, backend=compile_backend)
    optimizer, fused = fused_optimizer(models.student, cfg)
    clip = cfg.train.optimizer.grad_clip
    params = [p for p in models.student.parameters() if p.requires_grad]

    def teacher_forward() -> list[ModelOutput]:
        with torch.no_grad():
            return [teacher(images) for teacher in teachers]

    def student_step(targets: list[ModelOutput]) -> None:
        losses = task(batch, targets)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()

    fixed = teacher_forward()
    result = {
        "teacher_ms": timed_ms(teacher_forward, device, steps, warmup),
        "student_ms": timed_ms(lambda: student_step(fixed), device, steps, warmup),
        "optimizer_ms": timed_ms(optimizer.step, device, steps, warmup),  # on the last step's gradients
        "step_ms": timed_ms(lambda: student_step(teacher_forward()), device, steps, warmup),
    }
    if several:
        for key, teacher in zip(models.teacher_keys, teachers, strict=True):
            with torch.no_grad():
                result[f"teacher_ms_{key}"] = timed_ms(lambda t=teacher: t(images), device, steps, warmup)
    result["img_per_s"] = 1000 * batch_size / result["step_ms"]
    result.update(
        teacher=",".join(spec.name for spec in cfg.model.teacher_specs), student=cfg.model.student.name, image_size=size, batch_size=batch_size,
        precision=str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32", device=str(device),
        compiled=compile_backend or "no", fused_optimizer=fused, steps=steps, warmup=warmup,
    )  # fmt: skip
    return result


def markdown(floor: dict) -> str:
    each = [
        f"{k.removeprefix('teacher_ms_')} {v:.2f}" for k, v in floor.items() if k.startswith("teacher_ms_")
    ]
    teacher_ms = f"{floor['teacher_ms']:.2f}" + (f" ({', '.join(each)})" if each else "")
    return "\n".join(
        [
            "| floor | teacher fwd ms | student fwd+bwd+opt ms | of which optimizer ms | whole step ms | img/s |",
            "|---|---|---|---|---|---|",
            f"| {floor['teacher'].replace(',', ' + ')} → {floor['student']}, {floor['image_size']} px, batch "
            f"{floor['batch_size']}, {floor['precision']}, compiled {floor['compiled']}, fused optimizer "
            f"{floor['fused_optimizer']} | {teacher_ms} | {floor['student_ms']:.2f} | {floor['optimizer_ms']:.2f} | "
            f"{floor['step_ms']:.2f} | {floor['img_per_s']:.0f} |",
        ]
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's models as train_throughput.py names them."""
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed calls of each part")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (compilation)")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend; 'none': eager (no compilation)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = load_config(overrides=floor_overrides(args))
    backend = None if args.compile_backend == "none" else args.compile_backend
    floor = measure_floor(cfg, resolve_device(args.device), args.steps, args.warmup, backend)
    print(markdown(floor))
    if args.json:
        args.json.write_text(json.dumps(floor, indent=2))


if __name__ == "__main__":
    main()
