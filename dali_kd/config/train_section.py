"""The train section: the run's length, seed, device and outputs, the teacher cache, and its optimizer
(train.optimizer) and loss (train.loss) sub-sections; every key declared once, with its type, range, default and
meaning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dali_kd.config.section import Section, free_on_resume


class OptimizerConfig(Section):
    name: str = Field(
        "adamw",
        description="timm optimizer (timm.optim.list_optimizers(): adamw, lamb, lion, sgd, ...); a lookahead_ "
        "prefix wraps it in Lookahead",
    )
    lr: float = Field(
        5e-4,
        gt=0,
        description="Peak learning rate, reached at the end of warm-up (for lr_scale_batch, if set)",
    )
    min_lr: float = Field(
        1e-6, ge=0, description="Learning rate of the last step, where the cosine ends (never scaled)"
    )
    weight_decay: float = Field(
        0.05,
        ge=0,
        description="Weight decay; not on biases, norms and what the student names in no_weight_decay() "
        "(a ViT's pos_embed, cls_token)",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="Betas of Adam-style optimizers")
    warmup_steps: int = Field(
        500, ge=0, description="Linear warm-up from 0 to lr over these steps, then the cosine decay"
    )
    grad_clip: float | None = Field(3.0, gt=0, description="Clip the gradient norm to this; null disables")
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise lr decay (timm/BEiT): each layer below the top gets this factor more; null: off",
    )
    lr_scale_batch: int | None = Field(
        None,
        ge=1,
        description="lr is given for this global batch; the run scales it to batch_size × processes; null: as is",
    )
    lr_scale_rule: Literal["linear", "sqrt"] = Field(
        "linear", description="How lr_scale_batch scales lr: linear (DINO) or square root of the batch ratio"
    )
    fused: Literal["auto"] | bool = free_on_resume(
        "auto",
        description="Run the optimizer as torch's fused kernels (one launch for all parameters): auto: on CUDA "
        "for adam and adamw; true: wherever torch has a fused version of the optimizer (adam, adamw, sgd, ...); "
        "false: torch's default (foreach) implementation",
    )


class LossConfig(Section):
    feature: Literal["cosine", "mse", "cosine+mse", "cosine+smooth_l1"] = Field(
        "cosine",
        description="Feature distillation loss (pooled and tokens); cosine+smooth_l1 is RADIO's, for teachers "
        "whose feature scale matters",
    )
    feature_weight: float = Field(1.0, ge=0, description="Weight of the pooled-feature loss")
    patch_weight: float = Field(
        0.0, ge=0, description="Weight of the patch-token loss (ViT pairs, same token grid)"
    )
    logit_weight: float = Field(
        1.0, ge=0, description="Weight of the KL logit loss (same-size classifier heads)"
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the KL logit loss")
    label_weight: float = Field(0.0, ge=0, description="Weight of cross-entropy on the true labels")
    # Multi-crop pairing: which teacher output each student view is pulled toward.
    global_pairing: Literal["same", "cross", "all"] = Field(
        "same",
        description="Multi-crop: a student global crop learns the teacher on the same crop, the other globals "
        "(cross, DINO), or all globals",
    )
    local_weight: float = Field(
        1.0, ge=0, description="Multi-crop: weight of a local-crop pair relative to a global pair"
    )


class TrainConfig(Section):
    # The original trainer's keys, with their original meaning.
    batch_size: int = Field(
        256, ge=1, description="Images per batch on each GPU/process (a step takes grad_accum_steps batches)"
    )
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Gradient accumulation: batches (micro-batches) of batch_size per step, i.e. per optimizer "
        "update, each loss scaled by 1/N: a step trains on batch_size × N images per process; the lr schedule, "
        "EMA, logging and checkpoints count steps",
    )
    max_steps_per_epoch: int = Field(
        500, ge=1, description="An epoch ends after this many steps (the stream continues)"
    )
    use_local_crops: bool = Field(
        False,
        description="DINO-style multi-crop: global crops for teacher and student, local crops for the student",
    )
    cache_teacher_features: bool = Field(
        False,
        description="Cache the teacher's outputs per view (DALI backend); with several teachers, every one's",
    )
    teacher_feature_dir: str | None = Field(
        None, description="Where the teacher cache lives (needed with the cache)"
    )
    cache_mode: Literal["replay", "fixed"] = Field(
        "replay", description="replay: students see the stored views; fixed: the original's one-view targets"
    )
    cache_views_per_image: int = Field(
        4, ge=1, le=64, description="Views stored per image (the first K passes)"
    )
    cache_outputs: list[Literal["pooled", "logits", "tokens"]] = Field(
        ["pooled", "logits"],
        min_length=1,
        description="Teacher outputs stored: pooled embedding, logits, patch tokens",
    )
    cache_logits_topk: int | None = Field(
        None, ge=1, description="Store only the top-k logits; null: all of them"
    )
    cache_dtype: Literal["fp16", "fp32"] = Field(
        "fp16", description="Storage precision of the cached outputs"
    )
    cache_probe_every_n_steps: int | None = Field(
        200,
        ge=1,
        description="Fidelity probe: run the teacher on a replayed batch every N steps; null: never",
    )
    cache_rebuild: bool = Field(False, description="Rebuild a cache that was built for something else")
    compile_student: Literal["auto"] | bool = Field(
        "auto",
        description="torch.compile the student's forward together with its distillation losses (the teacher has "
        "its own switch, model.teacher.compile); auto: on CUDA, off on the CPU, where the first compile (about a "
        "minute of CPU for a ResNet) outweighs what it saves in a short run (benchmarks/first_use.py)",
    )
    cpu_threads: int | None = free_on_resume(
        None,
        ge=1,
        le=1024,
        description="Threads for torch's CPU ops and DALI's CPU workers (data.dali_threads is capped by it); null: "
        "the CPUs this process may use (affinity, cgroup quota) less those other processes keep busy at the start",
    )
    num_workers: int = free_on_resume(4, ge=0, description="DataLoader workers of the torchvision backend")
    persistent_workers: bool = free_on_resume(
        False, description="Keep torchvision DataLoader workers between epochs"
    )
    # What a real run needs besides.
    epochs: int = Field(100, ge=1, description="Number of (step-capped) epochs")
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seed for shuffling, augmentations and initialisation (0 to 2**32-1)",
    )
    device: Literal["auto", "cuda", "cpu"] = free_on_resume(
        "auto", description="auto: cuda when available, else cpu"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    output_dir: str = free_on_resume("runs", description="Run directories are created under this folder")
    run_name: str | None = free_on_resume(
        None, description="Run directory name (one folder inside output_dir); null: <student>-<date>-<time>"
    )
    log_every_n_steps: int = free_on_resume(50, ge=1, description="One metrics.jsonl row per this many steps")
    save_every_n_steps: int | None = free_on_resume(
        1000, ge=1, description="Checkpoint every N steps (and at each epoch end); null: epoch ends only"
    )
    keep_last_checkpoints: int = free_on_resume(
        3, ge=1, description="Checkpoints kept in <run>/checkpoints (oldest deleted)"
    )
    on_nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop", description="NaN/Inf loss: stop (pointing at the last good checkpoint) or skip the step"
    )
    max_skipped_steps: int = free_on_resume(
        10, ge=0, description="With on_nonfinite_loss=skip: stop after this many skips"
    )
    telemetry: bool = free_on_resume(
        True, description="Per-stage timing, GPU (NVML) and process telemetry in metrics rows"
    )
    tensorboard: bool = free_on_resume(
        False, description="Also write the metrics as TensorBoard scalars (run_dir/tensorboard)"
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the student's weights with this decay per step "
        "(timm ModelEmaV3, e.g. 0.9998); evaluated beside the student and saved as student_ema.safetensors; "
        "null: off",
    )
    ema_warmup: bool = Field(
        True,
        description="With ema_decay: let the EMA's decay grow toward ema_decay over the first steps (timm's "
        "warm-up: 1 - (1 + step)^(-2/3)), so that a short run's average is not stuck near the initialisation",
    )
    eval_head: bool = free_on_resume(
        True,
        description="Also report the student's and the teacher's top-1 through their classifier heads, for a "
        "head with as many outputs as the data has classes (class folders in sorted order, as ImageNet's)",
    )
    knn_k: int = free_on_resume(20, ge=1, description="Neighbours in the k-NN evaluation")
    knn_bank_size: int | None = free_on_resume(
        None, ge=1, description="Training images (evenly spread) in the k-NN bank; null: all of them"
    )
    eval_every_n_epochs: int = free_on_resume(
        1, ge=1, description="k-NN evaluation every N epochs (and after the last)"
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, v: str | None) -> str | None:
        # A name that is a path would put the run (config, checkpoints, weights) outside output_dir.
        if v is not None and (v in ("", ".", "..") or "/" in v or "\\" in v or "\0" in v):
            raise ValueError("must be one folder name inside train.output_dir (no '/', not '.' or '..')")
        return v
