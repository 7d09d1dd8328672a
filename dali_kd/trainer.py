"""The distillation loop: step-capped epochs over one data stream, a frozen teacher, a compiled student."""

from __future__ import annotations

import json
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


class MetricsLog:
    """metrics.jsonl: one JSON object per log interval, flushed at once so a live run can be read."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the whole run, closed by close()

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.file.close()


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

    # ---- one step --------------------------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Teacher targets, student forward/backward, clipped AdamW step; losses stay on the device."""
        teacher_out = self.teacher(batch.images, with_patches=self.use_patches)
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
    def fit(self, run_dir: Path) -> dict[str, Any]:
        """Train for cfg.train.epochs step-capped epochs; writes config, metrics, summary and weights to run_dir."""
        cfg = self.cfg
        self.run_dir = run_dir
        run_start = time.perf_counter()
        write_text_atomic(self.run_dir / "config.yaml", dump_config(cfg))
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        teacher_knn = self.knn_accuracy(self._embed_teacher)
        if teacher_knn is not None:
            tqdm.write(f"teacher k-NN top-1: {teacher_knn:.1f}%")
        stream = iter(self.stream)
        self.student.train()
        progress = tqdm(total=self.total_steps, desc="distill", unit="step", disable=not self.show_progress)
        sums: dict[str, torch.Tensor] = {}
        interval = {"steps": 0, "images": 0, "data_s": 0.0, "start": time.perf_counter()}
        train_images, train_s = 0, 0.0
        final_loss = float("nan")
        student_knn: float | None = None
        knn_history: list[dict[str, Any]] = []
        try:
            for epoch in range(cfg.train.epochs):
                epoch_start = time.perf_counter()
                for _ in range(self.steps_per_epoch):
                    wait_start = time.perf_counter()
                    batch = next(stream)
                    interval["data_s"] += time.perf_counter() - wait_start
                    losses = self.train_step(batch)
                    for name, value in losses.items():
                        sums[name] = sums[name] + value if name in sums else value
                    interval["steps"] += 1
                    interval["images"] += len(batch)
                    progress.update(1)
                    if self.step % cfg.train.log_every_n_steps == 0 or self.step == self.total_steps:
                        # The only host sync of the loop: loss sums are read once per log interval.
                        row = self._log_row(epoch, sums, interval)
                        metrics.write(row)
                        final_loss = row["loss"]
                        progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                        sums = {}
                        interval = {"steps": 0, "images": 0, "data_s": 0.0, "start": time.perf_counter()}
                train_s += time.perf_counter() - epoch_start
                train_images += self.steps_per_epoch * cfg.train.batch_size
                last = epoch == cfg.train.epochs - 1
                if last or (epoch + 1) % cfg.train.eval_every_n_epochs == 0:
                    student_knn = self.evaluate_student()
                    if student_knn is not None:
                        knn_history.append(
                            {"epoch": epoch + 1, "step": self.step, "student_knn_top1": student_knn}
                        )
                        tqdm.write(f"epoch {epoch + 1}: student k-NN top-1 {student_knn:.1f}%")
                        interval["start"] = time.perf_counter()
        finally:
            progress.close()
            metrics.close()
            self.stream.close()
        save_safetensors_atomic(self.run_dir / "student.safetensors", self.student.backbone.state_dict())
        save_safetensors_atomic(self.run_dir / "projector.safetensors", self.student.projector.state_dict())
        summary = {
            "steps": self.step,
            "epochs": cfg.train.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "final_loss": final_loss,
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
            "wall_s": time.perf_counter() - run_start,
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def _log_row(self, epoch: int, sums: dict[str, torch.Tensor], interval: dict[str, Any]) -> dict[str, Any]:
        steps = max(1, interval["steps"])
        elapsed = time.perf_counter() - interval["start"]
        row: dict[str, Any] = {"step": self.step, "epoch": epoch}
        row.update({name: float(value) / steps for name, value in sums.items()})
        row["lr"] = self.scheduler.get_last_lr()[0]
        row["img_per_s"] = interval["images"] / elapsed if elapsed > 0 else 0.0
        row["data_ms"] = 1000 * interval["data_s"] / steps
        row["step_ms"] = 1000 * elapsed / steps
        return row
