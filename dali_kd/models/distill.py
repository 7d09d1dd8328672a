"""The distillation's models: the frozen teacher and the student (with its projector) around timm models, each fed
its own size and normalisation, built together from the model config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from dali_kd.config import ModelConfig, ModelSpec, TeacherSpec
from dali_kd.data.outputs import ModelOutput
from dali_kd.identity import weights_hash
from dali_kd.models.inputs import InputAdapter, InputSpec, pretrained_normalisation, rgb
from dali_kd.models.timm_models import (
    build_model,
    embed_dim,
    head_sizes,
    model_outputs,
    pretrained_weights,
    same_token_grid,
    token_dim,
)
from dali_kd.runtime import autocast, resolve_compile

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
        self.projector = _projector(embed_dim(backbone), teacher_dim, hidden_dim)
        self.patch_projector = (
            _projector(token_dim(backbone), teacher_dim, hidden_dim) if with_patches else None
        )

    def _views(self, images: torch.Tensor, with_patches: bool, resize: bool = True) -> StudentOutput:
        if self.input is not None:
            images = self.input(images, resize=resize)
        out = model_outputs(self.backbone, images, with_patches)
        patches = None
        if with_patches:
            assert self.patch_projector is not None  # built with_patches
            patches = self.patch_projector(out.patch_tokens)
        assert out.pooled is not None  # a model's own outputs always have it
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
        weights_norm = pretrained_normalisation(model) if pretrained else None
        fallback = weights_norm or (pipeline.mean, pipeline.std)
        mean = fallback[0] if mean is None else mean
        std = fallback[1] if std is None else std
    return InputSpec(size, rgb(mean), rgb(std))


def _adapter(pipeline: InputSpec, model: InputSpec) -> InputAdapter | None:
    adapter = InputAdapter(pipeline, model)
    return None if adapter.is_identity else adapter


def teacher_compile(spec: TeacherSpec, device: torch.device) -> bool:
    """model.teacher.compile, resolved for the device as the student's switch is (auto: CUDA only)."""
    return resolve_compile(spec.compile, device)


def build_distill_models(
    cfg: ModelConfig,
    image_size: int,
    patch_weight: float,
    any_size: bool,
    device: torch.device,
    amp_dtype,
    *,
    pipeline: InputSpec,
    teacher_image_size: int | None = None,
) -> DistillModels:
    """Teacher and student by timm name, pretrained or from a checkpoint file; heads sized by head_sizes.

    image_size / teacher_image_size: each model's input side (the teacher's defaults to the student's).
    pipeline: the views the data stream hands out (size and normalisation); each model gets them turned into its
    own input on the device. any_size: the student also sees other input sizes (multi-crop's local crops; a ViT
    then interpolates).
    """
    teacher_size = teacher_image_size or image_size
    teacher_weights = pretrained_weights(cfg.primary_teacher, "teacher")
    student_weights = pretrained_weights(cfg.student, "student")
    teacher_classes, student_classes = head_sizes(cfg, teacher_weights)
    teacher = build_model(
        cfg.primary_teacher, "teacher", teacher_size, teacher_classes, weights=teacher_weights
    )
    backbone = build_model(
        cfg.student, "student", image_size, student_classes, any_size=any_size, weights=student_weights
    )
    teacher_input = model_input(
        cfg.primary_teacher, teacher, teacher_size, pipeline, teacher_weights is not None
    )
    student_input = model_input(cfg.student, backbone, image_size, pipeline, student_weights is not None)
    teacher_id = {"name": cfg.primary_teacher.name, "weights_hash": weights_hash(teacher)}
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
        compile=teacher_compile(cfg.primary_teacher, device),
    )
    return DistillModels(
        frozen.to(device), teacher_id, student.to(device), use_patches, teacher_input, student_input
    )
