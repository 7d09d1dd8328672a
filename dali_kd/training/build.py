"""Everything one process's run is made of, built from the config in the order that makes a resume exact.

Seeds first; then the data (scanned, quarantined), the models (their initialisation draws from the seeded RNG),
the task, optimiser, schedule, counters and teacher targets; then a checkpoint's state is loaded into those parts
(RNGs included) and the data stream is built at the checkpoint's position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.scheduler.scheduler import Scheduler

from dali_kd import console, distributed
from dali_kd.config import Config, LossConfig
from dali_kd.data import DataSplits, ImageIndex, QuarantineList, TrainStream, prepare_data
from dali_kd.data.sampling import min_share_size
from dali_kd.distributed import DistInfo
from dali_kd.errors import UserError
from dali_kd.evaluation.evaluator import Evaluator
from dali_kd.identity import data_identity
from dali_kd.models import FrozenTeacher, Student, build_distill_models
from dali_kd.models.distill import DistillModels
from dali_kd.models.inputs import InputSpec
from dali_kd.runs import checkpoint as ckpt
from dali_kd.runtime import autocast_dtype, resolve_compile, seed_everything
from dali_kd.teacher_cache.cache_identity import open_teacher_cache
from dali_kd.teacher_cache.targets import CachedTeacher, LiveTeacher, TeacherTargets
from dali_kd.telemetry.verdict import RunSetup
from dali_kd.training.checkpointer import PROGRESS, RunProgress, Stateful, restore
from dali_kd.training.ema import StudentEma
from dali_kd.training.nonfinite import NonFiniteGuard
from dali_kd.training.optim import build_optimizer, build_scheduler, peak_lr
from dali_kd.training.run_state import RunState
from dali_kd.training.standardise import TeacherStandardiser
from dali_kd.training.task import DistillTask, teacher_losses


@dataclass(kw_only=True)
class RunParts:
    amp_dtype: torch.dtype | None
    train_index: ImageIndex
    val_index: ImageIndex | None
    quarantine: (
        QuarantineList  # the files set aside: the scan's, then the run's own (it keeps quarantine.jsonl)
    )
    evaluator: Evaluator
    teachers: list[FrozenTeacher]  # in config order
    teacher_ids: list[dict[str, str]]
    teacher_keys: list[str]  # each teacher's name in metrics (model.teacher_keys)
    student: Student
    task: DistillTask
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    steps_per_epoch: int
    state: RunState
    guard: NonFiniteGuard
    targets: TeacherTargets
    # Built last, at the checkpoint's position (after the restore into the other parts): set by build_run.
    stream: TrainStream = field(init=False)
    data_files: dict | None = None  # identity.data_identity of train_index.files, for the Checkpointer
    ema: StudentEma | None = None  # train.ema_decay
    standardiser: TeacherStandardiser | None = None  # some model.teachers[i].standardise
    # What each model is fed ({"teacher": ..., "student": ...}: size, mean, std; with several teachers
    # "teachers": {key: ...} too), for the summary and export.
    inputs: dict[str, dict] | None = None

    @property
    def teacher(self) -> FrozenTeacher:
        """The first (or only) teacher."""
        return self.teachers[0]

    @property
    def teacher_identity(self) -> dict[str, str] | list[dict[str, str]]:
        """What a checkpoint knows the teachers by: one teacher's id, or the list of them."""
        return self.teacher_ids[0] if len(self.teacher_ids) == 1 else list(self.teacher_ids)

    def checkpoint_states(self) -> dict[str, Stateful]:
        """What a checkpoint stores, by name: the models' parts, then the counters that make up its progress dict."""
        parts: dict[str, Stateful] = {
            "student": self.student,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
        }
        if self.ema is not None:
            parts["student_ema"] = self.ema
        if self.standardiser is not None:
            parts["teacher_standardiser"] = self.standardiser
        parts[PROGRESS] = RunProgress(self.state, self.quarantine, self.targets, self.guard)
        return parts

    def checkpoint_identity(self) -> dict:
        """What a resume is checked against besides the config: the teacher's and the training files' identity."""
        return {"teacher": self.teacher_identity, "data_files": self.data_files}

    def run_setup(self, cfg: Config, device: torch.device) -> RunSetup:
        """What the run has on, for the advice of its verdict."""
        return RunSetup(
            device=device.type,
            bf16=self.amp_dtype == torch.bfloat16,
            compiled_student=resolve_compile(cfg.train.compile_student, device),
            compiled_teacher=all(teacher.compiled for teacher in self.teachers),
            teacher_cached=self.targets.cached,
            backend=cfg.data.backend,
            local_crops=cfg.train.use_local_crops,
        )


def build_run(
    cfg: Config,
    device: torch.device,
    dist: DistInfo,
    resume_from: Path | None = None,
    allow_config_change: bool = False,
) -> RunParts:
    """All parts of this rank's run; with resume_from, continued exactly from that checkpoint.

    The order is the resume contract: what draws from the seeded RNG (the models' initialisation) is made in the
    same order on a fresh start and on a resume, and the stream is built last, at the checkpoint's position."""
    train = cfg.train
    amp_dtype = autocast_dtype(train.precision, device)
    seed_everything(train.seed)
    splits, share = _data_splits(cfg, dist)
    evaluator = Evaluator(cfg, splits.train, splits.val, device, dist.rank, dist.world_size)
    pipeline = InputSpec(cfg.view_size, cfg.data.augment.mean, cfg.data.augment.std)
    models = build_distill_models(
        cfg.model, cfg.data.image_size, train.loss.patch_weight, train.use_local_crops, device, amp_dtype,
        teacher_image_size=cfg.teacher_image_size, pipeline=pipeline,
    )  # fmt: skip
    loss = _loss_for_teacher(cfg, models, splits.train.num_classes, dist)
    standardiser = _standardiser(cfg, device, dist)
    task = DistillTask(
        models.student, loss, device, amp_dtype, dist, resolve_compile(train.compile_student, device),
        teachers=teacher_losses(cfg.model, cfg.train.loss, first=loss), standardiser=standardiser,
    )  # fmt: skip
    optimizer = build_optimizer(models.student, train.optimizer, _peak_lr(cfg, dist), device)
    steps_per_epoch = _steps_per_epoch(cfg, share)
    scheduler = build_scheduler(optimizer, steps_per_epoch * train.epochs, train.optimizer)
    targets = _teacher_targets(cfg, models, splits.train, device, dist)
    parts = RunParts(
        amp_dtype=amp_dtype,
        train_index=splits.train,
        val_index=splits.val,
        quarantine=QuarantineList(splits.quarantine),
        evaluator=evaluator,
        teachers=models.teachers,
        teacher_ids=models.teacher_ids,
        teacher_keys=models.teacher_keys,
        student=models.student,
        task=task,
        optimizer=optimizer,
        scheduler=scheduler,
        steps_per_epoch=steps_per_epoch,
        state=RunState(),
        guard=NonFiniteGuard(train.on_nonfinite_loss, train.max_skipped_steps, device),
        targets=targets,
        standardiser=standardiser,
        data_files=data_identity(splits.train.files),
        inputs=model_inputs(models),
        ema=_student_ema(cfg, models.student),
    )
    stream_state = _restore(parts, cfg, dist, resume_from, allow_config_change)
    # The file shuffle is seeded alike on every rank (disjoint shares); augmentations differ per rank.
    parts.stream = targets.train_stream(
        cfg.stream_settings(), splits.train, device, dist.rank, dist.world_size, state=stream_state
    )
    parts.quarantine.watch(parts.stream, evaluator)
    evaluator.skip_files(lambda split: set_aside_files(split, parts))
    return parts


def model_inputs(models: DistillModels) -> dict[str, dict]:
    """What each model is fed: the (first) teacher's and the student's input, and with several teachers each
    teacher's by key."""
    inputs = {"teacher": models.teacher_input.to_dict(), "student": models.student_input.to_dict()}
    if len(models.teachers) > 1:
        inputs["teachers"] = {
            key: spec.to_dict() for key, spec in zip(models.teacher_keys, models.teacher_inputs, strict=True)
        }
    return inputs


def _steps_per_epoch(cfg: Config, share: int) -> int:
    """Every rank takes the same number of steps: the smallest share decides; a step takes grad_accum_steps
    batches; train.max_steps_per_epoch caps it."""
    train = cfg.train
    return min(train.max_steps_per_epoch, max(1, share // (train.batch_size * train.grad_accum_steps)))


def _data_splits(cfg: Config, dist: DistInfo) -> tuple[DataSplits, int]:
    """The checked splits (every file checked first, cached; the bad ones set aside and listed in the run's
    quarantine), and the number of training images each rank gets."""
    splits = prepare_data(cfg.data, dist.is_main, distributed.barrier)
    if dist.is_main:
        for message in splits.messages:
            console.info(message)
    share = min_share_size(splits.train.num_samples, dist.world_size)
    if cfg.train.batch_size > share:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is larger than each process's share of the data "
            f"({splits.train.num_samples} usable images / {dist.world_size} processes = {share})"
        )
    return splits, share


def teacher_head_loss(
    loss: LossConfig,
    teacher_name: str,
    teacher_classes: int,
    data_classes: int,
    key: str = "model.teacher",
) -> tuple[LossConfig, str | None]:
    """The loss to distil this teacher with, and a line to say when it is not train.loss: a teacher whose
    classifier does not have the data's classes answers another question with its logits, so it teaches its
    features only (the logit loss off); with nothing else to learn from it, a UserError. key: where the teacher
    is set (model.teacher, or model.teachers.0 for the first of several), for the keys the line names."""
    if loss.logit_weight == 0 or teacher_classes in (0, data_classes):
        return loss, None
    what = (
        f"{key}: {teacher_name}'s classifier has {teacher_classes} outputs but the data has {data_classes} "
        "classes, so its logits are not about these classes"
    )
    fix = (
        f"give a teacher of these {data_classes} classes ({key}.checkpoint, or {key}.name with "
        f"{key}.pretrained=true and weights for them)"
    )
    if loss.feature_weight == loss.patch_weight == loss.label_weight == 0:
        raise UserError(
            f"{what}, and train.loss.logit_weight is the only loss: {fix}, or set train.loss.feature_weight"
        )
    quiet = f"{key}.num_classes=0 (a pretrained teacher without its head) or train.loss.logit_weight=0"
    return loss.model_copy(update={"logit_weight": 0.0}), (
        f"{what}: the logit loss is off, the student learns its features only; to distil logits {fix}; {quiet} "
        "asks for features only without this line"
    )


def _loss_for_teacher(cfg: Config, models: DistillModels, data_classes: int, dist: DistInfo) -> LossConfig:
    teacher_classes = int(getattr(models.teacher.model, "num_classes", 0))
    key = "model.teacher" if cfg.model.teachers is None else "model.teachers.0"
    loss, line = teacher_head_loss(
        cfg.train.loss, cfg.model.primary_teacher.name, teacher_classes, data_classes, key
    )
    if line and dist.is_main:
        console.info(line)
    return loss


def _peak_lr(cfg: Config, dist: DistInfo) -> float:
    """train.optimizer.lr, scaled to the global batch of a step (batch_size × grad_accum_steps × processes, as timm
    counts it) as train.optimizer.lr_scale_rule says (rank 0 says so)."""
    opt = cfg.train.optimizer
    batch = cfg.train.batch_size * cfg.train.grad_accum_steps * dist.world_size
    lr = peak_lr(opt, batch)
    if lr != opt.lr and dist.is_main:
        console.info(
            f"lr {lr:.4g}: train.optimizer.lr {opt.lr:.4g} scaled ({opt.lr_scale_rule}) "
            f"from a batch of {opt.lr_scale_batch} to {batch}"
        )
    return lr


def _teacher_targets(
    cfg: Config, models: DistillModels, train_index: ImageIndex, device: torch.device, dist: DistInfo
) -> TeacherTargets:
    """The live teacher, or (train.cache_teacher_features) the teacher cache in front of it."""
    train = cfg.train
    live = LiveTeacher(models.teachers, models.teacher_patches, models.teacher_keys)
    if not train.cache_teacher_features:
        return live
    cache = open_teacher_cache(
        cfg, models.teachers, models.teacher_ids, train_index, models.teacher_patches, device, dist.is_main
    )
    return CachedTeacher(
        live, cache, train.cache_mode, train.cache_probe_every_n_steps, device, report=dist.is_main
    )


def _standardiser(cfg: Config, device: torch.device, dist: DistInfo) -> TeacherStandardiser | None:
    """The targets' standardisation, where some teacher asks for it (model.teachers[i].standardise)."""
    which = [spec.standardise for spec in cfg.model.teacher_specs]
    if not any(which):
        return None
    return TeacherStandardiser(cfg.model.teacher_keys, which, device, dist.world_size)


def _student_ema(cfg: Config, student: Student) -> StudentEma | None:
    """The student's EMA (train.ema_decay), made before a checkpoint is loaded into it, from the (seeded) initial
    student."""
    if cfg.train.ema_decay is None:
        return None
    return StudentEma(student, cfg.train.ema_decay, cfg.train.ema_warmup)


def _restore(
    parts: RunParts, cfg: Config, dist: DistInfo, resume_from: Path | None, allow_config_change: bool
) -> dict | None:
    """Load the checkpoint into the parts (after checking it belongs to this run); the data stream's saved state
    (None on a fresh start)."""
    if resume_from is None:
        return None
    saved = ckpt.load(resume_from)
    warnings = ckpt.check_compatible(
        saved,
        cfg,
        parts.teacher_identity,
        dist.world_size,
        resume_from,
        allow_config_change,
        parts.data_files,
    )
    for warning in warnings if dist.is_main else ():
        console.warning(f"warning: {warning}")
    return restore(saved, parts.checkpoint_states(), dist.rank)


def set_aside_files(split: str, parts: RunParts) -> set[str]:
    """The files of a split set aside so far (ImageIndex.files entries), for evaluation to skip: those the run has
    recorded (a resumed run's too), and for the k-NN bank, drawn from the training files, the training stream's."""
    files = parts.quarantine.set_aside_files(split)
    if split == "train":
        files |= {
            parts.train_index.files[int(slot)] for slot in parts.stream.state_dict().get("substitutions", {})
        }
    return files
