"""The typed config schema (data, train, model) and its loading from three YAML files plus KEY=VALUE overrides.

Every field is declared once here, with its type, range and meaning; pydantic rejects unknown keys, wrong types
and out-of-range values, `Config` refuses settings that are each valid but do not work together, and
`load_config` turns the first problem into one `UserError` line naming the file and the dotted key(s) (with a
did-you-mean for typos).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dali_kd.errors import UserError
from pipelines.params import IMAGENET_MEAN, IMAGENET_STD, AugmentParams, EvalParams, MultiCropParams

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG_DIR = CONFIG_DIR / "demo"
SECTION_FILES = {"data": "data_config.yaml", "train": "train_config_kd.yaml", "model": "model_config_kd.yaml"}

FloatRange = tuple[float, float]
RGB = tuple[float, float, float]


def free_on_resume(default: Any, **kwargs: Any) -> Any:
    """A Field that a resumed run may change freely: it changes how the run is observed, not what it does."""
    return Field(default, json_schema_extra={"resume": "free"}, **kwargs)


class Section(BaseModel):
    # extra="forbid": a typo is an error, never a silently ignored key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    image_size: int = Field(
        224, ge=16, le=4096, description="Side of the square training and eval crops, pixels"
    )
    eval_resize: int = Field(
        256, ge=16, le=4096, description="Eval: shorter side resized to this before the centre crop"
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
        2, ge=1, le=16, description="Batches DALI prepares ahead of the trainer"
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

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _check_scales(cls, v: FloatRange) -> FloatRange:
        return _check_area_range(v)


class OptimizerConfig(Section):
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW), reached after warm-up")
    min_lr: float = Field(1e-6, ge=0, description="Learning rate at the end of the cosine schedule")
    weight_decay: float = Field(
        0.05, ge=0, description="AdamW weight decay (not applied to biases and norms)"
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps before the cosine decay")
    grad_clip: float | None = Field(3.0, gt=0, description="Clip the gradient norm to this; null disables")


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
    compile_student: bool = Field(True, description="torch.compile the student (never the teacher)")
    num_workers: int = free_on_resume(4, ge=0, description="DataLoader workers of the torchvision backend")
    persistent_workers: bool = free_on_resume(
        False, description="Keep torchvision DataLoader workers between epochs"
    )
    # What a real run needs besides.
    epochs: int = Field(100, ge=1, description="Number of (step-capped) epochs")
    seed: int = Field(0, ge=0, description="Seed for shuffling, augmentations and initialisation")
    device: Literal["auto", "cuda", "cpu"] = free_on_resume(
        "auto", description="auto: cuda when available, else cpu"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    output_dir: str = free_on_resume("runs", description="Run directories are created under this folder")
    run_name: str | None = free_on_resume(
        None, description="Run directory name; null: <student>-<date>-<time>"
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
    knn_k: int = free_on_resume(20, ge=1, description="Neighbours in the k-NN evaluation")
    knn_bank_size: int | None = free_on_resume(
        None, ge=1, description="Training images (evenly spread) in the k-NN bank; null: all of them"
    )
    eval_every_n_epochs: int = free_on_resume(
        1, ge=1, description="k-NN evaluation every N epochs (and after the last)"
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)


class ModelSpec(Section):
    name: str = Field(description="timm model name, e.g. vit_base_patch16_224")
    checkpoint: str | None = Field(
        None, description="Local weights (.safetensors, or a torch file); null: random init"
    )
    num_classes: int | None = Field(
        None, ge=0, description="Classifier outputs; null: teacher 1000, student same as the teacher"
    )


class StudentSpec(ModelSpec):
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="Stochastic depth while training")


class ModelConfig(Section):
    teacher: ModelSpec
    student: StudentSpec
    projector_hidden_dim: int = Field(
        0, ge=0, description="Hidden width of the student→teacher feature projector; 0: one linear layer"
    )


_KEY_IN_BRACES = re.compile(r"\{((?:data|train|model)\.[a-z_.]+)\}")


class ConfigConflict(ValueError):
    """Settings that are each valid but do not work together; `keys` are their dotted names (to say where they
    were set)."""

    def __init__(self, keys: tuple[str, ...], message: str):
        super().__init__(message)
        self.keys = keys


def _show(value: Any) -> str:
    """A value as the user writes it in YAML or on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


class Config(Section):
    data: DataConfig
    train: TrainConfig
    model: ModelConfig

    def value(self, key: str) -> Any:
        """The value at a dotted key, e.g. cfg.value("train.optimizer.lr")."""
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        """Refuse at load time what would crash (or silently do something else) later; name every key."""

        def conflict(message: str) -> ConfigConflict:
            # Every {dotted.key} in the message is written as key=value; those are the keys the error names.
            keys = tuple(dict.fromkeys(_KEY_IN_BRACES.findall(message)))
            return ConfigConflict(
                keys, _KEY_IN_BRACES.sub(lambda m: f"{m[1]}={_show(self.value(m[1]))}", message)
            )

        d, t = self.data, self.train
        if d.val_root is not None and d.eval_resize < d.image_size:
            raise conflict(
                "{data.eval_resize} is smaller than {data.image_size}: the eval centre crop would not fit; "
                "raise data.eval_resize or lower data.image_size"
            )
        if t.optimizer.min_lr > t.optimizer.lr:
            raise conflict(
                "{train.optimizer.min_lr} is larger than {train.optimizer.lr}: the schedule would rise "
                "instead of decaying; lower train.optimizer.min_lr or raise train.optimizer.lr"
            )
        loss = t.loss
        if loss.feature_weight == loss.patch_weight == loss.logit_weight == loss.label_weight == 0:
            raise conflict(
                "{train.loss.feature_weight}, {train.loss.patch_weight}, {train.loss.logit_weight} and "
                "{train.loss.label_weight}: every loss weight is 0, so there is nothing to learn; give one "
                "of them a weight > 0"
            )
        if t.use_local_crops:
            if d.local_crop_size > d.image_size:
                raise conflict(
                    "{data.local_crop_size} is larger than {data.image_size} with {train.use_local_crops}: "
                    "local crops are the small views; lower data.local_crop_size or raise data.image_size"
                )
            if t.cache_teacher_features:
                raise conflict(
                    "{train.cache_teacher_features} cannot be combined with {train.use_local_crops}: the "
                    "teacher cache stores one view per sample, multi-crop makes several; turn one of them off"
                )
            if t.loss.global_pairing == "cross" and d.num_global_crops < 2:
                raise conflict(
                    "{train.loss.global_pairing} needs data.num_global_crops >= 2 "
                    "(got {data.num_global_crops}): cross pairs each global crop with the other ones; use "
                    "same or all, or more global crops"
                )
        if t.cache_teacher_features:
            if d.backend != "dali":
                raise conflict(
                    "{train.cache_teacher_features} needs data.backend=dali (got {data.backend}): the cache "
                    "replays its stored views through the DALI graph"
                )
            if not t.teacher_feature_dir:
                raise conflict(
                    "{train.cache_teacher_features} needs a folder (got {train.teacher_feature_dir}): set "
                    "train.teacher_feature_dir for the teacher cache (it can be large)"
                )
            if not {"pooled", "logits"} & set(t.cache_outputs):
                raise conflict(
                    "{train.cache_outputs} with {train.cache_teacher_features}: the cache's fidelity probe "
                    "compares the pooled embedding or the logits; add pooled or logits"
                )
            if t.loss.feature_weight > 0 and "pooled" not in t.cache_outputs:
                raise conflict(
                    "{train.loss.feature_weight} needs pooled in {train.cache_outputs} with "
                    "{train.cache_teacher_features}: the feature loss would have no cached teacher "
                    "embedding; add pooled or set train.loss.feature_weight=0"
                )
        return self

    def augment_params(self) -> AugmentParams:
        a = self.data.augment
        return AugmentParams(image_size=self.data.image_size, **a.model_dump())

    def crop_params(self) -> AugmentParams | MultiCropParams:
        """What the training stream makes: one view per image, or (train.use_local_crops) DINO multi-crop."""
        if not self.train.use_local_crops:
            return self.augment_params()
        d = self.data
        view = self.augment_params()
        return MultiCropParams(
            global_view=replace(view, crop_scale=d.global_crop_scale),
            local_view=replace(view, image_size=d.local_crop_size, crop_scale=d.local_crop_scale),
            num_global=d.num_global_crops,
            num_local=d.num_local_crops,
        )

    def eval_params(self) -> EvalParams:
        a = self.data.augment
        return EvalParams(
            image_size=self.data.image_size, resize_size=self.data.eval_resize, mean=a.mean, std=a.std
        )


def resume_free_keys(model: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """The dotted keys declared with `free_on_resume` (the resume check ignores them)."""
    keys: set[str] = set()
    for name, field in (model or Config).model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= resume_free_keys(ann, f"{prefix}{name}.")
        elif isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("resume") == "free":
            keys.add(f"{prefix}{name}")
    return keys


def _did_you_mean(model: type[BaseModel] | None, key: str) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The schema class that holds the key at `path` (to suggest its real field names)."""
    model: Any = Config
    for part in path[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def _source(key: str, sources: dict[str, str]) -> str:
    """Where a dotted key was set: the command line, or the file of its section (the longest known prefix wins)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if (where := sources.get(".".join(parts[:end]))) is not None:
            return where
    return "config"


def _describe(error: dict[str, Any], sources: dict[str, str]) -> str:
    loc = tuple(error["loc"])
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ConfigConflict):
        # A rule over several keys: the message names them all; say where each was set.
        places = dict.fromkeys(_source(k, sources) for k in cause.keys)
        return f"{' and '.join(places)}: {cause}" if places else str(cause)
    if not loc:
        return error["msg"].removeprefix("Value error, ")
    key = ".".join(str(p) for p in loc)
    where = _source(key, sources)
    if error["type"] == "extra_forbidden":
        what = f"unknown key{_did_you_mean(_model_at(loc), str(loc[-1]))}"
    elif error["type"] == "missing":
        what = "required key is missing"
    else:
        msg = error["msg"].removeprefix("Value error, ")
        what = f"{msg} (got {error['input']!r})" if not isinstance(error["input"], dict) else msg
    return f"{where}: {key}: {what}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.batch_size=64` → (['train', 'batch_size'], 64); the value is read as YAML (null, true, [1, 2])."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(
            f"command line: '{item}': expected KEY=VALUE with a dotted key such as train.batch_size=64"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"command line: '{item}': value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def load_config(
    data_config: Path | None = None,
    train_config: Path | None = None,
    model_config: Path | None = None,
    overrides: list[str] = (),  # type: ignore[assignment]
    config_dir: Path = DEMO_CONFIG_DIR,
) -> Config:
    """Read the three files (a missing flag takes the file of that name in config_dir), apply overrides, validate."""
    paths = {
        "data": Path(data_config) if data_config else config_dir / SECTION_FILES["data"],
        "train": Path(train_config) if train_config else config_dir / SECTION_FILES["train"],
        "model": Path(model_config) if model_config else config_dir / SECTION_FILES["model"],
    }
    raw: dict[str, Any] = {section: read_yaml(path) for section, path in paths.items()}
    sources: dict[str, str] = {section: str(path) for section, path in paths.items()}
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] not in raw:
            raise UserError(
                f"command line: {'.'.join(keys)}: unknown section '{keys[0]}' (expected data., train. or model.)"
            )
        node = raw
        for depth, part in enumerate(keys[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(
                    f"command line: {'.'.join(keys)}: {'.'.join(keys[: depth + 1])} is not a section"
                )
            node = child
        node[keys[-1]] = value
        sources[".".join(keys)] = "command line"
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        # A typo also makes the real key "missing": report the typo, which explains both.
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise UserError(_describe(errors[0], sources)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (tuples written as lists), as written into the run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
