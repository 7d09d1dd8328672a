"""The model section: the teacher and the student (a timm name, weights, normalisation, classes) and the projector
between them; every key declared once, with its type, range, default and meaning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

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
