"""What an export reads from a run directory: its config, the student's weights (raw or EMA, final or from the
newest checkpoint) and the preprocessing its evaluation used, written out as preprocess.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import dali_kd
from dali_kd.config import Config
from dali_kd.config.loading import load_config_file
from dali_kd.errors import UserError
from dali_kd.models import classifier_size, model_input, read_weights, strip_wrapper_prefixes
from dali_kd.models.inputs import InputSpec

# The checkpoint's whole Student is saved; its timm model is the `backbone.` part (the projectors stay behind).
BACKBONE_PREFIX = "backbone."
# Where a checkpoint keeps the EMA of the student, if the run keeps one.
EMA_CHECKPOINT_KEY = "student_ema"
# Where a checkpoint (and the final <name>.safetensors) keeps the statistics of standardised teachers' targets.
STANDARDISER = "teacher_standardiser"


@dataclass
class StudentWeights:
    """The student's timm state dict and where it came from, in words (a file, or a checkpoint's step)."""

    state_dict: dict[str, torch.Tensor]
    weights: str  # "raw" or "ema"
    source: str
    # Where the weights came from a checkpoint: the whole Student's state dict (backbone and adaptors), and the
    # statistics of the teachers whose targets were standardised (None: none was).
    student_state: dict[str, torch.Tensor] | None = None
    standardiser: dict[str, torch.Tensor] | None = None


def read_run_config(run_dir: Path) -> Config:
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a dali_kd run directory (no config.yaml)")
    return load_config_file(path)


def _from_checkpoint(run_dir: Path, ema: bool) -> StudentWeights:
    """The student of a run still in progress (or stopped early): its newest complete checkpoint."""
    from dali_kd.runs import checkpoint

    latest = checkpoint.CheckpointDir(run_dir, 1).latest()
    final = "student_ema.safetensors" if ema else "student.safetensors"
    if latest is None:
        raise UserError(
            f"{run_dir}: no {final} and no checkpoint to export from (has the run saved one yet?)"
        )
    try:
        state = checkpoint.load(latest)
    except UserError as e:  # its messages are worded for --resume; the path they name is what matters here
        raise UserError(str(e).removeprefix("--resume: ")) from None
    key = EMA_CHECKPOINT_KEY if ema else "student"
    if not isinstance(state.get(key), dict):
        raise UserError(f"{run_dir}: the run has no EMA weights (no {final}, no {key} in {latest.name})")
    student = strip_wrapper_prefixes(state[key])
    backbone = {
        k.removeprefix(BACKBONE_PREFIX): v for k, v in student.items() if k.startswith(BACKBONE_PREFIX)
    }
    source = f"{latest} (step {state['step']})"
    return StudentWeights(backbone, "ema" if ema else "raw", source, student, state.get(STANDARDISER))


def read_student_weights(run_dir: Path, ema: bool) -> StudentWeights:
    """The final weights when the run has finished, else those of its newest checkpoint."""
    path = run_dir / ("student_ema.safetensors" if ema else "student.safetensors")
    if path.is_file():
        return StudentWeights(read_weights(path), "ema" if ema else "raw", str(path))
    if ema and (run_dir / "student.safetensors").is_file():
        # A finished run without the file never had an EMA: its checkpoints will not have one either.
        raise UserError(
            f"{run_dir}: the run has no EMA weights (no student_ema.safetensors); export without --ema"
        )
    return _from_checkpoint(run_dir, ema)


# The files a finished run keeps the student's adaptors in (dali_kd.training.run_files.write_final), each under the
# prefix its keys have in the whole Student's state dict.
ADAPTOR_FILES = (
    ("projector.safetensors", "projector."),
    ("patch_projector.safetensors", "patch_projector."),
    ("adaptors.safetensors", ""),
)


def read_standardiser(run_dir: Path, weights: StudentWeights) -> dict[str, torch.Tensor] | None:
    """The running statistics of the teachers whose targets training standardised (None: no teacher was): the
    checkpoint's, or the final file's."""
    if weights.student_state is not None:
        return weights.standardiser
    path = run_dir / f"{STANDARDISER}.safetensors"
    return read_weights(path) if path.is_file() else None


def read_student_state(run_dir: Path, weights: StudentWeights) -> dict[str, torch.Tensor]:
    """The whole Student (backbone and adaptor heads) whose backbone `weights` holds: its checkpoint's, or the
    final files' (student.safetensors beside the adaptors')."""
    if weights.student_state is not None:
        return weights.student_state
    state = {BACKBONE_PREFIX + k: v for k, v in weights.state_dict.items()}
    for name, prefix in ADAPTOR_FILES:
        if (run_dir / name).is_file():
            state.update({prefix + k: v for k, v in read_weights(run_dir / name).items()})
    return state


def student_num_classes(cfg: Config, weights: StudentWeights) -> int:
    """The student's head size as training built it (dali_kd.models.build_distill_models): model.student.num_classes,
    else the head its weights have (null means the teacher's head, which the teacher's weights decide)."""
    if cfg.model.student.num_classes is not None:
        return cfg.model.student.num_classes
    found = classifier_size(cfg.model.student.name, weights.state_dict)
    return 1000 if found is None else found


def timm_kwargs(name: str, image_size: int, num_classes: int) -> dict[str, Any]:
    """The timm.create_model arguments that rebuild the student (ViT-style models take img_size, CNNs refuse it);
    what the safetensors export prints and records, so a user builds the same model."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "img_size": image_size}
    try:
        timm.create_model(name, pretrained=False, **kwargs)
    except TypeError:
        kwargs.pop("img_size")
    return kwargs


def build_student(cfg: Config, weights: StudentWeights) -> tuple[nn.Module, dict[str, Any]]:
    """The eval-mode timm student with the weights loaded, and the create_model arguments that built it."""
    name = cfg.model.student.name
    kwargs = timm_kwargs(name, cfg.data.image_size, student_num_classes(cfg, weights))
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(weights.state_dict)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e)[:200])
        raise UserError(
            f"{weights.source}: weights do not fit {name} as config.yaml builds it: {first}"
        ) from None
    return model.eval().requires_grad_(False), kwargs


def class_names(run_dir: Path, cfg: Config, num_classes: int) -> list[str] | None:
    """The training classes (label order) when the student's head has exactly them: from summary.json, which
    records them, else from the training folder if it is still there; None otherwise."""
    import json

    names = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            names = json.loads(summary.read_text()).get("class_names")
        except (OSError, ValueError, AttributeError):
            names = None
    if names is None:
        from dali_kd.data.dataset import ImageIndex

        try:
            if cfg.data.file_list:
                paths = ImageIndex.read_file_list(Path(cfg.data.file_list).expanduser(), Path(cfg.data.root))
                names = sorted({Path(p).parts[0] for p in paths})
            else:
                names = list(ImageIndex.class_folders(cfg.data.root))
        except (UserError, OSError):
            return None
    return list(names) if len(names) == num_classes else None


def student_input(cfg: Config, model: nn.Module) -> InputSpec:
    """The size and normalisation the student was trained on, decided as training decided it
    (dali_kd.models.model_input: model.student.mean/std, else its pretrained weights', else data.augment's)."""
    pipeline = InputSpec(cfg.view_size, cfg.data.augment.mean, cfg.data.augment.std)
    return model_input(cfg.model.student, model, cfg.data.image_size, pipeline)


def preprocess_spec(
    cfg: Config, model: nn.Module, weights: StudentWeights, kwargs: dict[str, Any], names: list[str] | None
) -> dict[str, Any]:
    """How to feed the model exactly as dali_kd's evaluation did (pipelines/augment.py's eval graph, the
    torchvision backend's eval transform): resize, centre crop, scale to 0-1, normalise; NCHW float32 RGB."""
    d = cfg.data
    fed = student_input(cfg, model)
    return {
        "model": cfg.model.student.name,
        "timm_kwargs": kwargs,
        "num_classes": kwargs["num_classes"],
        "class_names": names,
        "weights": weights.weights,
        "source": weights.source,
        "resize_shorter_side": d.eval_resize,
        "center_crop": d.image_size,
        "image_size": d.image_size,
        "interpolation": "bilinear",
        "antialias": True,
        "scale": "pixels / 255 (0-1)",
        "mean": list(fed.mean),
        "std": list(fed.std),
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "dali_kd_version": dali_kd.__version__,
    }
