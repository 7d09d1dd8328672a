"""Teacher and student models: built by timm name, with pretrained weights from the local caches or a checkpoint
file, the teacher frozen for good."""

from __future__ import annotations

import contextlib
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import nn

from dali_kd.checkpoint import weights_hash
from dali_kd.config import ModelConfig, ModelSpec, TeacherSpec
from dali_kd.errors import UserError
from dali_kd.models.hub import HF_HUB_PREFIX, PretrainedWeights, find_pretrained
from dali_kd.models.inputs import InputAdapter, InputSpec, pretrained_normalisation
from dali_kd.pipelines.params import IMAGENET_MEAN, IMAGENET_STD
from dali_kd.runtime import autocast

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ModelOutput:
    """pooled: [B, D] embedding before the classifier; logits: [B, C] or None; patch_tokens: [B, N, D] or None."""

    pooled: torch.Tensor
    logits: torch.Tensor | None
    patch_tokens: torch.Tensor | None


def check_model_name(name: str, role: str, key: str | None = None) -> None:
    """A timm name, with or without a pretrained tag (`vit_base_patch16_224.augreg2_in21k_ft_in1k`), or an
    `hf-hub:OWNER/REPO` name (its architecture is only known from its config.json, so it is checked when built).
    key: where the name was written, for messages (default model.<role>.name)."""
    key = key or f"model.{role}.name"
    if name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX) :].partition("@")[0]
        if len(repo.split("/")) != 2 or not all(repo.split("/")):
            raise UserError(f"{key}: '{name}': expected hf-hub:OWNER/REPO, e.g. hf-hub:timm/resnet50.a1_in1k")
        return
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{key}: unknown timm model '{name}'{hint}")
    if tag:
        tagged = timm.list_pretrained(f"{arch}.*")
        if name not in tagged:
            close = difflib.get_close_matches(name, tagged, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" ({arch} has {len(tagged)} tags)"
            raise UserError(f"{key}: timm has no pretrained tag '{tag}' for {arch}{hint}")


def create_model(
    name: str,
    image_size: int,
    num_classes: int,
    drop_path_rate: float = 0.0,
    any_size: bool = False,
    weights: PretrainedWeights | None = None,
) -> nn.Module:
    """A timm model sized for image_size (ViT-style models take it as img_size; CNNs need nothing).

    any_size: also accept other input sizes (multi-crop's local crops); ViTs then interpolate their position
    embedding (timm's dynamic_img_size), CNNs already do.
    weights: pretrained weights already on this machine (dali_kd.models.hub.find_pretrained); timm loads them, resampling
    a ViT's position embedding to image_size and leaving a fresh head when num_classes differs from theirs.
    """
    kwargs: dict = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    if weights is not None:
        kwargs["pretrained"] = True
        if weights.file is not None:  # timm reads this file instead of going to the hub
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights.file)}
    timm_name = name if weights is None else weights.timm_name
    sizes = [{"img_size": image_size}, {}]  # models without an img_size argument take any size already
    if any_size:
        sizes.insert(0, {"img_size": image_size, "dynamic_img_size": True})
    for size in sizes[:-1]:
        try:
            return _create(timm_name, num_classes, weights, **size, **kwargs)
        except TypeError:
            continue
    return _create(timm_name, num_classes, weights, **sizes[-1], **kwargs)


def _create(timm_name: str, num_classes: int, weights: PretrainedWeights | None, **kwargs) -> nn.Module:
    try:
        return timm.create_model(timm_name, num_classes=num_classes, **kwargs)
    except (RuntimeError, OSError) as e:
        if weights is None:
            raise
        # A cached file that is truncated or belongs to another model: name it, so it can be deleted and fetched again.
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise UserError(
            f"pretrained weights of '{weights.name}' in {weights.location} cannot be loaded: {detail[:300]}"
        ) from None


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the bare model names them: no DDP `module.` or torch.compile `_orig_mod.` prefixes."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights from .safetensors, or a torch file loaded with weights_only=True (state dict, or one nested in it)."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    for nested in ("state_dict", "model", "student"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path}: expected a state dict of tensors")
    return strip_wrapper_prefixes(state)


def load_weights(model: nn.Module, path: Path, role: str) -> None:
    state = read_weights(path)
    # timm's own per-architecture filter adapts e.g. a ViT's position embedding to another image size.
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        # On failure keep the raw keys: the load below names what does not fit.
        with contextlib.suppress(Exception):
            state = filter_fn(state, model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: another architecture or another head size
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise UserError(
            f"model.{role}.checkpoint {path}: weights do not fit {role}: {detail[:300]}"
        ) from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise UserError(f"model.{role}.checkpoint {path}: weights do not fit {role}: {', '.join(parts)}")


def build_model(
    spec: ModelSpec,
    role: str,
    image_size: int,
    num_classes: int,
    any_size: bool = False,
    weights: PretrainedWeights | None = None,
) -> nn.Module:
    """spec's model: random init, its pretrained weights (`weights`, else looked up when spec.pretrained), or
    its checkpoint file, which wins over pretrained when both are given."""
    check_model_name(spec.name, role)
    if weights is None:
        weights = pretrained_weights(spec, role)  # None when a checkpoint wins
    drop_path_rate = getattr(spec, "drop_path_rate", 0.0)
    model = create_model(spec.name, image_size, num_classes, drop_path_rate, any_size, weights)
    if spec.checkpoint:
        load_weights(model, Path(spec.checkpoint).expanduser(), role)
    return model


def pretrained_weights(spec: ModelSpec, role: str) -> PretrainedWeights | None:
    """The pretrained weights spec asks for (None: random init, or a checkpoint file that wins over them)."""
    if spec.name.startswith(HF_HUB_PREFIX) and (not spec.pretrained or spec.checkpoint):
        # timm would fetch the model's config.json from the hub to build it: never at run time.
        raise UserError(
            f"model.{role}.name: {spec.name} is built from the hub with its pretrained weights (pretrained: true, "
            "no checkpoint); for a random init or a checkpoint give the timm name instead"
        )
    return (
        find_pretrained(spec.name, f"model.{role}.pretrained")
        if spec.pretrained and not spec.checkpoint
        else None
    )


def fetch_pretrained(cfg: ModelConfig) -> None:
    """Make sure the pretrained weights the config asks for are in the local cache (see dali_kd.models.hub), so that
    building the models later reads them from there; says when a checkpoint wins over pretrained: true."""
    for role in ("teacher", "student"):
        spec: ModelSpec = getattr(cfg, role)
        if spec.pretrained and spec.checkpoint:
            print(
                f"model.{role}: the weights come from model.{role}.checkpoint (it wins over pretrained: true)"
            )
        pretrained_weights(spec, role)


def head_sizes(cfg: ModelConfig, teacher: PretrainedWeights | None) -> tuple[int, int]:
    """(teacher, student) classifier sizes. null: the pretrained head's count (a random-init or checkpoint
    teacher: 1000); the student's null: the teacher's, so that the logit loss applies."""
    default = teacher.num_classes if teacher is not None else 1000
    teacher_classes = default if cfg.teacher.num_classes is None else cfg.teacher.num_classes
    if teacher is not None and teacher_classes not in (0, teacher.num_classes):
        # timm would give the frozen teacher a fresh, random head: its logits would teach noise.
        raise UserError(
            f"model.teacher.num_classes={teacher_classes}, but the pretrained {cfg.teacher.name} has "
            f"{teacher.num_classes or 'no'} classifier outputs: a frozen teacher with a new random head teaches "
            f"random logits; use null (its own head) or 0 (no head, feature loss only)"
        )
    student_classes = teacher_classes if cfg.student.num_classes is None else cfg.student.num_classes
    return teacher_classes, student_classes


def _patch_grid(model: nn.Module) -> tuple[int, ...] | None:
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    return tuple(grid) if grid is not None and hasattr(model, "num_prefix_tokens") else None


def model_outputs(model: nn.Module, images: torch.Tensor, with_patches: bool) -> ModelOutput:
    """Pooled embedding, logits and (ViTs) patch tokens from one pass of a timm model."""
    tokens = model.forward_features(images)
    pooled = model.forward_head(tokens, pre_logits=True)
    logits = model.get_classifier()(pooled) if model.num_classes > 0 else None
    patches = tokens[:, model.num_prefix_tokens :] if with_patches else None
    return ModelOutput(pooled=pooled, logits=logits, patch_tokens=patches)


# The layers whose weights autocast casts to its dtype on every call (a teacher's weights never need a gradient, so
# autocast keeps no cached copy of them); exact types, so that a subclass with its own weight arithmetic (timm's
# StdConv2d standardises its weight) keeps computing it in fp32.
AUTOCAST_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def cast_autocast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast, once, the weights autocast would cast to `dtype` on every forward: under autocast the model then
    computes exactly what it computed before (autocast casts linear and conv inputs to `dtype` anyway; norms and
    the other fp32 parameters stay fp32), without the per-step weight casts."""
    for module in model.modules():
        if type(module) in AUTOCAST_WEIGHT_LAYERS:
            module.to(dtype)


class FrozenTeacher(nn.Module):
    """The teacher: eval mode, no gradients, inference mode, bf16 autocast on GPU; `train()` cannot undo that.

    input: turns the pipeline's images into the teacher's own size and normalisation (None: they already are).
    With an autocast dtype, its linear and conv weights are cast to it once, here (see cast_autocast_weights):
    hash the weights (`weights_hash`) before. compile: torch.compile its forward (input adapter included), which
    runs under inference mode.
    """

    def __init__(
        self,
        model: nn.Module,
        autocast_dtype: torch.dtype | None,
        input: InputAdapter | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        if autocast_dtype is not None:
            cast_autocast_weights(self.model, autocast_dtype)
        self.autocast_dtype = autocast_dtype
        self.input = input
        self.compiled = compile
        self._outputs = torch.compile(self._eager_outputs) if compile else self._eager_outputs

    def train(self, mode: bool = True) -> FrozenTeacher:
        # Dropout, drop-path and batch-norm updates would change the targets: stay in eval whatever is asked.
        return super().train(False)

    def _eager_outputs(self, images: torch.Tensor, with_patches: bool) -> ModelOutput:
        if self.input is not None:
            images = self.input(images)
        with autocast(images.device, self.autocast_dtype):
            return model_outputs(self.model, images, with_patches)

    def forward(self, images: torch.Tensor, with_patches: bool = False) -> ModelOutput:
        with torch.inference_mode():
            out = self._outputs(images, with_patches)
        # Targets in fp32, copied outside inference mode (one kernel, a cast where they are bf16): an inference
        # tensor cannot be saved for the student's backward pass.
        return ModelOutput(
            *(
                None if t is None else t.to(torch.float32, copy=True)
                for t in (out.pooled, out.logits, out.patch_tokens)
            )
        )


class StudentOutput(NamedTuple):
    """raw: the backbone's outputs; projected: pooled embedding at the teacher's width; patches: projected tokens."""

    raw: ModelOutput
    projected: torch.Tensor
    patches: torch.Tensor | None


def _projector(in_dim: int, out_dim: int, hidden_dim: int) -> nn.Module:
    if hidden_dim == 0:
        return nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class Student(nn.Module):
    """The trained model plus projectors that map its features to the teacher's width (dropped after training).

    input: turns the pipeline's images into the student's own size and normalisation (None: they already are);
    it is part of training, not of the shipped backbone (an exported student takes its input as preprocess.json
    says)."""

    def __init__(
        self,
        backbone: nn.Module,
        teacher_dim: int,
        hidden_dim: int,
        with_patches: bool,
        input: InputAdapter | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.input = input
        self.with_patches = with_patches
        self.projector = _projector(backbone.num_features, teacher_dim, hidden_dim)
        self.patch_projector = (
            _projector(backbone.num_features, teacher_dim, hidden_dim) if with_patches else None
        )

    def _views(self, images: torch.Tensor, with_patches: bool, resize: bool = True) -> StudentOutput:
        if self.input is not None:
            images = self.input(images, resize=resize)
        out = model_outputs(self.backbone, images, with_patches)
        patches = self.patch_projector(out.patch_tokens) if with_patches else None
        return StudentOutput(out, self.projector(out.pooled), patches)

    def forward(
        self, images: torch.Tensor, local_images: torch.Tensor | None = None
    ) -> tuple[StudentOutput, StudentOutput | None]:
        """Outputs for images, and for local_images (multi-crop's smaller crops, no patch tokens) when given.

        Both resolutions go through this one call, so that DDP sees a single forward per step (as DINO's
        MultiCropWrapper does) and torch.compile one graph.
        """
        main = self._views(images, self.with_patches)
        # Local crops keep their own (smaller) size; only their normalisation is the student's.
        return main, None if local_images is None else self._views(local_images, False, resize=False)

    def evaluate(self, images: torch.Tensor, backbone: nn.Module | None = None) -> ModelOutput:
        """The backbone's (or these weights', e.g. the EMA's) pooled embedding and logits for pipeline images
        (eval mode is the caller's business)."""
        if self.input is not None:
            images = self.input(images)
        return model_outputs(self.backbone if backbone is None else backbone, images, with_patches=False)


def same_token_grid(teacher: nn.Module, student: nn.Module) -> bool:
    """Patch-token distillation needs two ViT-style models with the same token grid."""
    grid = _patch_grid(teacher)
    return grid is not None and grid == _patch_grid(student)


def embed_dim(model: nn.Module) -> int:
    return int(model.num_features)


@dataclass
class DistillModels:
    """The frozen teacher, its identity (name + weights hash, what a checkpoint and the cache are tied to) and the
    student with its projectors; use_patches: patch-token distillation applies to this pair; teacher_input /
    student_input: what each model is fed (size and normalisation)."""

    teacher: FrozenTeacher
    teacher_id: dict[str, str]
    student: Student
    use_patches: bool
    teacher_input: InputSpec
    student_input: InputSpec


def model_input(
    spec: ModelSpec, model: nn.Module, size: int, pipeline: InputSpec, pretrained: bool | None = None
) -> InputSpec:
    """The model's input: its size; the mean/std the config names, else its pretrained weights' (when those are
    what it loaded: `pretrained`, by default spec.pretrained without a checkpoint), else the pipeline's
    (data.augment's, what a model trained here learnt with)."""
    if pretrained is None:
        pretrained = spec.pretrained and not spec.checkpoint
    mean, std = spec.mean, spec.std
    if mean is None or std is None:
        pretrained = pretrained_normalisation(model) if pretrained else None
        fallback = pretrained or (pipeline.mean, pipeline.std)
        mean = fallback[0] if mean is None else mean
        std = fallback[1] if std is None else std
    return InputSpec(size, tuple(mean), tuple(std))


def _adapter(pipeline: InputSpec, model: InputSpec) -> InputAdapter | None:
    adapter = InputAdapter(pipeline, model)
    return None if adapter.is_identity else adapter


def teacher_compile(spec: TeacherSpec, device: torch.device) -> bool:
    """model.teacher.compile: auto compiles on CUDA only (on the CPU the first compile outweighs a short run)."""
    return device.type == "cuda" if spec.compile == "auto" else spec.compile


def build_distill_models(
    cfg: ModelConfig,
    image_size: int,
    patch_weight: float,
    any_size: bool,
    device: torch.device,
    amp_dtype,
    teacher_image_size: int | None = None,
    pipeline: InputSpec | None = None,
) -> DistillModels:
    """Teacher and student by timm name, pretrained or from a checkpoint file; heads sized by head_sizes.

    image_size / teacher_image_size: each model's input side (the teacher's defaults to the student's).
    pipeline: the views the data stream hands out (size and normalisation); each model gets them turned into its
    own input on the device. any_size: the student also sees other input sizes (multi-crop's local crops; a ViT
    then interpolates).
    """
    teacher_size = teacher_image_size or image_size
    if pipeline is None:
        pipeline = InputSpec(max(image_size, teacher_size), IMAGENET_MEAN, IMAGENET_STD)
    teacher_weights = pretrained_weights(cfg.teacher, "teacher")
    student_weights = pretrained_weights(cfg.student, "student")
    teacher_classes, student_classes = head_sizes(cfg, teacher_weights)
    teacher = build_model(cfg.teacher, "teacher", teacher_size, teacher_classes, weights=teacher_weights)
    backbone = build_model(
        cfg.student, "student", image_size, student_classes, any_size=any_size, weights=student_weights
    )
    teacher_input = model_input(cfg.teacher, teacher, teacher_size, pipeline, teacher_weights is not None)
    student_input = model_input(cfg.student, backbone, image_size, pipeline, student_weights is not None)
    teacher_id = {"name": cfg.teacher.name, "weights_hash": weights_hash(teacher)}
    use_patches = patch_weight > 0 and same_token_grid(teacher, backbone)
    student = Student(
        backbone,
        embed_dim(teacher),
        cfg.projector_hidden_dim,
        with_patches=use_patches,
        input=_adapter(pipeline, student_input),
    )
    # After weights_hash: the teacher's identity is its fp32 weights, whatever it computes in.
    frozen = FrozenTeacher(
        teacher,
        amp_dtype,
        input=_adapter(pipeline, teacher_input),
        compile=teacher_compile(cfg.teacher, device),
    )
    return DistillModels(
        frozen.to(device), teacher_id, student.to(device), use_patches, teacher_input, student_input
    )
