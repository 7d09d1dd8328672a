"""`python -m dali_kd.export --heads`: the student with its adaptor heads, one module whose outputs are the
backbone's and then each teacher's adapted pooled embedding, logits and tokens, and the preprocess.json entries that
say which output is which."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dali_kd.config import Config
from dali_kd.errors import UserError
from dali_kd.models import AdaptorShape, Student, create_model, pretrained_weights
from dali_kd.models.distill import distils_tokens
from dali_kd.models.timm_models import embed_dim, patch_grid, token_dim
from dali_kd.training.standardise import TeacherStandardiser

# What each kind of head gives, by the name preprocess.json uses, and the ModelOutput field that holds it.
KINDS = {"pooled": "pooled", "logits": "logits", "tokens": "patch_tokens"}
# The student's own output: what the export without --heads returns (the classifier's logits, or the pooled
# embedding of a student without a classifier).
BACKBONE_OUTPUT = 0


@dataclass(frozen=True)
class HeadOutput:
    """One output of the exported module: teacher `teacher`'s adapted `kind` (pooled, logits, tokens)."""

    teacher: int
    kind: str


class StudentWithHeads(nn.Module):
    """images (as preprocess.json says) → (the backbone's output, then each head's in `outputs`' order); the
    student's input adapter is left out, as in the export without heads."""

    def __init__(
        self,
        student: Student,
        outputs: list[HeadOutput],
        keys: list[str],
        shapes: list[AdaptorShape],
        standardiser: TeacherStandardiser | None = None,
    ):
        super().__init__()
        assert student.input is None  # the exported module takes preprocessed images
        self.student = student
        self.outputs = outputs
        self.shapes = shapes
        # The statistics of the teachers whose targets training standardised: their heads' outputs are scaled
        # back to the teacher's own features.
        self.standardiser = standardiser
        has_classes = getattr(student.backbone, "num_classes", 0) > 0
        # Each output's name, in order: the backbone's (as the export without heads), then <key>.<kind>.
        self.output_names = ["logits" if has_classes else "embedding"]
        self.output_names += [f"{keys[out.teacher]}.{out.kind}" for out in outputs]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        main, _ = self.student(images)
        raw, adapted = main.raw, main.adapted
        if self.standardiser is not None:
            adapted = self.standardiser.unstandardise(adapted)
        first = raw.logits if raw.logits is not None else raw.pooled
        assert first is not None  # a model's own outputs always have the pooled embedding
        picked = [first]
        for out in self.outputs:
            tensor = getattr(adapted[out.teacher], KINDS[out.kind])
            assert tensor is not None  # outputs lists only the heads this student has
            picked.append(tensor)
        return tuple(picked)


def teacher_architecture(cfg: Config, index: int) -> nn.Module:
    """Teacher `index`'s timm model at its input size, without its weights where a random init builds the same
    shapes (what the student's heads were sized from)."""
    spec = cfg.model.teacher_specs[index]
    where = cfg.model.teacher_where(index)
    try:
        weights = pretrained_weights(spec, "teacher") if spec.name.startswith("hf-hub:") else None
        num_classes = 1000 if spec.num_classes is None else spec.num_classes
        return create_model(spec.name, cfg.teacher_image_sizes[index], num_classes, weights=weights)
    except (UserError, RuntimeError, ValueError) as e:
        raise UserError(f"--heads: {where}: cannot build {spec.name} to size its head: {e}") from None


def adaptor_shapes(
    cfg: Config, backbone: nn.Module, student_state: dict[str, torch.Tensor]
) -> list[AdaptorShape]:
    """Each teacher's adaptor shape as training sized it (dali_kd.models.build_distill_models): from each teacher's
    architecture, whether its patch tokens were distilled and (teachers after the first) its logits head's size
    in the weights. The first teacher's tokens map to its pooled width on the student's grid."""
    teachers = [teacher_architecture(cfg, i) for i in range(len(cfg.model.teacher_specs))]
    patch_weight = cfg.train.loss.patch_weight
    patches = [distils_tokens(cfg.model, i, patch_weight, t, backbone) for i, t in enumerate(teachers)]
    first = embed_dim(teachers[0])
    shapes = [AdaptorShape(first, first if patches[0] else None)]
    for i, teacher in enumerate(teachers[1:], start=1):
        shapes.append(
            AdaptorShape(
                embed_dim(teacher),
                token_dim(teacher) if patches[i] else None,
                logits_head_size(cfg, i, student_state),
                patch_grid(teacher),
            )
        )
    return shapes


def logits_head_size(cfg: Config, index: int, student_state: dict[str, torch.Tensor]) -> int:
    """Teacher `index`'s logits head: none where its logits are not matched, else its model.teachers[i].num_classes,
    else (its pretrained head's count, which the teacher's weights decide) the trained head's size."""
    spec = cfg.model.teacher_specs[index]
    if "logits" not in spec.outputs:
        return 0
    if spec.num_classes is not None:
        return spec.num_classes
    weight = student_state.get(f"adaptors.{index}.logits.weight")
    return 0 if weight is None else int(weight.shape[0])


def student_from_shapes(backbone: nn.Module, shapes: list[AdaptorShape], hidden_dim: int) -> Student:
    """The student around `backbone` with one adaptor per shape (the first teacher's first), no input adapter."""
    first = shapes[0]
    return Student(
        backbone,
        first.pooled_dim,
        hidden_dim,
        with_patches=first.token_dim is not None,
        extra_teachers=shapes[1:],
    )


def load_student(student: Student, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        student.load_state_dict(state)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e)[:200])
        raise UserError(
            f"--heads: {source}: the heads do not fit the student as config.yaml builds it: {first}"
        ) from None
    student.eval().requires_grad_(False)


def build_student_with_heads(
    cfg: Config,
    backbone: nn.Module,
    student_state: dict[str, torch.Tensor],
    source: str,
    stats: dict[str, torch.Tensor] | None,
) -> StudentWithHeads:
    """The trained student with every adaptor, its weights loaded from student_state (a whole Student's);
    stats: the running statistics of the teachers whose targets training standardised."""
    shapes = adaptor_shapes(cfg, backbone, student_state)
    student = student_from_shapes(backbone, shapes, cfg.model.projector_hidden_dim)
    load_student(student, student_state, source)
    keys, flags = cfg.model.teacher_keys, [spec.standardise for spec in cfg.model.teacher_specs]
    standardiser = None
    if any(flags):
        missing = next(
            (
                i
                for i, on in enumerate(flags)
                if on and not any(k.startswith(f"{keys[i]}.") for k in stats or {})
            ),
            None,
        )
        if missing is not None:
            raise UserError(
                f"--heads: {cfg.model.teacher_where(missing)} had its targets standardised, but no running "
                f"statistics come with {source} (teacher_standardiser.safetensors beside it, or a checkpoint's) "
                "to scale its head's outputs back"
            )
        standardiser = TeacherStandardiser(keys, flags, torch.device("cpu"))
        standardiser.load_state_dict(stats or {})
    return StudentWithHeads(student, head_outputs(student), keys, shapes, standardiser)


def head_outputs(student: Student) -> list[HeadOutput]:
    """Every head the student has, teacher by teacher: pooled, then logits (the first teacher's are the
    student's own classifier's, output 0, so not repeated), then tokens."""
    outputs = []
    for i, adaptor in enumerate(student.adaptors):
        outputs.append(HeadOutput(i, "pooled"))
        if i > 0 and adaptor.logits is not None:
            outputs.append(HeadOutput(i, "logits"))
        if adaptor.patches is not None:
            outputs.append(HeadOutput(i, "tokens"))
    return outputs


def max_abs_diff(got: Any, want: torch.Tensor | tuple[torch.Tensor, ...]) -> float:
    """The largest difference over every output (a module with heads returns several, in order)."""
    if isinstance(want, tuple):
        if len(got) != len(want):
            return math.inf
        return max(max_abs_diff(g, w) for g, w in zip(got, want, strict=True))
    return float((torch.as_tensor(got).float() - want.float()).abs().max())


def shape_said(tensor: torch.Tensor) -> list[int | None]:
    """A tensor's shape with its batch axis (dynamic) as null."""
    return [None, *tensor.shape[1:]]


def heads_spec(cfg: Config, model: StudentWithHeads, batch: torch.Tensor) -> dict[str, Any]:
    """preprocess.json's entries for an export with heads: `outputs` (each output's name, in order),
    `adaptor_hidden_dim` and `heads` (per teacher: its key, its timm name, per kind it has the output index and
    shape, and its adaptor's shape, from which dali_kd.export.load_with_heads rebuilds it)."""
    with torch.no_grad():
        got = model(batch[:1])
    heads: list[dict[str, Any]] = []
    for i, (key, spec) in enumerate(zip(cfg.model.teacher_keys, cfg.model.teacher_specs, strict=True)):
        heads.append({"key": key, "teacher": spec.name, "adaptor": model.shapes[i]._asdict()})
        if spec.standardise:  # its head learnt standardised targets: the export scales them back
            heads[-1]["unstandardised"] = True
    for index, out in enumerate(model.outputs, start=1):
        heads[out.teacher][out.kind] = {"output": index, "shape": shape_said(got[index])}
    if model.output_names[0] == "logits" and first_logits_learnt(cfg):
        # The student's own classifier is what learnt the first teacher's logits.
        heads[0]["logits"] = {"output": BACKBONE_OUTPUT, "shape": shape_said(got[BACKBONE_OUTPUT])}
    return {
        "outputs": model.output_names,
        "adaptor_hidden_dim": cfg.model.projector_hidden_dim,
        "heads": heads,
    }


def first_logits_learnt(cfg: Config) -> bool:
    """The student's classifier was trained toward the first teacher's logits (not on labels alone)."""
    return "logits" in cfg.model.primary_teacher.outputs and cfg.train.loss.logit_weight > 0


# The adaptor weights of an export with heads in safetensors, beside student.safetensors (the bare timm backbone).
HEADS_FILE = "heads.safetensors"


# Where heads.safetensors keeps the statistics of standardised teachers (<prefix><key>.pooled.mean, ...).
STANDARDISER_PREFIX = "teacher_standardiser."


def heads_state(model: StudentWithHeads) -> dict[str, torch.Tensor]:
    """The adaptors' weights, named as in the whole Student's state dict (projector., patch_projector.,
    adaptors.<i>.), and the standardised teachers' statistics."""
    state = {k: v for k, v in model.student.state_dict().items() if not k.startswith("backbone.")}
    if model.standardiser is not None:
        state.update({STANDARDISER_PREFIX + k: v for k, v in model.standardiser.state_dict().items()})
    return state


def load_with_heads(folder: Path) -> StudentWithHeads:
    """An export written with --format safetensors --heads, as one eval-mode module: images (as preprocess.json
    says) → the backbone's output, then each head's (preprocess.json's `outputs`)."""
    import json

    from safetensors.torch import load_file

    spec = json.loads((folder / "preprocess.json").read_text())
    if "heads" not in spec:
        raise UserError(f"{folder}: an export without heads (export it again with --heads)")
    return rebuild(spec, load_file(folder / "student.safetensors"), load_file(folder / HEADS_FILE))


def rebuild(
    spec: dict[str, Any], backbone_state: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]
) -> StudentWithHeads:
    """The module an export with heads describes (preprocess.json's spec), with these weights."""
    import timm

    backbone = timm.create_model(spec["model"], pretrained=False, **spec["timm_kwargs"])
    shapes = [
        AdaptorShape(**{**head["adaptor"], "token_grid": tuple(head["adaptor"]["token_grid"] or ()) or None})
        for head in spec["heads"]
    ]
    student = student_from_shapes(backbone, shapes, spec["adaptor_hidden_dim"])
    stats = {
        k.removeprefix(STANDARDISER_PREFIX): v for k, v in heads.items() if k.startswith(STANDARDISER_PREFIX)
    }
    state = {f"backbone.{k}": v for k, v in backbone_state.items()}
    adaptors = {k: v for k, v in heads.items() if not k.startswith(STANDARDISER_PREFIX)}
    load_student(student, {**state, **adaptors}, HEADS_FILE)
    keys = [head["key"] for head in spec["heads"]]
    standardiser = None
    if stats:
        flags = [any(name.startswith(f"{k}.") for name in stats) for k in keys]
        standardiser = TeacherStandardiser(keys, flags, torch.device("cpu"))
        standardiser.load_state_dict(stats)
    return StudentWithHeads(student, head_outputs(student), keys, shapes, standardiser)


def write_safetensors_with_heads(
    spec: dict[str, Any], model: StudentWithHeads, path: Path, batch: torch.Tensor
) -> float:
    """student.safetensors (the bare timm backbone, as without heads) and heads.safetensors beside it; read back
    as a user would (load_with_heads) and compared on every output."""
    from safetensors.torch import load_file

    from dali_kd.io import save_safetensors_atomic

    save_safetensors_atomic(path, model.student.backbone.state_dict())
    save_safetensors_atomic(path.parent / HEADS_FILE, heads_state(model))
    fresh = rebuild(spec, load_file(str(path)), load_file(str(path.parent / HEADS_FILE)))
    with torch.no_grad():
        return max_abs_diff(fresh(batch), model(batch))
