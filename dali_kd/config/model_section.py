"""The model section: the teacher (or several: model.teachers) and the student (a timm name, weights, normalisation,
classes) and the adaptor between them; every key declared once, with its type, range, default and meaning."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dali_kd.config.section import RGB, Section, free_on_resume


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
        description="Classifier outputs; null: for the teacher its pretrained head's, or its checkpoint's "
        "(a random init: 1000), for the student the teacher's. A teacher whose head lacks the data's classes "
        "teaches features only (docs/data.md)",
    )


TeacherOutput = Literal["pooled", "tokens", "logits"]
# The loss parts and multi-crop kinds that metric names are made of (loss_label, loss_feature_global, ...).
RESERVED_KEYS = frozenset({"feature", "patch", "logit", "label", "global", "local"})


class TeacherSpec(ModelSpec):
    compile: Literal["auto"] | bool = free_on_resume(
        "auto",
        description="torch.compile the frozen teacher's forward (it runs under inference mode, its weights cast "
        "once to bf16 when train.precision is bf16); auto: on CUDA, off on the CPU (where the first compile "
        "costs more than a short run gains)",
    )
    key: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="The teacher's name in metrics, the teacher cache and exported heads (lower-case letters, "
        "digits, _); null: its model name's architecture (resnet50 for resnet50.a1_in1k), numbered when repeated",
    )
    image_size: int | None = Field(
        None,
        ge=16,
        le=4096,
        description="The teacher's input side; null: data.teacher_image_size, else data.image_size. The "
        "pipeline cuts each view once at the largest size any model needs; each model gets it resized",
    )
    outputs: list[TeacherOutput] = Field(
        ["pooled", "tokens", "logits"],
        min_length=1,
        description="Which of the teacher's outputs the student matches (each also needs its train.loss weight "
        "> 0: pooled feature_weight, tokens patch_weight, logits logit_weight)",
    )
    loss_weight: float = Field(
        1.0,
        ge=0,
        description="With several teachers: this teacher's share of the distillation loss (its feature, token "
        "and logit losses are multiplied by it)",
    )
    standardise: bool = Field(
        False,
        description="Standardise this teacher's pooled and token targets per feature with a running mean and "
        "variance before the loss, so that teachers whose features differ in scale weigh alike",
    )

    @field_validator("key")
    @classmethod
    def _check_key(cls, v: str | None) -> str | None:
        # Metrics are named loss_<key> and loss_<part>_<key>: these keys would read as another metric's name.
        if v in RESERVED_KEYS:
            raise ValueError(f"{v!r} is a name the losses already use; choose another key")
        return v


class StudentSpec(ModelSpec):
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="Stochastic depth while training")


def default_key(name: str) -> str:
    """A teacher's name in metrics by default: its architecture (resnet50.a1_in1k → resnet50, hf-hub:org/ViT-B
    → vit_b), in the characters a key allows."""
    base = name.split("/")[-1] if name.startswith("hf-hub:") else name.split(".")[0]
    key = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_") or "teacher"
    key = key if key[0].isalpha() else f"t_{key}"
    return f"{key}_teacher" if key in RESERVED_KEYS else key


class ModelConfig(Section):
    teacher: TeacherSpec | None = Field(
        None, description="The frozen model the student learns from (or model.teachers, for several)"
    )
    teachers: list[TeacherSpec] | None = Field(
        None,
        min_length=1,
        description="Several frozen teachers for one student (agglomerative distillation, docs/teachers.md): "
        "each entry is what model.teacher is; give model.teacher or model.teachers, not both",
    )
    student: StudentSpec
    projector_hidden_dim: int = Field(
        0,
        ge=0,
        description="Hidden width of each student→teacher feature adaptor (the projector); 0: one linear layer",
    )

    @model_validator(mode="after")
    def _one_teacher_key(self) -> ModelConfig:
        if (self.teacher is None) == (self.teachers is None):
            raise ValueError(
                "give the teacher as model.teacher, or several as model.teachers (a list), not both"
                if self.teacher is not None
                else "model.teacher is missing: give the frozen model to distil from (or model.teachers)"
            )
        keys = [t.key for t in self.teacher_specs if t.key is not None]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(
                f"model.teachers: key {repeated[0]!r} names more than one teacher; keys must differ"
            )
        return self

    @property
    def teacher_specs(self) -> list[TeacherSpec]:
        """Every teacher, in order: model.teachers, or model.teacher as a list of one."""
        if self.teachers is not None:
            return list(self.teachers)
        assert self.teacher is not None  # the validator makes sure one of the two is given
        return [self.teacher]

    @property
    def primary_teacher(self) -> TeacherSpec:
        """The first teacher: the one whose classes the student's own classifier learns (and the only one, mostly)."""
        return self.teacher_specs[0]

    def teacher_where(self, index: int) -> str:
        """Where a teacher is set, for messages: model.teacher, or model.teachers[i] (its name)."""
        spec = self.teacher_specs[index]
        return "model.teacher" if self.teachers is None else f"model.teachers[{index}] ({spec.name})"

    @property
    def teacher_keys(self) -> list[str]:
        """Each teacher's name in metrics, the cache and exported heads: its key, or default_key numbered
        (_2, _3, ...) where two teachers would share one."""
        specs = self.teacher_specs
        keys: list[str] = []
        given = {spec.key for spec in specs if spec.key is not None}
        for spec in specs:
            if spec.key is not None:
                keys.append(spec.key)
                continue
            key = default_key(spec.name)
            number, candidate = 2, key
            while candidate in keys or candidate in given:
                candidate, number = f"{key}_{number}", number + 1
            keys.append(candidate)
        return keys
