"""The student: a timm backbone with one adaptor per teacher that maps its features to that teacher's (pooled
embedding, patch tokens resized to the teacher's token grid, logits), and what it gives back for a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from dali_kd.data.outputs import ModelOutput
from dali_kd.models.inputs import InputAdapter
from dali_kd.models.timm_models import embed_dim, model_outputs, patch_grid, token_dim


class StudentOutput(NamedTuple):
    """raw: the backbone's outputs; adapted: per teacher, the student's outputs mapped to that teacher's (pooled at
    its width, logits, patch tokens on its grid; None where that teacher is not matched on them)."""

    raw: ModelOutput
    adapted: list[ModelOutput]

    @property
    def projected(self) -> torch.Tensor:
        """The first teacher's adapted pooled embedding."""
        pooled = self.adapted[0].pooled
        assert pooled is not None  # every adaptor maps the pooled embedding
        return pooled

    @property
    def patches(self) -> torch.Tensor | None:
        """The first teacher's adapted patch tokens."""
        return self.adapted[0].patch_tokens


def _projector(in_dim: int, out_dim: int, hidden_dim: int, identity_if_same: bool = True) -> nn.Module:
    """A linear layer (hidden_dim 0) or a two-layer MLP; identity_if_same: the identity where the widths agree
    (the first teacher's projector: the student's features themselves)."""
    if hidden_dim == 0:
        return nn.Linear(in_dim, out_dim) if in_dim != out_dim or not identity_if_same else nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class AdaptorShape(NamedTuple):
    """What a teacher's adaptor maps to: its pooled width, its token width (None: its tokens are not matched), its
    classes (0: no logits head; the first teacher's logits are the student's own classifier's) and its token grid
    (None: the student's, no resize)."""

    pooled_dim: int
    token_dim: int | None = None
    num_classes: int = 0
    token_grid: tuple[int, int] | None = None


class TeacherAdaptor(nn.Module):
    """The student's head toward one teacher: pooled embedding → the teacher's, patch tokens → its tokens (resized
    to its token grid where that differs from the student's), pooled embedding → its logits."""

    def __init__(
        self,
        pooled: nn.Module,
        patches: nn.Module | None = None,
        logits: nn.Module | None = None,
        token_grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.pooled = pooled
        self.patches = patches
        self.logits = logits
        self.token_grid = token_grid

    def adapt(self, raw: ModelOutput, student_grid: tuple[int, int] | None, first: bool) -> ModelOutput:
        """raw: the student's outputs; first: this is the first teacher's adaptor (its logits are raw's own)."""
        assert raw.pooled is not None  # a model's own outputs always have it
        tokens = None
        if self.patches is not None and raw.patch_tokens is not None:
            tokens = self.patches(raw.patch_tokens)
            if self.token_grid is not None and student_grid is not None and self.token_grid != student_grid:
                tokens = resize_tokens(tokens, student_grid, self.token_grid)
        logits = raw.logits
        if not first:
            logits = None if self.logits is None else self.logits(raw.pooled)
        return ModelOutput(self.pooled(raw.pooled), logits, tokens)


def resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, D] tokens on grid (h, w) → [B, H*W, D] on `to`, bilinear over the 2-D grid."""
    batch, _, dim = tokens.shape
    image = tokens.transpose(1, 2).reshape(batch, dim, *grid)
    resized = F.interpolate(image.float(), size=to, mode="bilinear", align_corners=False).to(tokens.dtype)
    return resized.flatten(2).transpose(1, 2)


class Student(nn.Module):
    """The trained model plus one adaptor per teacher, mapping its features to that teacher's (dropped after
    training, or exported as heads).

    The first teacher's adaptor is built first, as `projector` (and `patch_projector`); its logits are the student's
    own classifier's. `extra_teachers`: the shapes of the other teachers' adaptors, built after it.
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
        extra_teachers: Sequence[AdaptorShape] = (),
    ):
        super().__init__()
        self.backbone = backbone
        self.input = input
        self.token_grid = patch_grid(backbone)
        first = TeacherAdaptor(
            _projector(embed_dim(backbone), teacher_dim, hidden_dim),
            _projector(token_dim(backbone), teacher_dim, hidden_dim) if with_patches else None,
        )
        self.adaptors = nn.ModuleList([first])
        for shape in extra_teachers:
            self.adaptors.append(self._adaptor(shape, hidden_dim))
        self.with_patches = any(self.adaptor(i).patches is not None for i in range(len(self.adaptors)))
        # Checkpoints name the first adaptor's parts as the student always has: projector, patch_projector.
        self.register_state_dict_post_hook(_first_adaptor_saved_as_projector)
        self.register_load_state_dict_pre_hook(_projector_loaded_as_first_adaptor)

    def _adaptor(self, shape: AdaptorShape, hidden_dim: int) -> TeacherAdaptor:
        # The other teachers' adaptors always learn (never the identity): the student's own features serve the first.
        in_dim, tokens_in = embed_dim(self.backbone), token_dim(self.backbone)
        return TeacherAdaptor(
            _projector(in_dim, shape.pooled_dim, hidden_dim, identity_if_same=False),
            None
            if shape.token_dim is None
            else _projector(tokens_in, shape.token_dim, hidden_dim, identity_if_same=False),
            nn.Linear(embed_dim(self.backbone), shape.num_classes) if shape.num_classes > 0 else None,
            shape.token_grid,
        )

    def adaptor(self, index: int) -> TeacherAdaptor:
        """Teacher `index`'s adaptor (config order)."""
        return cast(TeacherAdaptor, self.adaptors[index])

    @property
    def projector(self) -> nn.Module:
        """The first teacher's pooled adaptor."""
        return self.adaptor(0).pooled

    @property
    def patch_projector(self) -> nn.Module | None:
        """The first teacher's patch-token adaptor (None: its tokens are not matched)."""
        return self.adaptor(0).patches

    def _views(self, images: torch.Tensor, with_patches: bool, resize: bool = True) -> StudentOutput:
        if self.input is not None:
            images = self.input(images, resize=resize)
        out = model_outputs(self.backbone, images, with_patches)
        adapted = [
            self.adaptor(i).adapt(out, self.token_grid, first=i == 0) for i in range(len(self.adaptors))
        ]
        return StudentOutput(out, adapted)

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

    def teacher_outputs(self, images: torch.Tensor) -> list[ModelOutput]:
        """Each teacher's adapted pooled embedding, logits and (where matched) patch tokens for pipeline images, in
        teacher order (eval mode is the caller's business)."""
        return self._views(images, self.with_patches).adapted

    def evaluate(self, images: torch.Tensor, backbone: nn.Module | None = None) -> ModelOutput:
        """The backbone's (or these weights', e.g. the EMA's) pooled embedding and logits for pipeline images
        (eval mode is the caller's business)."""
        if self.input is not None:
            images = self.input(images)
        return model_outputs(self.backbone if backbone is None else backbone, images, with_patches=False)


# The first adaptor's state-dict keys and the names checkpoints give them.
FIRST_ADAPTOR_KEYS = (("adaptors.0.pooled.", "projector."), ("adaptors.0.patches.", "patch_projector."))


def _rename_keys(state_dict: dict, prefix: str, renames: Sequence[tuple[str, str]]) -> None:
    """Rename, in place and in order, the keys under prefix that start with one of renames' old names."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        for old, new in renames:
            if key.startswith(prefix + old):
                key = prefix + new + key[len(prefix + old) :]
                break
        state_dict[key] = value


def _first_adaptor_saved_as_projector(module: nn.Module, state_dict: dict, prefix: str, _meta: Any) -> None:
    _rename_keys(state_dict, prefix, FIRST_ADAPTOR_KEYS)


def _projector_loaded_as_first_adaptor(module: nn.Module, state_dict: dict, prefix: str, *_args: Any) -> None:
    _rename_keys(state_dict, prefix, [(new, old) for old, new in FIRST_ADAPTOR_KEYS])
