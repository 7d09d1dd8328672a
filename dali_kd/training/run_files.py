"""What a run directory holds besides checkpoints: the resolved config, the quarantine list, metrics rows, the final
weights and summary.json — and how each is (re)written so that a resumed run finds them consistent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dali_kd.config import Config, dump_config
from dali_kd.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from dali_kd.models import Student
from dali_kd.runtime import resolve_compile
from dali_kd.training.run_state import RunState
from dali_kd.training.standardise import TeacherStandardiser

if TYPE_CHECKING:
    import torch

    from dali_kd.training.build import RunParts


def start_run_dir(run_dir: Path, cfg: Config, step: int) -> None:
    """The config this run uses, and metrics up to `step` (the quarantine list writes its own file)."""
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    # Rows a killed process wrote after the state this run starts from (all of them on a fresh start).
    truncate_metrics(run_dir / "metrics.jsonl", step)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows a killed run wrote after the checkpoint it resumes from: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a half-written last line
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def write_final(
    run_dir: Path,
    student: Student,
    summary: dict[str, Any],
    ema_backbone: torch.nn.Module | None = None,
    standardiser: TeacherStandardiser | None = None,
) -> None:
    """The trained student (a bare timm state dict), its EMA's (the same keys), its adaptors (the first teacher's
    as projector.safetensors and patch_projector.safetensors, the others' in adaptors.safetensors, and the
    statistics of the teachers whose targets were standardised; what `dali_kd.export --heads` ships), and the
    summary."""
    save_safetensors_atomic(run_dir / "student.safetensors", student.backbone.state_dict())
    if ema_backbone is not None:
        save_safetensors_atomic(run_dir / "student_ema.safetensors", ema_backbone.state_dict())
    save_safetensors_atomic(run_dir / "projector.safetensors", student.projector.state_dict())
    if student.patch_projector is not None:
        save_safetensors_atomic(run_dir / "patch_projector.safetensors", student.patch_projector.state_dict())
    # The other teachers' adaptors (several teachers), named as in the student's state dict: adaptors.<i>.*.
    others = {k: v for k, v in student.state_dict().items() if k.startswith("adaptors.")}
    if others:
        save_safetensors_atomic(run_dir / "adaptors.safetensors", others)
    if standardiser is not None:  # the adaptors of a standardised teacher learnt its targets in this scale
        save_safetensors_atomic(run_dir / "teacher_standardiser.safetensors", standardiser.state_dict())
    write_json_atomic(run_dir / "summary.json", summary)


def run_summary(
    cfg: Config, state: RunState, parts: RunParts, world_size: int, device: str
) -> dict[str, Any]:
    """What the run did and on what: summary.json's run-level fields (telemetry and the targets add theirs)."""
    train_index, val_index = parts.train_index, parts.val_index
    return {
        "steps": state.step,
        "epochs": cfg.train.epochs,
        "steps_per_epoch": parts.steps_per_epoch,
        "final_loss": state.final_loss,
        "student_knn_top1": state.student_knn_top1,
        "teacher_knn_top1": state.teacher_knn_top1,
        "student_head_top1": state.student_head_top1,
        "teacher_head_top1": state.teacher_head_top1,
        "student_ema_knn_top1": state.student_ema_knn_top1,
        "student_ema_head_top1": state.student_ema_head_top1,
        # Top-5 beside top-1: null with fewer than 5 classes (and where the top-1 beside it is null).
        "student_knn_top5": state.student_knn_top5,
        "teacher_knn_top5": state.teacher_knn_top5,
        "student_head_top5": state.student_head_top5,
        "teacher_head_top5": state.teacher_head_top5,
        "student_ema_knn_top5": state.student_ema_knn_top5,
        "student_ema_head_top5": state.student_ema_head_top5,
        # The student's agreement with each teacher (agreement, or agreement_<key>) and, with several teachers,
        # each teacher's own results (teacher_knn_top1_<key>, ...): the teacher_* keys above are then null.
        **state.named_results,
        "chance_top1": 100.0 / train_index.num_classes,
        "knn_history": state.knn_history,
        "num_classes": train_index.num_classes,
        "class_names": list(train_index.class_names),  # label order, for an exported student (dali_kd.export)
        "num_train_images": train_index.num_samples,
        "num_val_images": val_index.num_samples if val_index else 0,
        "teacher": cfg.model.primary_teacher.name,
        # With several teachers, each one's name by key (the metrics' suffixes).
        **(
            {
                "teachers": dict(
                    zip(cfg.model.teacher_keys, [t.name for t in cfg.model.teacher_specs], strict=True)
                )
            }
            if len(cfg.model.teacher_specs) > 1
            else {}
        ),
        "student": cfg.model.student.name,
        # What each model was fed (size, mean, std of its normalised input): the student's is what it expects
        # when shipped (dali_kd.export writes it into preprocess.json).
        "inputs": parts.inputs,
        "device": device,
        "backend": cfg.data.backend,
        "precision": str(parts.amp_dtype).removeprefix("torch.") if parts.amp_dtype else "fp32",
        "compiled_student": resolve_compile(cfg.train.compile_student, device),
        "world_size": world_size,
        "quarantined_files": len(parts.quarantine),
    }
