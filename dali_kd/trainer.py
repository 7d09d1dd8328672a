"""The distillation loop: step-capped epochs over one data stream, a frozen teacher, a compiled student."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dali_kd.config import Config, dump_config
from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import make_eval_batches, make_train_stream
from dali_kd.errors import UserError
from dali_kd.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from dali_kd.knn import extract_embeddings, knn_top1
from dali_kd.losses import distillation_losses
from dali_kd.models import FrozenTeacher, Student, build_model, embed_dim, model_outputs, same_token_grid
from dali_kd.telemetry.monitor import RunMonitor
from dali_kd.telemetry.timing import StepTimer


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to PyTorch (try --device cpu)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; fp32 on CPU (bf16 there only when asked)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from lr/warmup to lr, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def check_supported(cfg: Config) -> None:
    """Features whose keys exist (the original's) but that this version does not implement yet: refuse, not ignore."""
    if cfg.train.use_local_crops:
        raise UserError("train.use_local_crops: local crops are not supported yet; set it to false")
    if cfg.train.cache_teacher_features:
        raise UserError(
            "train.cache_teacher_features: the teacher cache is not supported yet; set it to false"
        )


class Trainer:
    def __init__(self, cfg: Config, device: torch.device, show_progress: bool = True):
        check_supported(cfg)
        self.cfg = cfg
        self.device = device
        self.show_progress = show_progress
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        seed_everything(cfg.train.seed)

        self.train_index = ImageIndex.from_config(cfg.data.root, cfg.data.file_list)
        self.val_index = (
            ImageIndex.from_folder(cfg.data.val_root, class_names=self.train_index.class_names)
            if cfg.data.val_root
            else None
        )
        size = cfg.data.image_size
        teacher_classes = 1000 if cfg.model.teacher.num_classes is None else cfg.model.teacher.num_classes
        student_classes = cfg.model.student.num_classes
        student_classes = teacher_classes if student_classes is None else student_classes
        teacher = build_model(cfg.model.teacher, "teacher", size, teacher_classes)
        backbone = build_model(cfg.model.student, "student", size, student_classes)
        self.teacher = FrozenTeacher(teacher.to(device), self.amp_dtype)
        self.use_patches = cfg.train.loss.patch_weight > 0 and same_token_grid(teacher, backbone)
        self.student = Student(
            backbone, embed_dim(teacher), cfg.model.projector_hidden_dim, with_patches=self.use_patches
        ).to(device)
        # Compile the student only: the frozen teacher gains nothing from it (and costs compile time).
        self.student_step = torch.compile(self.student) if cfg.train.compile_student else self.student

        opt = cfg.train.optimizer
        decay = [p for p in self.student.parameters() if p.ndim > 1]
        no_decay = [p for p in self.student.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr,
            betas=opt.betas,
        )
        self.stream = make_train_stream(cfg, self.train_index, device)
        full_steps = max(1, self.stream.num_samples // cfg.train.batch_size)
        self.steps_per_epoch = min(cfg.train.max_steps_per_epoch, full_steps)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, self.total_steps, opt.warmup_steps, opt.lr, opt.min_lr) / opt.lr,
        )
        self.step = 0
        # Replaced by the run monitor's timer in fit(); a disabled one lets train_step run on its own.
        self.timer = StepTimer(device, enabled=False)

    # ---- one step --------------------------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Teacher targets, student forward/backward, clipped AdamW step; losses stay on the device."""
        teacher_out = self.teacher(batch.images, with_patches=self.use_patches)
        self.timer.mark()  # teacher
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            student_out, projected, projected_patches = self.student_step(batch.images)
        losses = distillation_losses(
            self.cfg.train.loss,
            student_pooled=projected,
            teacher_pooled=teacher_out.pooled,
            student_logits=student_out.logits,
            teacher_logits=teacher_out.logits if self._logits_match(student_out, teacher_out) else None,
            student_patches=projected_patches,
            teacher_patches=teacher_out.patch_tokens,
            labels=batch.labels,
        )
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.cfg.train.optimizer.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.train.optimizer.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.timer.mark()  # student
        self.step += 1
        return {k: v.detach() for k, v in losses.items()}

    @staticmethod
    def _logits_match(student_out, teacher_out) -> bool:
        s, t = student_out.logits, teacher_out.logits
        return s is not None and t is not None and s.shape[-1] == t.shape[-1]

    # ---- evaluation ------------------------------------------------------------------------------------------
    def _embed_student(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            return model_outputs(self.student.backbone, images, with_patches=False).pooled

    def _embed_teacher(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images).pooled

    def knn_accuracy(self, embed) -> float | None:
        """k-NN top-1 (%) of val images against an (optionally subsampled) bank of training images."""
        if self.val_index is None:
            return None
        batch_size = self.cfg.train.batch_size
        bank_index = self.train_index.subset(self.cfg.train.knn_bank_size)
        bank, bank_labels = extract_embeddings(
            embed, make_eval_batches(self.cfg, bank_index, self.device, batch_size)
        )
        queries, query_labels = extract_embeddings(
            embed, make_eval_batches(self.cfg, self.val_index, self.device, batch_size)
        )
        return knn_top1(
            bank, bank_labels, queries, query_labels, self.train_index.num_classes, k=self.cfg.train.knn_k
        )

    def evaluate_student(self) -> float | None:
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                return self.knn_accuracy(self._embed_student)
        finally:
            self.student.train(was_training)

    # ---- the run ---------------------------------------------------------------------------------------------
    def fit(self, run_dir: Path, nvml: Any | None = None) -> dict[str, Any]:
        """Train for cfg.train.epochs step-capped epochs; writes config, metrics, summary and weights to run_dir."""
        cfg = self.cfg
        run_start = time.perf_counter()
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        self.monitor = RunMonitor(
            run_dir, self.device, enabled=cfg.train.telemetry, tensorboard=cfg.train.tensorboard, nvml=nvml
        )
        self.timer = self.monitor.timer
        teacher_knn = self.knn_accuracy(self._embed_teacher)
        if teacher_knn is not None:
            tqdm.write(f"teacher k-NN top-1: {teacher_knn:.1f}%")
        self.progress = tqdm(
            total=self.total_steps, desc="distill", unit="step", disable=not self.show_progress
        )
        self.final_loss = float("nan")
        student_knn: float | None = None
        knn_history: list[dict[str, Any]] = []
        train_s = 0.0
        stream = iter(self.stream)
        self.student.train()
        self.monitor.restart_interval()
        try:
            for epoch in range(cfg.train.epochs):
                epoch_start = time.perf_counter()
                self._run_epoch(epoch, stream)
                train_s += time.perf_counter() - epoch_start
                verdict = self.monitor.end_epoch()
                if verdict is not None:
                    tqdm.write(f"epoch {epoch + 1}: {verdict.line()}")
                if epoch == cfg.train.epochs - 1 or (epoch + 1) % cfg.train.eval_every_n_epochs == 0:
                    student_knn = self.evaluate_student()
                    if student_knn is not None:
                        knn_history.append(
                            {"epoch": epoch + 1, "step": self.step, "student_knn_top1": student_knn}
                        )
                        tqdm.write(f"epoch {epoch + 1}: student k-NN top-1 {student_knn:.1f}%")
                    self.monitor.restart_interval()
        finally:
            self.progress.close()
            self.monitor.close()
            self.stream.close()
        save_safetensors_atomic(run_dir / "student.safetensors", self.student.backbone.state_dict())
        save_safetensors_atomic(run_dir / "projector.safetensors", self.student.projector.state_dict())
        train_images = self.total_steps * cfg.train.batch_size
        summary = {
            "steps": self.step,
            "epochs": cfg.train.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "final_loss": self.final_loss,
            "images_per_sec": train_images / train_s if train_s > 0 else None,
            "student_knn_top1": student_knn,
            "teacher_knn_top1": teacher_knn,
            "chance_top1": 100.0 / self.train_index.num_classes,
            "knn_history": knn_history,
            "num_classes": self.train_index.num_classes,
            "num_train_images": self.train_index.num_samples,
            "num_val_images": self.val_index.num_samples if self.val_index else 0,
            "teacher": cfg.model.teacher.name,
            "student": cfg.model.student.name,
            "device": str(self.device),
            "backend": cfg.data.backend,
            "precision": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32",
            "compiled_student": cfg.train.compile_student,
            "world_size": 1,
            **self.monitor.summary(),
            "wall_s": time.perf_counter() - run_start,
        }
        write_json_atomic(run_dir / "summary.json", summary)
        if summary["verdict"]:
            tqdm.write(f"run: {self.monitor.summary_line(summary)}")
        return summary

    def _run_epoch(self, epoch: int, stream) -> None:
        """One step-capped epoch: the next steps_per_epoch batches of the continuing stream."""
        log_every = self.cfg.train.log_every_n_steps
        sums: dict[str, torch.Tensor] = {}
        steps = images = 0
        for _ in range(self.steps_per_epoch):
            self.timer.start_step()
            batch = next(stream)
            self.timer.mark()  # data
            losses = self.train_step(batch)
            self.timer.end_step()
            for name, value in losses.items():
                sums[name] = sums[name] + value if name in sums else value
            steps += 1
            images += len(batch)
            self.progress.update(1)
            if self.step % log_every == 0 or self.step == self.total_steps:
                self._log_interval(epoch, sums, steps, images)
                sums, steps, images = {}, 0, 0

    def _log_interval(self, epoch: int, sums: dict[str, torch.Tensor], steps: int, images: int) -> None:
        """The only host reads of the loop: loss sums and stage events, once per log interval."""
        means = {name: float(value) / steps for name, value in sums.items()}
        row = self.monitor.log(self.step, epoch, means, steps, images, self.scheduler.get_last_lr()[0])
        self.final_loss = row["loss"]
        self.progress.set_postfix_str(progress_postfix(row), refresh=False)


def progress_postfix(row: dict[str, Any]) -> str:
    """loss, data/step ms, img/s, GPU utilisation and the interval's verdict, for the progress bar."""
    parts = [f"loss={row['loss']:.4f}"]
    if row.get("data_ms") is not None:
        parts.append(f"data/step={row['data_ms']:.0f}/{row['step_ms']:.0f}ms")
    else:
        parts.append(f"step={row['step_ms']:.0f}ms")
    parts.append(f"{row['img_per_s']:.0f}img/s")
    if row.get("gpu_util_pct") is not None:
        parts.append(f"gpu={row['gpu_util_pct']:.0f}%")
    if row.get("verdict"):
        parts.append(row["verdict"])
    return " ".join(parts)
