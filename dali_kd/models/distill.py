"""The distillation's models: the frozen teachers and the student (with an adaptor per teacher) around timm models,
each fed its own size and normalisation, built together from the model config."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from dali_kd.config import ModelConfig, ModelSpec, TeacherSpec
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.identity import weights_hash
from dali_kd.models.hub import PretrainedWeights
from dali_kd.models.inputs import InputAdapter, InputSpec, pretrained_normalisation, rgb
from dali_kd.models.student import AdaptorShape, Student
from dali_kd.models.timm_models import (
    build_model,
    embed_dim,
    model_outputs,
    patch_grid,
    pretrained_weights,
    same_token_grid,
    teacher_classes,
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


@dataclass
class DistillModels:
    """The frozen teachers (in config order), their identities (name + weights hash each, what a checkpoint and the
    cache are tied to), their keys (model.teacher_keys) and the student with one adaptor per teacher;
    teacher_patches: each teacher's patch tokens are distilled; teacher_inputs / student_input: what each model is
    fed (size and normalisation). The singular names mean the first teacher."""

    teachers: list[FrozenTeacher]
    teacher_ids: list[dict[str, str]]
    teacher_keys: list[str]
    student: Student
    teacher_patches: list[bool]
    teacher_inputs: list[InputSpec]
    student_input: InputSpec

    @property
    def teacher(self) -> FrozenTeacher:
        return self.teachers[0]

    @property
    def teacher_id(self) -> dict[str, str]:
        return self.teacher_ids[0]

    @property
    def teacher_input(self) -> InputSpec:
        return self.teacher_inputs[0]

    @property
    def use_patches(self) -> bool:
        """The first teacher's patch tokens are distilled."""
        return self.teacher_patches[0]


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


class BuiltTeacher(NamedTuple):
    """One teacher as built, before it is frozen: its model, input and identity."""

    model: nn.Module
    input: InputSpec
    id: dict[str, str]


@contextmanager
def naming_teacher(cfg: ModelConfig, index: int) -> Iterator[None]:
    """With several teachers, a UserError raised while building or loading teacher `index` names it by position and
    name (its messages otherwise say model.teacher)."""
    try:
        yield
    except UserError as e:
        if cfg.teachers is None:
            raise
        where, message = cfg.teacher_where(index), str(e)
        if message.startswith("model.teacher."):
            message = message[len("model.teacher.") :]
        message = message.replace("model.teacher.", f"model.teachers[{index}].")
        raise UserError(f"{where}: {message}") from None


def build_teacher(
    cfg: ModelConfig,
    index: int,
    image_size: int,
    pipeline: InputSpec,
    weights: PretrainedWeights | None,
    num_classes: int,
) -> BuiltTeacher:
    """Teacher `index` by timm name at its own input size, pretrained or from its checkpoint file, with its own
    normalisation and its identity (hashed from its fp32 weights)."""
    spec = cfg.teacher_specs[index]
    with naming_teacher(cfg, index):
        model = build_model(spec, "teacher", image_size, num_classes, weights=weights)
    spec_input = model_input(spec, model, image_size, pipeline, weights is not None)
    return BuiltTeacher(model, spec_input, {"name": spec.name, "weights_hash": weights_hash(model)})


def distils_tokens(
    cfg: ModelConfig, index: int, patch_weight: float, teacher: nn.Module, student: nn.Module
) -> bool:
    """Teacher `index`'s patch tokens are distilled: a token loss, tokens among its outputs and two ViT-style
    models; one teacher needs the student's token grid, several have the student's tokens resized to theirs."""
    if patch_weight <= 0 or "tokens" not in cfg.teacher_specs[index].outputs:
        return False
    if cfg.teachers is None:
        return same_token_grid(teacher, student)
    return patch_grid(teacher) is not None and patch_grid(student) is not None


def teacher_weights(cfg: ModelConfig) -> tuple[list[PretrainedWeights | None], list[int]]:
    """Each teacher's pretrained weights (None: a random init or its checkpoint) and classifier size."""
    weights, classes = [], []
    for i, spec in enumerate(cfg.teacher_specs):
        with naming_teacher(cfg, i):
            weights.append(pretrained_weights(spec, "teacher"))
            classes.append(teacher_classes(spec, weights[-1]))
    return weights, classes


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
    """Teachers and student by timm name, pretrained or from a checkpoint file; heads sized as head_sizes says.

    image_size / teacher_image_size: the student's input side and the teachers' default (each teacher's own
    image_size wins; else the student's). pipeline: the views the data stream hands out (size and normalisation);
    each model gets them turned into its own input on the device. any_size: the student also sees other input
    sizes (multi-crop's local crops; a ViT then interpolates).
    """
    specs = cfg.teacher_specs
    sizes = [spec.image_size or teacher_image_size or image_size for spec in specs]
    weights, classes = teacher_weights(cfg)
    student_weights = pretrained_weights(cfg.student, "student")
    student_classes = classes[0] if cfg.student.num_classes is None else cfg.student.num_classes
    # The RNG draws of a random init follow this order: the first teacher, the student, its first adaptor, then
    # the other teachers and their adaptors.
    built = [build_teacher(cfg, 0, sizes[0], pipeline, weights[0], classes[0])]
    backbone = build_model(
        cfg.student, "student", image_size, student_classes, any_size=any_size, weights=student_weights
    )
    for i in range(1, len(specs)):
        built.append(build_teacher(cfg, i, sizes[i], pipeline, weights[i], classes[i]))
    student_input = model_input(cfg.student, backbone, image_size, pipeline, student_weights is not None)
    patches = [distils_tokens(cfg, i, patch_weight, t.model, backbone) for i, t in enumerate(built)]
    extra = [
        AdaptorShape(
            embed_dim(t.model),
            token_dim(t.model) if patches[i] else None,
            int(getattr(t.model, "num_classes", 0)) if "logits" in specs[i].outputs else 0,
            patch_grid(t.model),
        )
        for i, t in enumerate(built)
        if i > 0
    ]
    student = Student(
        backbone,
        embed_dim(built[0].model),
        cfg.projector_hidden_dim,
        with_patches=patches[0],
        input=_adapter(pipeline, student_input),
        extra_teachers=extra,
    )
    # After weights_hash: a teacher's identity is its fp32 weights, whatever it computes in.
    frozen = [
        FrozenTeacher(
            t.model, amp_dtype, input=_adapter(pipeline, t.input), compile=teacher_compile(spec, device)
        ).to(device)
        for t, spec in zip(built, specs, strict=True)
    ]
    return DistillModels(
        frozen,
        [t.id for t in built],
        cfg.teacher_keys,
        student.to(device),
        patches,
        [t.input for t in built],
        student_input,
    )
