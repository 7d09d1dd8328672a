"""The distillation loop: step-capped epochs over one data stream, a frozen teacher, a compiled (DDP) student,
step checkpoints, exact resume, preemption and NaN handling."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dali_kd import checkpoint as ckpt
from dali_kd import distributed
from dali_kd.config import Config, dump_config
from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.loaders import make_train_stream
from dali_kd.data.prepare import prepare_data, write_quarantine
from dali_kd.distributed import DistInfo
from dali_kd.errors import TrainingStopped, UserError
from dali_kd.evaluation import KnnEvaluator
from dali_kd.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from dali_kd.losses import distillation_losses, multi_crop_losses
from dali_kd.models import (
    FrozenTeacher,
    ModelOutput,
    Student,
    StudentOutput,
    build_model,
    embed_dim,
    model_outputs,
    same_token_grid,
)
from dali_kd.preemption import Preempted, StopSignal
from dali_kd.runtime import autocast_dtype, resolve_device, seed_everything, warmup_cosine
from dali_kd.teacher_cache import TeacherCache, files_hash, parts_for
from dali_kd.telemetry.monitor import RunMonitor
from dali_kd.telemetry.timing import StepTimer

__all__ = ["Trainer", "resolve_device", "warmup_cosine"]


class Trainer:
    """Builds the data stream, the teacher and the student for one process (one rank), then `fit()` trains."""

    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        show_progress: bool = True,
        dist_info: DistInfo | None = None,
        resume_from: Path | None = None,
        allow_config_change: bool = False,
    ):
        self.cfg = cfg
        self.device = device
        self.dist = dist_info or DistInfo()
        self.show_progress = show_progress and self.dist.is_main
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        seed_everything(cfg.train.seed)

        # Every file is checked first (cached); the bad ones are set aside and listed in the run's quarantine.
        splits = prepare_data(cfg, self.dist.is_main, distributed.barrier)
        self.train_index, self.val_index = splits.train, splits.val
        self.scan_quarantine = splits.quarantine
        if self.dist.is_main:
            for message in splits.messages:
                print(message, flush=True)
        shard_samples = self.train_index.num_samples // self.dist.world_size
        if cfg.train.batch_size > shard_samples:
            raise UserError(
                f"train.batch_size={cfg.train.batch_size} is larger than each process's share of the data "
                f"({self.train_index.num_samples} usable images / {self.dist.world_size} processes = {shard_samples})"
            )
        self.evaluator = KnnEvaluator(
            cfg, self.train_index, self.val_index, device, self.dist.rank, self.dist.world_size
        )
        size = cfg.data.image_size
        teacher_classes = 1000 if cfg.model.teacher.num_classes is None else cfg.model.teacher.num_classes
        student_classes = cfg.model.student.num_classes
        student_classes = teacher_classes if student_classes is None else student_classes
        teacher = build_model(cfg.model.teacher, "teacher", size, teacher_classes)
        # With local crops the student also sees data.local_crop_size inputs (a ViT then interpolates its positions).
        backbone = build_model(
            cfg.model.student, "student", size, student_classes, any_size=cfg.train.use_local_crops
        )
        self.teacher_id = {"name": cfg.model.teacher.name, "weights_hash": ckpt.weights_hash(teacher)}
        self.teacher = FrozenTeacher(teacher.to(device), self.amp_dtype)
        self.use_patches = cfg.train.loss.patch_weight > 0 and same_token_grid(teacher, backbone)
        self.student = Student(
            backbone, embed_dim(teacher), cfg.model.projector_hidden_dim, with_patches=self.use_patches
        ).to(device)
        self.student_step = self._wrap_student()

        opt = cfg.train.optimizer
        decay = [p for p in self.student.parameters() if p.ndim > 1]
        no_decay = [p for p in self.student.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr,
            betas=opt.betas,
        )
        # Every rank takes the same number of steps: the smallest shard decides.
        self.steps_per_epoch = min(
            cfg.train.max_steps_per_epoch, max(1, shard_samples // cfg.train.batch_size)
        )
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, self.total_steps, opt.warmup_steps, opt.lr, opt.min_lr) / opt.lr,
        )
        # Where the run stands; a checkpoint carries all of it.
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.progress_state: dict[str, Any] = {
            "final_loss": float("nan"),
            "teacher_knn_top1": None,
            "student_knn_top1": None,
            "knn_history": [],
            "train_s": 0.0,
            "wall_s": 0.0,
            "skipped_steps": 0,
            "runtime_quarantine": [],
            "teacher_forward_batches": 0,
            "teacher_probe_batches": 0,
            "cache_hits": 0,
            "cache_fidelity_min": None,
            "cache_read_s": 0.0,
            "cache_read_bytes": 0,
            "cache_write_s": 0.0,
            "cache_write_bytes": 0,
        }
        self._probe_now = True  # the first replayed batch of every process start is probed
        self._fidelity: list[float] = []
        stream_state = None
        self.resumed_from: Path | None = None
        if resume_from is not None:
            state = ckpt.load(resume_from)
            ckpt.check_compatible(
                state, cfg, self.teacher_id, self.dist.world_size, resume_from, allow_config_change
            )
            self._load_state(state)
            stream_state = state["stream"][self.dist.rank]
            self.resumed_from = resume_from
        self.cache = self._open_cache() if cfg.train.cache_teacher_features else None
        # The file shuffle is seeded alike on every rank (disjoint shards); augmentations differ per rank.
        self.stream = make_train_stream(
            cfg,
            self.train_index,
            device,
            self.dist.rank,
            self.dist.world_size,
            state=stream_state,
            cache=self.cache,
        )
        # Replaced by the run monitor's timer in fit(); a disabled one lets train_step run on its own.
        self.timer = StepTimer(device, enabled=False)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def _wrap_student(self):
        """DDP wraps the student only (the teacher is frozen), then torch.compile compiles the wrapped student."""
        module = self.student
        if self.dist.is_distributed:
            loss = self.cfg.train.loss
            # Logits feed the loss only through the logit or label terms; otherwise DDP must expect unused params.
            uses_logits = loss.logit_weight > 0 or loss.label_weight > 0
            module = DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=not uses_logits,
            )
        return torch.compile(module) if self.cfg.train.compile_student else module

    # ---- checkpoint state ------------------------------------------------------------------------------------
    def _gather_runtime_quarantine(self) -> None:
        """Files any rank set aside since the last call: into the progress state and the run's quarantine file."""
        taken = self.stream.take_entries()
        new = [e for rank_entries in distributed.gather_objects(taken) for e in rank_entries]
        new = [{"split": "train", **e} for e in new]
        self.progress_state["runtime_quarantine"].extend(new)
        if new and self.dist.is_main:
            write_quarantine(self.run_dir / "quarantine.jsonl", new)
            tqdm.write(f"data: {len(new)} more file(s) set aside during training (see quarantine.jsonl)")

    def _collect_state(self) -> dict[str, Any] | None:
        """This run's full state at a step boundary (a collective: every rank calls it; rank 0 gets the dict)."""
        self._gather_runtime_quarantine()
        streams = distributed.gather_objects(self.stream.state_dict())
        rngs = distributed.gather_objects(ckpt.rng_state())
        if not self.dist.is_main:
            return None
        return {
            "format": ckpt.FORMAT_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "stream": streams,
            "rng": rngs,
            "progress": dict(self.progress_state),
            "world_size": self.dist.world_size,
            "config_hash": ckpt.config_hash(self.cfg),
            "config_fingerprint": ckpt.config_fingerprint(self.cfg),
            "teacher": self.teacher_id,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.progress_state.update(state["progress"])
        ckpt.set_rng_state(state["rng"][self.dist.rank])

    def _account_train_time(self) -> None:
        """Add the training time since the last mark (evaluation excluded) to the run's total."""
        if getattr(self, "_train_mark", None) is not None:
            now = time.perf_counter()
            self.progress_state["train_s"] += now - self._train_mark
            self._train_mark = None

    def save_checkpoint(self) -> Path | None:
        """Checkpoint now, unless the loss went non-finite since the last check (then stop: see _check_finite)."""
        self._check_finite()
        mid_epoch = getattr(self, "_train_mark", None) is not None
        self._account_train_time()
        self.progress_state["wall_s"] = self._wall_s()
        state = self._collect_state()
        path = self.checkpoints.save(state, self.step) if state is not None else None
        distributed.barrier()  # nobody moves on (or exits) before the file is complete
        self.last_checkpoint = path or self.checkpoints.latest()
        if mid_epoch:
            self._train_mark = time.perf_counter()
        return self.last_checkpoint

    # ---- one step --------------------------------------------------------------------------------------------
    def _open_cache(self) -> TeacherCache:
        """The teacher cache for this teacher, data and augmentation (rank 0 creates it, the others open it)."""
        cfg = self.cfg
        size = cfg.data.image_size
        probe = self.teacher(torch.zeros(1, 3, size, size, device=self.device), with_patches=self.use_patches)
        dtype = "float16" if cfg.train.cache_dtype == "fp16" else "float32"
        parts = parts_for(cfg.train.cache_outputs, probe, cfg.train.cache_logits_topk, dtype)
        identity = {
            "teacher": self.teacher_id,
            "image_size": size,
            "augment": cfg.data.augment.model_dump(mode="json"),
            "files": files_hash(self.train_index.files),
            "num_classes": 0 if probe.logits is None else int(probe.logits.shape[-1]),
            "mode": cfg.train.cache_mode,
        }
        views = 1 if cfg.train.cache_mode == "fixed" else cfg.train.cache_views_per_image
        args = (Path(cfg.train.teacher_feature_dir), identity, parts, self.train_index.num_samples, views)
        cache = (
            TeacherCache(*args, create=True, rebuild=cfg.train.cache_rebuild) if self.dist.is_main else None
        )
        distributed.barrier()
        if cache is None:
            cache = TeacherCache(*args, create=False)
        if cfg.train.cache_mode == "fixed" and self.dist.is_main:
            warnings.warn(
                "train.cache_mode=fixed: the student sees new random views but learns the targets of one fixed view "
                "per image (the original trainer's behaviour); replay keeps them consistent",
                stacklevel=2,
            )
        return cache

    def _teacher_targets(self, batch: Batch):
        """The teacher's outputs for this batch: from the cache (replayed views), else live (and stored)."""
        if self.cache is not None and batch.from_cache:
            ids = batch.host_ids if batch.host_ids is not None else batch.sample_ids.cpu().numpy()
            slots = batch.slots.numpy()
            start = time.perf_counter()
            out = self.cache.read(ids, slots, self.device)
            self.progress_state["cache_read_s"] += time.perf_counter() - start
            self.progress_state["cache_read_bytes"] += len(ids) * self.cache.nbytes_per_row()
            self.progress_state["cache_hits"] += len(ids)
            every = self.cfg.train.cache_probe_every_n_steps
            if self._probe_now or (every and (self.step + 1) % every == 0):
                self._probe(batch, out)
            return out
        # Multi-crop: the teacher sees the global crops only, view-major ([G*B, ...]: crop 0 of every sample first).
        out = self.teacher(view_major(batch.global_crops()), with_patches=self.use_patches)
        self.progress_state["teacher_forward_batches"] += 1
        if self.cache is not None and batch.store is not None and bool(batch.store.any()):
            mask = batch.store.numpy()
            ids = batch.sample_ids.cpu().numpy()[mask]
            picked = torch.from_numpy(mask).to(self.device)
            rows = ModelOutput(
                *(None if t is None else t[picked] for t in (out.pooled, out.logits, out.patch_tokens))
            )
            view = ViewRecord(
                *(getattr(batch.view, f)[picked] for f in ("crop_anchor", "crop_shape", "flip", "jitter"))
            )
            start = time.perf_counter()
            self.cache.write(ids, batch.slots.numpy()[mask], rows, view)
            self.progress_state["cache_write_s"] += time.perf_counter() - start
            self.progress_state["cache_write_bytes"] += len(ids) * self.cache.nbytes_per_row()
        return out

    def _probe(self, batch: Batch, cached) -> None:
        """Run the teacher on the replayed batch: its outputs must match the cached ones (fp16 rounding aside)."""
        self._probe_now = False
        live = self.teacher(batch.images, with_patches=self.use_patches)
        self.progress_state["teacher_probe_batches"] += 1
        a, b = (live.pooled, cached.pooled) if cached.pooled is not None else (live.logits, cached.logits)
        cosine = float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())
        self._fidelity.append(cosine)
        worst = self.progress_state["cache_fidelity_min"]
        self.progress_state["cache_fidelity_min"] = cosine if worst is None else min(worst, cosine)
        if cosine < 0.999 and self.dist.is_main:
            message = (
                f"WARNING: teacher cache fidelity {cosine:.4f} < 0.999 at step {self.step + 1}: the cached targets "
                "do not match what the teacher gives on these views"
                + (" (expected with train.cache_mode=fixed)" if self.cfg.train.cache_mode == "fixed" else "")
            )
            tqdm.write(message)
            warnings.warn(message, stacklevel=2)

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Teacher targets, student forward/backward, clipped AdamW step; losses stay on the device."""
        teacher_out = self._teacher_targets(batch)
        self.timer.mark()  # teacher
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            if batch.multi_crop:
                local_images = None if batch.local_images is None else view_major(batch.local_images)
                student_out, local_out = self.student_step(view_major(batch.images), local_images)
            else:
                student_out, local_out = self.student_step(batch.images)
        if batch.multi_crop:
            losses = self._multi_crop_losses(batch, teacher_out, student_out, local_out)
        else:
            losses = distillation_losses(
                self.cfg.train.loss,
                student_pooled=student_out.projected,
                teacher_pooled=teacher_out.pooled,
                student_logits=student_out.raw.logits,
                teacher_logits=teacher_out.logits
                if self._logits_match(student_out.raw, teacher_out)
                else None,
                student_patches=student_out.patches,
                teacher_patches=teacher_out.patch_tokens,
                labels=batch.labels,
            )
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        finite = torch.isfinite(losses["loss"])
        if self.cfg.train.on_nonfinite_loss == "skip" and distributed.any_rank(not bool(finite), self.device):
            # Skip mode reads the loss every step (one sync): the update must not happen at all.
            self._skip_step()
        else:
            # Stop mode stays asynchronous: the flag is read at log steps and before every checkpoint.
            self._nonfinite |= ~finite
            if self.cfg.train.optimizer.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.train.optimizer.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        self.timer.mark()  # student
        self.step += 1
        return {k: v.detach() for k, v in losses.items()}

    def _multi_crop_losses(
        self,
        batch: Batch,
        teacher_out: ModelOutput,
        student_out: StudentOutput,
        local_out: StudentOutput | None,
    ) -> dict[str, torch.Tensor]:
        """Per-pair distillation of every student crop toward the teacher's global crops (losses.multi_crop_losses)."""
        size = len(batch)
        num_global = batch.images.shape[1]

        def by_view(t: torch.Tensor | None) -> torch.Tensor | None:  # [V*B, ...] → [V, B, ...]
            return None if t is None else t.unflatten(0, (-1, size))

        def all_views(  # globals then locals: [V, B, ...]
            global_part: torch.Tensor | None, local_part: torch.Tensor | None
        ) -> torch.Tensor | None:
            if global_part is None or local_part is None:
                return by_view(global_part)
            return torch.cat([by_view(global_part), by_view(local_part)])

        with_logits = self._logits_match(student_out.raw, teacher_out)
        return multi_crop_losses(
            self.cfg.train.loss,
            num_global,
            student_pooled=all_views(
                student_out.projected, None if local_out is None else local_out.projected
            ),
            teacher_pooled=by_view(teacher_out.pooled),
            student_logits=all_views(
                student_out.raw.logits, None if local_out is None else local_out.raw.logits
            ),
            teacher_logits=by_view(teacher_out.logits) if with_logits else None,
            student_patches=by_view(student_out.patches),
            teacher_patches=by_view(teacher_out.patch_tokens),
            labels=batch.labels,
        )

    def _skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.progress_state["skipped_steps"] += 1
        skipped = self.progress_state["skipped_steps"]
        tqdm.write(f"warning: non-finite loss at step {self.step + 1}: step skipped ({skipped} so far)")
        if skipped > self.cfg.train.max_skipped_steps:
            raise TrainingStopped(
                f"loss was non-finite in {skipped} steps (train.max_skipped_steps="
                f"{self.cfg.train.max_skipped_steps}); last good checkpoint: {self._last_checkpoint_text()}"
            )

    def _check_finite(self) -> None:
        """All ranks agree: if any saw a NaN/Inf loss since the last check, every rank stops."""
        if distributed.any_rank(bool(self._nonfinite), self.device):
            raise TrainingStopped(
                f"loss became NaN/Inf before step {self.step} (train.on_nonfinite_loss=stop); "
                f"last good checkpoint: {self._last_checkpoint_text()} — resume from it with a lower "
                "train.optimizer.lr, or set train.on_nonfinite_loss=skip"
            )

    def _last_checkpoint_text(self) -> str:
        latest = getattr(self, "last_checkpoint", None)
        return str(latest) if latest else "none yet"

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
        return self.evaluator.accuracy(embed)

    def evaluate_student(self) -> float | None:
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                return self.knn_accuracy(self._embed_student)
        finally:
            self.student.train(was_training)

    # ---- the run ---------------------------------------------------------------------------------------------
    def _wall_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._run_start

    def fit(self, run_dir: Path, nvml: Any | None = None) -> dict[str, Any]:
        """Train to cfg.train.epochs step-capped epochs from wherever the run stands; rank 0 writes run_dir.

        Raises Preempted (after a checkpoint) when SIGUSR1/SIGTERM arrives, TrainingStopped on a NaN loss.
        """
        cfg = self.cfg
        self._run_start = time.perf_counter()
        self._wall_before = self.progress_state["wall_s"]
        self.run_dir = run_dir
        self.checkpoints = ckpt.CheckpointDir(run_dir, cfg.train.keep_last_checkpoints)
        self.last_checkpoint = self.resumed_from
        if self.dist.is_main:
            write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
            # The scan's verdicts, then what the run itself set aside (carried over by a resumed run).
            write_text_atomic(run_dir / "quarantine.jsonl", "")
            write_quarantine(
                run_dir / "quarantine.jsonl", self.scan_quarantine + self.progress_state["runtime_quarantine"]
            )
            # Rows a killed process wrote after the state this run starts from (all of them on a fresh start).
            truncate_metrics(run_dir / "metrics.jsonl", self.step)
        self.monitor = RunMonitor(
            run_dir,
            self.device,
            # Rank 0 measures and writes; the other ranks' rows would only repeat it.
            enabled=cfg.train.telemetry and self.dist.is_main,
            tensorboard=cfg.train.tensorboard and self.dist.is_main,
            nvml=nvml,
            announce=self.dist.is_main,
            write=self.dist.is_main,
        )
        self.timer = self.monitor.timer
        stop = StopSignal()
        self.progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="distill",
            unit="step",
            disable=not self.show_progress,
        )
        try:
            if self.progress_state["teacher_knn_top1"] is None:
                self.progress_state["teacher_knn_top1"] = self.knn_accuracy(self._embed_teacher)
                if self.progress_state["teacher_knn_top1"] is not None and self.dist.is_main:
                    tqdm.write(f"teacher k-NN top-1: {self.progress_state['teacher_knn_top1']:.1f}%")
            stream = iter(self.stream)
            self.student.train()
            self.monitor.restart_interval()
            while self.epoch < cfg.train.epochs:
                self._train_mark = time.perf_counter()
                self._run_epoch(stream, stop)
                self._account_train_time()
                self._end_epoch()
        finally:
            stop.restore()
            self.progress.close()
            self.monitor.close()
            self.stream.close()
        return self._finish(run_dir)

    def _run_epoch(self, stream, stop: StopSignal) -> None:
        """The rest of the current step-capped epoch: the next batches of the continuing stream."""
        cfg = self.cfg.train
        sums: dict[str, torch.Tensor] = {}
        steps = images = 0
        # Ranks agree on a stop signal at these steps (every step in a single process: reading a flag is free).
        agree_every = 1 if not self.dist.is_distributed else min(cfg.log_every_n_steps, 10)
        while self.step_in_epoch < self.steps_per_epoch:
            self.timer.start_step()
            batch = next(stream)
            self.timer.mark()  # data
            losses = self.train_step(batch)
            self.timer.end_step()
            self.step_in_epoch += 1
            if not (cfg.on_nonfinite_loss == "skip" and not torch.isfinite(losses["loss"])):
                for name, value in losses.items():
                    sums[name] = sums[name] + value if name in sums else value
                steps += 1
            images += len(batch)
            self.progress.update(1)
            if self.step % cfg.log_every_n_steps == 0 or self.step == self.total_steps:
                self._log_interval(sums, steps, images)
                sums, steps, images = {}, 0, 0
            if self.step % agree_every == 0 and distributed.any_rank(stop.received is not None, self.device):
                raise Preempted(self.save_checkpoint(), stop.received or "stop signal on another rank")
            last_of_epoch = self.step_in_epoch == self.steps_per_epoch
            if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0 and not last_of_epoch:
                self.save_checkpoint()

    def _end_epoch(self) -> None:
        cfg = self.cfg.train
        verdict = self.monitor.end_epoch()
        if verdict is not None and self.dist.is_main:
            tqdm.write(f"epoch {self.epoch + 1}: {verdict.line(advice=False)}")
        if self.epoch == cfg.epochs - 1 or (self.epoch + 1) % cfg.eval_every_n_epochs == 0:
            knn = self.evaluate_student()
            if knn is not None:
                self.progress_state["student_knn_top1"] = knn
                self.progress_state["knn_history"].append(
                    {"epoch": self.epoch + 1, "step": self.step, "student_knn_top1": knn}
                )
                if self.dist.is_main:
                    tqdm.write(f"epoch {self.epoch + 1}: student k-NN top-1 {knn:.1f}%")
            self.monitor.restart_interval()
        self.epoch += 1
        self.step_in_epoch = 0
        self.save_checkpoint()

    def _log_interval(self, sums: dict[str, torch.Tensor], steps: int, images: int) -> None:
        """The only host reads of the loop: loss sums (averaged over ranks) and stage events, once per interval."""
        self._check_finite()
        names = sorted(sums)
        if names:
            stacked = distributed.all_reduce(torch.stack([sums[n].float() for n in names]))
            values = (stacked / (max(1, steps) * self.dist.world_size)).tolist()
            means = dict(zip(names, values, strict=True))
        else:  # every step of the interval was skipped
            means = {"loss": float("nan")}
        if self._fidelity:
            means["cache_fidelity_cosine"] = min(self._fidelity)
            self._fidelity = []
        images *= self.dist.world_size
        row = self.monitor.log(self.step, self.epoch, means, steps, images, self.scheduler.get_last_lr()[0])
        self.progress_state["final_loss"] = row["loss"]
        self.progress.set_postfix_str(progress_postfix(row), refresh=False)

    def _cache_summary(self) -> dict[str, Any]:
        progress = self.progress_state
        read_s, write_s = progress["cache_read_s"], progress["cache_write_s"]
        return {
            "cache_mode": self.cfg.train.cache_mode,
            "cache_hits": progress["cache_hits"],
            "cache_rows_done": self.cache.rows_done(),
            "cache_rows_total": self.cache.num_samples * self.cache.num_views,
            "teacher_probe_batches": progress["teacher_probe_batches"],
            "cache_fidelity_min": progress["cache_fidelity_min"],
            "cache_read_mb_s": progress["cache_read_bytes"] / 2**20 / read_s if read_s > 0 else None,
            "cache_write_mb_s": progress["cache_write_bytes"] / 2**20 / write_s if write_s > 0 else None,
        }

    def _finish(self, run_dir: Path) -> dict[str, Any]:
        self._gather_runtime_quarantine()
        cfg = self.cfg
        progress = self.progress_state
        summary = {
            "steps": self.step,
            "epochs": cfg.train.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "final_loss": progress["final_loss"],
            "images_per_sec": (
                self.step * cfg.train.batch_size * self.dist.world_size / progress["train_s"]
                if progress["train_s"] > 0
                else None
            ),
            "student_knn_top1": progress["student_knn_top1"],
            "teacher_knn_top1": progress["teacher_knn_top1"],
            "chance_top1": 100.0 / self.train_index.num_classes,
            "knn_history": progress["knn_history"],
            "num_classes": self.train_index.num_classes,
            "num_train_images": self.train_index.num_samples,
            "num_val_images": self.val_index.num_samples if self.val_index else 0,
            "teacher": cfg.model.teacher.name,
            "student": cfg.model.student.name,
            "device": str(self.device),
            "backend": cfg.data.backend,
            "precision": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32",
            "compiled_student": cfg.train.compile_student,
            "world_size": self.dist.world_size,
            "skipped_steps": progress["skipped_steps"],
            "quarantined_files": len(self.scan_quarantine) + len(progress["runtime_quarantine"]),
            "teacher_forward_batches": progress["teacher_forward_batches"],
            **(self._cache_summary() if self.cache is not None else {}),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            **self.monitor.summary(),
            "wall_s": self._wall_s(),
        }
        if self.dist.is_main:
            save_safetensors_atomic(run_dir / "student.safetensors", self.student.backbone.state_dict())
            save_safetensors_atomic(run_dir / "projector.safetensors", self.student.projector.state_dict())
            write_json_atomic(run_dir / "summary.json", summary)
            if summary["verdict"]:
                tqdm.write(f"run: {self.monitor.summary_line(summary)}")
        distributed.barrier()
        return summary


def view_major(crops: torch.Tensor) -> torch.Tensor:
    """[B, V, ...] crops → [V*B, ...], crop 0 of every sample first (how DINO batches its crops)."""
    return crops.transpose(0, 1).flatten(0, 1)


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
