"""The whole config and its rules across sections: settings that are each valid but do not work together are
refused here, naming every key involved with its value."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, TypeAdapter, model_validator

from dali_kd.config.data_section import MIX_KEYS, DataConfig
from dali_kd.config.model_section import ModelConfig
from dali_kd.config.section import Section, section_type
from dali_kd.config.stream_settings import StreamSettings
from dali_kd.config.train_section import TrainConfig
from dali_kd.pipelines.params import (
    MIXED_DECODER_OPTIONS,
    AugmentParams,
    DecodeParams,
    EvalParams,
    MultiCropParams,
)

_KEY_IN_BRACES = re.compile(r"\{((?:data|train|model)\.[a-z_.]+)\}")


class ConfigConflict(ValueError):
    """Settings that are each valid but do not work together; `keys` are their dotted names (to say where they
    were set)."""

    def __init__(self, keys: tuple[str, ...], message: str):
        super().__init__(message)
        self.keys = keys


def show_value(value: Any, *, float_point: bool = False) -> str:
    """A value as the user writes it in YAML or on the command line; `float_point` writes a whole float as 1.0,
    not 1 (the reference says so of a key that takes a float)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float):
        text = f"{value:g}"
        return f"{text}.0" if float_point and text.lstrip("-").isdigit() else text
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show_value(v, float_point=float_point) for v in value) + "]"
    return str(value)


class Config(Section):
    data: DataConfig
    train: TrainConfig
    model: ModelConfig

    def value(self, key: str) -> Any:
        """The value at a dotted key, e.g. cfg.value("train.optimizer.lr")."""
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        """Refuse at load time what would crash (or silently do something else) later; name every key."""
        self._check_eval_schedule_and_losses()
        self._check_multi_crop()
        self._check_images()
        self._check_teacher_cache()
        return self

    def _conflict(self, message: str) -> ConfigConflict:
        # Every {dotted.key} in the message is written as key=value; those are the keys the error names.
        keys = tuple(dict.fromkeys(_KEY_IN_BRACES.findall(message)))
        return ConfigConflict(
            keys, _KEY_IN_BRACES.sub(lambda m: f"{m[1]}={show_value(self.value(m[1]))}", message)
        )

    def _check_eval_schedule_and_losses(self) -> None:
        d, t = self.data, self.train
        if (d.val_root is not None or d.holds_out) and d.eval_resize < d.image_size:
            raise self._conflict(
                "{data.eval_resize} is smaller than {data.image_size}: the eval centre crop would not fit; "
                "raise data.eval_resize or lower data.image_size"
            )
        if t.optimizer.min_lr > t.optimizer.lr:
            raise self._conflict(
                "{train.optimizer.min_lr} is larger than {train.optimizer.lr}: the schedule would rise "
                "instead of decaying; lower train.optimizer.min_lr or raise train.optimizer.lr"
            )
        loss = t.loss
        if loss.feature_weight == loss.patch_weight == loss.logit_weight == loss.label_weight == 0:
            raise self._conflict(
                "{train.loss.feature_weight}, {train.loss.patch_weight}, {train.loss.logit_weight} and "
                "{train.loss.label_weight}: every loss weight is 0, so there is nothing to learn; give one "
                "of them a weight > 0"
            )

    def _check_multi_crop(self) -> None:
        d, t = self.data, self.train
        if not t.use_local_crops:
            return
        if d.local_crop_size > d.image_size:
            raise self._conflict(
                "{data.local_crop_size} is larger than {data.image_size} with {train.use_local_crops}: "
                "local crops are the small views; lower data.local_crop_size or raise data.image_size"
            )
        if len(self.model.teacher_specs) > 1:
            raise self._conflict(
                "{train.use_local_crops} with several model.teachers: multi-crop distils one teacher; turn "
                "train.use_local_crops off or give one teacher"
            )
        if t.cache_teacher_features:
            raise self._conflict(
                "{train.cache_teacher_features} cannot be combined with {train.use_local_crops}: the "
                "teacher cache stores one view per sample, multi-crop makes several; turn one of them off"
            )
        if t.loss.global_pairing == "cross" and d.num_global_crops < 2:
            raise self._conflict(
                "{train.loss.global_pairing} needs data.num_global_crops >= 2 "
                "(got {data.num_global_crops}): cross pairs each global crop with the other ones; use "
                "same or all, or more global crops"
            )

    def _check_images(self) -> None:
        """The images the data section hands out: their dtype, where they come from, their mixing."""
        d, t = self.data, self.train
        # autocast_dtype() gives bf16 for precision bf16, or auto on cuda; anything else would feed fp16 images
        # to fp32 weights.
        if d.output_dtype == "float16" and not (
            t.precision == "bf16" or (t.precision == "auto" and t.device == "cuda")
        ):
            raise self._conflict(
                "{data.output_dtype} needs bf16 autocast (got {train.precision} with {train.device}): the models "
                "would get half-precision images against float32 weights; set train.precision=bf16 or "
                "data.output_dtype=float32"
            )
        if d.format == "shards" and d.file_list:
            raise self._conflict(
                "{data.file_list} with {data.format}: a shard folder holds the samples it was made from; make "
                "shards from the list instead (python -m dali_kd.shard --file-list LIST SRC OUT)"
            )
        if d.format == "shards" and d.holds_out:
            raise self._conflict(
                "{data.holdout_fraction} with {data.format} and no data.val_root: a shard folder cannot be split; "
                "give data.val_root (shards of held-out images: python -m dali_kd.shard) or set "
                "data.holdout_fraction=0 (no evaluation)"
            )
        if d.augment.mix != "none" and t.batch_size < 2:
            raise self._conflict(
                "{data.augment.mix} needs a partner for each image in its batch, and {train.batch_size} leaves "
                "none: each image would be mixed with itself; raise train.batch_size or set data.augment.mix=none"
            )

    def _check_teacher_cache(self) -> None:
        d, t = self.data, self.train
        if not t.cache_teacher_features:
            return
        if len(self.model.teacher_specs) > 1:
            raise self._conflict(
                "{train.cache_teacher_features} with several model.teachers: the teacher cache stores one "
                "teacher's outputs; turn the cache off or give one teacher"
            )
        if d.backend != "dali":
            raise self._conflict(
                "{train.cache_teacher_features} needs data.backend=dali (got {data.backend}): the cache "
                "replays its stored views through the DALI graph"
            )
        if not t.teacher_feature_dir:
            raise self._conflict(
                "{train.cache_teacher_features} needs a folder (got {train.teacher_feature_dir}): set "
                "train.teacher_feature_dir for the teacher cache (it can be large)"
            )
        if not {"pooled", "logits"} & set(t.cache_outputs):
            raise self._conflict(
                "{train.cache_outputs} with {train.cache_teacher_features}: the cache's fidelity probe "
                "compares the pooled embedding or the logits; add pooled or logits"
            )
        if d.augment.mix != "none" and t.cache_mode == "fixed":
            raise self._conflict(
                "{data.augment.mix} with {train.cache_mode}: fixed mode shows fresh views (and fresh "
                "partners) against the targets of one stored mixed view; use train.cache_mode=replay"
            )
        if t.loss.feature_weight > 0 and "pooled" not in t.cache_outputs:
            raise self._conflict(
                "{train.loss.feature_weight} needs pooled in {train.cache_outputs} with "
                "{train.cache_teacher_features}: the feature loss would have no cached teacher "
                "embedding; add pooled or set train.loss.feature_weight=0"
            )

    @property
    def teacher_image_sizes(self) -> list[int]:
        """Each teacher's input side: its own image_size, else data.teacher_image_size, else data.image_size."""
        default = self.data.teacher_image_size or self.data.image_size
        return [spec.image_size or default for spec in self.model.teacher_specs]

    @property
    def teacher_image_size(self) -> int:
        """The first (or only) teacher's input side."""
        return self.teacher_image_sizes[0]

    @property
    def view_size(self) -> int:
        """Side of the views the pipelines cut: the largest input size of the student and the teachers (each
        model gets the same view resized to its own size, see dali_kd.models.inputs)."""
        return max(self.data.image_size, *self.teacher_image_sizes)

    def augment_params(self) -> AugmentParams:
        a = self.data.augment
        return AugmentParams(view_size=self.view_size, **a.model_dump(exclude=set(MIX_KEYS)))

    def crop_params(self) -> AugmentParams | MultiCropParams:
        """What the training stream makes: one view per image, or (train.use_local_crops) DINO multi-crop."""
        if not self.train.use_local_crops:
            return self.augment_params()
        d = self.data
        view = self.augment_params()
        return MultiCropParams(
            global_view=replace(view, crop_scale=d.global_crop_scale),
            local_view=replace(view, view_size=d.local_crop_size, crop_scale=d.local_crop_scale),
            num_global=d.num_global_crops,
            num_local=d.num_local_crops,
            graph=d.multi_crop_graph,
        )

    def decode_params(self) -> DecodeParams:
        """How the DALI pipelines decode (window or whole image, the GPU decoder's tuning) and their output dtype."""
        d = self.data
        # The GPU decoder's tuning keys are named as DecodeParams' fields (and DALI's arguments), defaults included.
        tuning = {name: getattr(d, name) for name in MIXED_DECODER_OPTIONS}
        return DecodeParams(mode=d.decode, dtype=d.output_dtype, **tuning)

    def eval_params(self) -> EvalParams:
        """The eval centre crop at the view size, resized so that it covers what data.eval_resize and
        data.image_size cover (the same crop fraction), whichever model's size the view is cut at."""
        a, d = self.data.augment, self.data
        resize = round(d.eval_resize * self.view_size / d.image_size)
        return EvalParams(view_size=self.view_size, resize_size=resize, mean=a.mean, std=a.std)

    def stream_settings(self) -> StreamSettings:
        """What the data layer needs to make this run's streams (see dali_kd.config.stream_settings)."""
        t = self.train
        return StreamSettings(
            data=self.data, crops=self.crop_params(), eval=self.eval_params(), decode=self.decode_params(),
            batch_size=t.batch_size, seed=t.seed, num_workers=t.num_workers, persistent_workers=t.persistent_workers,
        )  # fmt: skip


def resume_free_keys(model: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """The dotted keys declared with `free_on_resume` (the resume check ignores them)."""
    keys: set[str] = set()
    for name, field in (model or Config).model_fields.items():
        section = section_type(field.annotation)
        if section is not None:
            keys |= resume_free_keys(section, f"{prefix}{name}.")
        elif isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("resume") == "free":
            keys.add(f"{prefix}{name}")
    return keys


NO_DEFAULT = object()  # key_default's answer for a required or unknown key: equal to no value


def key_default(key: str) -> Any:
    """A dotted key's default as `model_dump(mode="json")` writes it, or `NO_DEFAULT` (a required or unknown key).

    The resume check uses it for keys a newer dali_kd added: a key the checkpoint's config does not have, set to its
    default here, trains what the older version trained (new keys default to the old behaviour)."""
    model: type[BaseModel] = Config
    *sections, leaf = key.split(".")
    for name in sections:
        field = model.model_fields.get(name)
        section = None if field is None else section_type(field.annotation)
        if section is None:
            return NO_DEFAULT
        model = section
    field = model.model_fields.get(leaf)
    if field is None or field.is_required():
        return NO_DEFAULT
    assert field.annotation is not None  # every config field is annotated
    return TypeAdapter(field.annotation).dump_python(
        field.get_default(call_default_factory=True), mode="json"
    )
