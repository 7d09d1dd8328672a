"""timm models built by name, with pretrained weights from the local caches (hub.py) or a checkpoint file, and what
one pass of such a model gives (a ModelOutput)."""

from __future__ import annotations

import contextlib
import difflib
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dali_kd import console
from dali_kd.config import ModelConfig, ModelSpec
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.models.hub import HF_HUB_PREFIX, PretrainedWeights, find_pretrained

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
    state: Any
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
    named: list[tuple[str, ModelSpec]] = [
        (cfg.teacher_where(i), spec) for i, spec in enumerate(cfg.teacher_specs)
    ]
    for where, spec in [*named, ("model.student", cfg.student)]:
        if spec.pretrained and spec.checkpoint:
            console.info(f"{where}: the weights come from its checkpoint (it wins over pretrained: true)")
        pretrained_weights(spec, "student" if where == "model.student" else "teacher")


def classifier_size(name: str, weights: dict[str, torch.Tensor]) -> int | None:
    """The classifier outputs that `weights` (a state dict) give timm model `name`: the rows of its classifier's
    weight, 0 where they have none, None where the model's classifier has no single weight to look at."""
    with torch.device("meta"):  # the layer names only: no memory, no initialisation
        model = _timm(timm.create_model(name, pretrained=False, num_classes=1))
    classifier = model.get_classifier()
    module_names = {module: module_name for module_name, module in model.named_modules()}
    if not isinstance(classifier, nn.Module) or not isinstance(
        getattr(classifier, "weight", None), torch.Tensor
    ):
        return None
    weight = weights.get(f"{module_names[classifier]}.weight")
    return 0 if weight is None else int(weight.shape[0])


def teacher_classes(spec: ModelSpec, weights: PretrainedWeights | None, key: str = "model.teacher") -> int:
    """A teacher's classifier size. null: the pretrained head's count, or the checkpoint's (a random init: 1000).
    key: where the teacher is set, for messages."""
    default = weights.num_classes if weights is not None else 1000
    if weights is None and spec.checkpoint and spec.num_classes is None:
        found = classifier_size(spec.name, read_weights(Path(spec.checkpoint).expanduser()))
        default = default if found is None else found
    classes = default if spec.num_classes is None else spec.num_classes
    if weights is not None and classes not in (0, weights.num_classes):
        # timm would give the frozen teacher a fresh, random head: its logits would teach noise.
        raise UserError(
            f"{key}.num_classes={classes}, but the pretrained {spec.name} has "
            f"{weights.num_classes or 'no'} classifier outputs: a frozen teacher with a new random head teaches "
            f"random logits; use null (its own head) or 0 (no head, feature loss only)"
        )
    return classes


def head_sizes(cfg: ModelConfig, teacher: PretrainedWeights | None) -> tuple[int, int]:
    """(first teacher, student) classifier sizes (see teacher_classes); the student's null: the first teacher's,
    so that the logit loss applies."""
    classes = teacher_classes(cfg.primary_teacher, teacher)
    student_classes = classes if cfg.student.num_classes is None else cfg.student.num_classes
    return classes, student_classes


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """A ViT-style model's patch-token grid (rows, columns); None for a model without patch tokens."""
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if grid is None or not hasattr(model, "num_prefix_tokens"):
        return None
    rows, columns = grid
    return int(rows), int(columns)


def _timm(model: nn.Module) -> Any:
    """The model as timm builds it: its methods and sizes (forward_features, num_features, ...) are timm's, which
    nn.Module's types do not list."""
    return model


def model_outputs(model: nn.Module, images: torch.Tensor, with_patches: bool) -> ModelOutput:
    """Pooled embedding, logits and (ViTs) patch tokens from one pass of a timm model."""
    timm_model = _timm(model)
    tokens = timm_model.forward_features(images)
    pooled = timm_model.forward_head(tokens, pre_logits=True)
    logits = timm_model.get_classifier()(pooled) if timm_model.num_classes > 0 else None
    patches = tokens[:, timm_model.num_prefix_tokens :] if with_patches else None
    return ModelOutput(pooled=pooled, logits=logits, patch_tokens=patches)


def same_token_grid(teacher: nn.Module, student: nn.Module) -> bool:
    """Patch-token distillation needs two ViT-style models with the same token grid."""
    grid = patch_grid(teacher)
    return grid is not None and grid == patch_grid(student)


def embed_dim(model: nn.Module) -> int:
    """The size of the pooled embedding that model_outputs returns. Not num_features: that is the size of the
    feature map, and models with a convolution or MLP between pooling and the classifier (MobileNetV3, LCNet)
    pool to head_hidden_size (1024 against 576 for mobilenetv3_small_100)."""
    timm_model = _timm(model)
    return int(getattr(timm_model, "head_hidden_size", None) or timm_model.num_features)


def token_dim(model: nn.Module) -> int:
    """The size of one token of the feature map (a ViT's patch tokens)."""
    return int(_timm(model).num_features)
