"""The models: timm models built by name with their weights (timm_models.py; hub.py finds pretrained weights in the
local caches; inputs.py gives each model its own size and normalisation) and the distillation's wrappers."""

from dali_kd.models.distill import DistillModels, FrozenTeacher, build_distill_models, model_input
from dali_kd.models.student import AdaptorShape, Student, StudentOutput, TeacherAdaptor
from dali_kd.models.timm_models import (
    ModelOutput,
    build_model,
    check_model_name,
    classifier_size,
    create_model,
    fetch_pretrained,
    head_sizes,
    model_outputs,
    pretrained_weights,
    read_weights,
    strip_wrapper_prefixes,
)

__all__ = [
    "AdaptorShape",
    "DistillModels",
    "TeacherAdaptor",
    "FrozenTeacher",
    "ModelOutput",
    "Student",
    "StudentOutput",
    "build_distill_models",
    "build_model",
    "check_model_name",
    "classifier_size",
    "create_model",
    "fetch_pretrained",
    "head_sizes",
    "model_input",
    "model_outputs",
    "pretrained_weights",
    "read_weights",
    "strip_wrapper_prefixes",
]
