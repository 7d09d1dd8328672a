"""The config's sections (data, train, model): every key declared once, with its type, range, default and meaning.

pydantic rejects unknown keys, wrong types and out-of-range values; `free_on_resume` marks the keys a resumed run
may change (how the run is observed, not what it computes).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dali_kd.pipelines.params import IMAGENET_MEAN, IMAGENET_STD, DecodeParams

# The config files ship inside the package (dali_kd/configs links to the repository's configs/ folder, and a wheel
# carries copies), so a plain `pip install` finds them as an editable install does.
CONFIG_DIR = Path(str(resources.files("dali_kd").joinpath("configs"))).resolve()
DEMO_CONFIG_DIR = CONFIG_DIR / "demo"
SECTION_FILES = {"data": "data_config.yaml", "train": "train_config_kd.yaml", "model": "model_config_kd.yaml"}

FloatRange = tuple[float, float]
RGB = tuple[float, float, float]


def free_on_resume(default: Any, **kwargs: Any) -> Any:
    """A Field that a resumed run may change freely: it changes how the run is observed, not what it does."""
    return Field(default, json_schema_extra={"resume": "free"}, **kwargs)


class Section(BaseModel):
    # extra="forbid": a typo is an error, never a silently ignored key. allow_inf_nan=False: no float setting
    # (rates, weights, probabilities, ranges, normalisation) means anything at .inf or .nan.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_area_range(v: FloatRange) -> FloatRange:
    if not 0 < v[0] <= v[1] <= 1:
        raise ValueError("need 0 < low <= high <= 1")
    return v


class AugmentConfig(Section):
    crop_scale: FloatRange = Field((0.08, 1.0), description="Random resized crop: area fraction range")
    crop_ratio: FloatRange = Field(
        (3 / 4, 4 / 3), description="Random resized crop: aspect ratio (w/h) range"
    )
    flip_prob: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip")
    jitter_prob: float = Field(0.8, ge=0, le=1, description="Probability that colour jitter is applied")
    brightness: float = Field(0.4, ge=0, le=1, description="Brightness factor drawn from [1-s, 1+s]")
    contrast: float = Field(0.4, ge=0, le=1, description="Contrast factor drawn from [1-s, 1+s]")
    saturation: float = Field(0.2, ge=0, le=1, description="Saturation factor drawn from [1-s, 1+s]")
    hue: float = Field(
        0.1, ge=0, le=0.5, description="Hue shift drawn from [-h, h], in turns of the colour wheel"
    )
    mean: RGB = Field(IMAGENET_MEAN, description="Normalisation mean (RGB, 0-1 scale)")
    std: RGB = Field(IMAGENET_STD, description="Normalisation std (RGB, 0-1 scale)")
    # Function matching (Beyer et al., CVPR 2022): a mixed image shown to the teacher and the student alike, after
    # the four augmentations above; done on the device by dali_kd.data.mixing, not by the pipelines.
    mix: Literal["none", "mixup", "cutmix", "both"] = Field(
        "none",
        description="Mix each image with another of its batch after augmentation, for teacher and student alike: "
        "mixup (a blend), cutmix (a box pasted from the partner), both (each mixed sample picks one of the two "
        "with probability 0.5) or none",
    )
    mix_alpha: float = Field(
        0.8, gt=0, description="mixup: the blend weight λ of the image itself is drawn from Beta(α, α)"
    )
    cutmix_alpha: float = Field(
        1.0, gt=0, description="cutmix: the kept area fraction λ is drawn from Beta(α, α) (box area 1 - λ)"
    )
    mix_prob: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Probability that a sample is mixed (per sample; the others pass unchanged)",
    )

    @field_validator("crop_scale")
    @classmethod
    def _check_scale(cls, v: FloatRange) -> FloatRange:
        return _check_area_range(v)

    @field_validator("crop_ratio")
    @classmethod
    def _check_ratio(cls, v: FloatRange) -> FloatRange:
        if not 0 < v[0] <= v[1]:
            raise ValueError("need 0 < low <= high")
        return v

    @field_validator("std")
    @classmethod
    def _check_std(cls, v: RGB) -> RGB:
        if any(s <= 0 for s in v):
            raise ValueError("every entry must be > 0")
        return v


# The AugmentConfig keys of the mixing step (the rest are the DALI/torchvision augmentations: AugmentParams).
MIX_KEYS = frozenset({"mix", "mix_alpha", "cutmix_alpha", "mix_prob"})


class DataConfig(Section):
    root: str = Field(description="Training images: an ImageFolder tree root/<class>/<image>")
    file_list: str | None = Field(
        None,
        description="Train on the files listed here (one <class>/<image> path per line, relative to root)",
    )
    val_root: str | None = free_on_resume(
        None, description="Held-out images (same classes) for k-NN evaluation; null skips it"
    )
    backend: Literal["dali", "torchvision"] = Field(
        "dali", description="dali (GPU or DALI CPU) or torchvision (PIL)"
    )
    format: Literal["folder", "shards"] = Field(
        "folder",
        description="folder: image files (ImageFolder tree); shards: tar shards made by python -m dali_kd.shard "
        "(data.root and data.val_root then name a shard folder or its manifest.json)",
    )
    shuffle_buffer: int = Field(
        1024,
        ge=1,
        description="data.format shards: samples DALI's webdataset reader shuffles in a buffer (on top of a new "
        "shard order every pass); larger mixes more and holds more encoded images in host memory",
    )
    image_size: int = Field(
        224,
        ge=16,
        le=4096,
        description="Side of the student's input: the square training and eval crops, pixels",
    )
    eval_resize: int = Field(
        256, ge=16, le=4096, description="Eval: shorter side resized to this before the centre crop"
    )
    teacher_image_size: int | None = Field(
        None,
        ge=16,
        le=4096,
        description="Side of the teacher's input, pixels (e.g. a 224 px teacher and a 160 px student); null: "
        "data.image_size. The pipeline cuts each view once at the larger size; each model gets it resized "
        "(bilinear, antialiased) on the device, so both see the same view",
    )
    scan: Literal["header", "full", "off"] = Field(
        "header", description="Check every file before training: header/structure, full DALI decode, or off"
    )

    @field_validator("scan", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML reads a bare `off` as false (and `on` as true): take them as the words the user wrote.
        return {False: "off", True: "header"}.get(v, v) if isinstance(v, bool) else v

    scan_dir: str | None = Field(
        None, description="Where scans and their cache go; null: ~/.cache/dali_kd/scans/"
    )
    max_image_pixels: int = Field(100_000_000, ge=1, description="Images with more pixels are set aside")
    max_runtime_quarantine: int = Field(
        100, ge=0, description="Files set aside during a run (decode failures) before the run stops"
    )
    dali_threads: int = free_on_resume(4, ge=1, le=256, description="DALI CPU worker threads per process")
    prefetch_batches: int = free_on_resume(
        2, ge=1, le=16, description="Batches DALI prepares ahead (live or replayed)"
    )
    # Decoder choices (DALI backend). decode and output_dtype change the pixels a step sees (slightly), so a resume
    # keeps them; the GPU decoder's tuning only changes how fast the same pixels come.
    decode: Literal["window", "full"] = Field(
        "window",
        description="DALI one-view training: decode only the crop window (window: the decode alone measured 1.24x "
        "faster on 2 CPU cores) or the whole image and cut the view from it (full); views differ slightly at "
        "the window's edges; multi-crop and eval always decode the whole image",
    )
    hw_decoder_load: float = free_on_resume(
        DecodeParams.hw_decoder_load,
        ge=0,
        le=1,
        description="GPU decode: share of the JPEGs sent to the hardware JPEG decoder (A100/H100), the rest go "
        "to CUDA + CPU threads; DALI's default; ignored on the CPU",
    )
    device_memory_padding: int = free_on_resume(
        DecodeParams.device_memory_padding,
        ge=0,
        description="GPU decode: bytes of GPU memory preallocated per DALI thread for nvJPEG (avoids regrowing "
        "for a large image; costs that memory per thread); 0: none; DALI's default; ignored on the CPU",
    )
    host_memory_padding: int = free_on_resume(
        DecodeParams.host_memory_padding,
        ge=0,
        description="GPU decode: bytes of pinned host memory preallocated for nvJPEG, two buffers per DALI thread; "
        "0: none; DALI's default; ignored on the CPU",
    )
    preallocate_width_hint: int = free_on_resume(
        DecodeParams.preallocate_width_hint,
        ge=0,
        description="GPU decode: image width the hardware JPEG decoder preallocates for, pixels; 0: no hint "
        "(DALI's default); ignored on the CPU",
    )
    preallocate_height_hint: int = free_on_resume(
        DecodeParams.preallocate_height_hint,
        ge=0,
        description="GPU decode: image height the hardware JPEG decoder preallocates for, pixels; 0: no hint "
        "(DALI's default); ignored on the CPU",
    )
    output_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="dtype of the images both backends hand out: float16 halves the bytes each batch moves "
        "and rounds the pixels to fp16; needs bf16 autocast (train.precision)",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # Multi-crop (train.use_local_crops: true): every image is decoded once and cut into these crops, each with its
    # own window, flip and jitter (augment's ratio, flip and jitter settings); augment.crop_scale is then unused.
    num_global_crops: int = Field(
        2,
        ge=1,
        le=8,
        description="Multi-crop: global crops per image, image_size px (the teacher sees these)",
    )
    global_crop_scale: FloatRange = Field(
        (0.32, 1.0), description="Multi-crop: area fraction range of the global crops"
    )
    num_local_crops: int = Field(
        8, ge=0, le=64, description="Multi-crop: local crops per image (student only)"
    )
    local_crop_size: int = Field(96, ge=8, le=4096, description="Multi-crop: side of the local crops, pixels")
    local_crop_scale: FloatRange = Field(
        (0.05, 0.32), description="Multi-crop: area fraction range of the local crops"
    )
    # The two graphs draw different random windows: a resume keeps the key (and a DALI checkpoint restores only into
    # the graph that wrote it).
    multi_crop_graph: Literal["auto", "batched", "per_crop"] = Field(
        "auto",
        description="Multi-crop, DALI backend: cut the crops by one resize/colour/normalise chain per crop "
        "(per_crop) or by two chains whose operator count does not grow with the crop count (batched: the image "
        "as frames, one warp_affine per frame); auto: batched on a GPU, per_crop in DALI's CPU mode, whose "
        "warp_affine is slower than its resize",
    )

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _check_scales(cls, v: FloatRange) -> FloatRange:
        return _check_area_range(v)


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
    feature: Literal["cosine", "mse", "cosine+mse"] = Field(
        "cosine", description="Pooled-feature distillation loss"
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
    batch_size: int = Field(256, ge=1, description="Images per step on each GPU/process")
    max_steps_per_epoch: int = Field(
        500, ge=1, description="An epoch ends after this many steps (the stream continues)"
    )
    use_local_crops: bool = Field(
        False,
        description="DINO-style multi-crop: global crops for teacher and student, local crops for the student",
    )
    cache_teacher_features: bool = Field(
        False, description="Cache the teacher's outputs per view (DALI backend)"
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
    compile_student: bool = Field(
        True,
        description="torch.compile the student's forward together with its distillation losses (the teacher has "
        "its own switch, model.teacher.compile)",
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


class ModelSpec(Section):
    name: str = Field(
        description="timm model name, optionally with a pretrained tag (vit_base_patch16_224.augreg2_in21k_ft_in1k)"
        " or hf-hub:OWNER/REPO"
    )
    pretrained: bool = Field(
        False,
        description="Load timm's pretrained weights for name from the Hugging Face hub cache (HF_HOME); "
        "downloaded only when not cached and HF_HUB_OFFLINE is unset; a checkpoint wins when given",
    )
    mean: RGB | None = Field(
        None,
        description="The model's input normalisation mean (RGB, 0-1 scale); null: its pretrained weights' "
        "(timm pretrained_cfg) when pretrained, else data.augment.mean",
    )
    std: RGB | None = Field(
        None, description="The model's input normalisation std; null: as for mean (data.augment.std)"
    )

    @field_validator("std")
    @classmethod
    def _check_std(cls, v: RGB | None) -> RGB | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every entry must be > 0")
        return v

    checkpoint: str | None = Field(
        None, description="Local weights (.safetensors, or a torch file); null: random init, or pretrained"
    )
    num_classes: int | None = Field(
        None,
        ge=0,
        description="Classifier outputs; null: the pretrained head's (else 1000) for the teacher, the "
        "teacher's for the student",
    )


class TeacherSpec(ModelSpec):
    compile: Literal["auto"] | bool = free_on_resume(
        "auto",
        description="torch.compile the frozen teacher's forward (it runs under inference mode, its weights cast "
        "once to bf16 when train.precision is bf16); auto: on CUDA, off on the CPU (where the first compile "
        "costs more than a short run gains)",
    )


class StudentSpec(ModelSpec):
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="Stochastic depth while training")


class ModelConfig(Section):
    teacher: TeacherSpec
    student: StudentSpec
    projector_hidden_dim: int = Field(
        0, ge=0, description="Hidden width of the student→teacher feature projector; 0: one linear layer"
    )
