"""Each model sees its own input: the teacher's and the student's normalisation and size, from the same view."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dali_kd.models.inputs import InputAdapter, InputSpec
from dali_kd.pipelines.params import IMAGENET_MEAN, IMAGENET_STD
from dali_kd.training.trainer import Trainer

CPU = torch.device("cpu")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_the_adapter_renormalises_to_the_models_own_statistics():
    pixels = torch.rand(2, 3, 8, 8)
    adapter = InputAdapter(InputSpec(8, IMAGENET_MEAN, IMAGENET_STD), InputSpec(8, CLIP_MEAN, CLIP_STD))
    out = adapter(normalise(pixels, IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(out, normalise(pixels, CLIP_MEAN, CLIP_STD))
    assert out.shape == (2, 3, 8, 8)


def test_the_adapter_resizes_as_the_pipeline_does_and_is_free_when_nothing_differs():
    images = torch.randn(2, 3, 48, 48)
    resize = InputAdapter(
        InputSpec(48, IMAGENET_MEAN, IMAGENET_STD), InputSpec(32, IMAGENET_MEAN, IMAGENET_STD)
    )
    expected = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(resize(images), expected)
    assert resize(images, resize=False) is images, "local crops keep their size"
    same = InputAdapter(
        InputSpec(48, IMAGENET_MEAN, IMAGENET_STD), InputSpec(48, IMAGENET_MEAN, IMAGENET_STD)
    )
    assert same.is_identity and same(images) is images


def test_half_precision_images_are_resized_on_the_cpu():
    images = torch.randn(1, 3, 40, 40).half()
    adapter = InputAdapter(InputSpec(40, IMAGENET_MEAN, IMAGENET_STD), InputSpec(24, CLIP_MEAN, CLIP_STD))
    out = adapter(images)
    assert out.dtype == torch.float16 and out.shape == (1, 3, 24, 24)


class InputShapes:
    """Forward pre-hooks that record the shape of what a model's first layer is fed."""

    def __init__(self, module: torch.nn.Module):
        self.shapes: list[tuple[int, ...]] = []
        module.register_forward_pre_hook(lambda _m, args: self.shapes.append(tuple(args[0].shape)))


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_larger_teacher_and_a_smaller_student_see_the_same_view_at_their_own_size(
    tiny_config, tmp_path, backend
):
    cfg = tiny_config(
        f"data.backend={backend}",
        "data.teacher_image_size=48",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
    )
    trainer = Trainer(cfg, CPU, show_progress=False)
    teacher_in = InputShapes(trainer.parts.teacher.model.conv1)
    student_in = InputShapes(trainer.parts.student.backbone.patch_embed)
    batch = next(iter(trainer.parts.stream))
    assert batch.images.shape[-2:] == (48, 48), "the pipeline cuts each view once, at the larger size"
    trainer.train_step(batch)
    assert teacher_in.shapes[-1][-2:] == (48, 48)
    assert student_in.shapes[-1][-2:] == (32, 32)
    # The student's view is the teacher's view resized: the same crop, flip and jitter.
    student_view = trainer.parts.student.input(batch.images)
    torch.testing.assert_close(
        student_view,
        F.interpolate(batch.images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False),
    )
    summary = trainer.fit(tmp_path / "run")
    assert summary["inputs"]["teacher"]["size"] == 48 and summary["inputs"]["student"]["size"] == 32
    assert summary["student_knn_top1"] is not None


def test_eval_covers_the_same_field_of_view_at_the_view_size(tiny_config):
    cfg = tiny_config("data.teacher_image_size=48")  # image_size 32, eval_resize 36
    params = cfg.eval_params()
    assert (params.view_size, params.resize_size) == (48, 54), "36/32 of the crop, as for the student alone"
    assert cfg.augment_params().view_size == 48
    plain = tiny_config().eval_params()
    assert (plain.view_size, plain.resize_size) == (32, 36)


def test_a_teacher_with_its_own_statistics_gets_them_and_the_student_keeps_the_pipelines(
    tiny_config, tmp_path
):
    cfg = tiny_config(
        f"model.teacher.mean=[{', '.join(map(str, CLIP_MEAN))}]",
        f"model.teacher.std=[{', '.join(map(str, CLIP_STD))}]",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
    )
    trainer = Trainer(cfg, CPU, show_progress=False)
    assert trainer.parts.student.input is None, "the student is fed the pipeline's normalisation as it is"
    batch = next(iter(trainer.parts.stream))
    pixels = batch.images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(
        1, 3, 1, 1
    )
    targets = trainer.parts.teacher(batch.images)
    with torch.inference_mode():
        direct = trainer.parts.teacher.model(normalise(pixels, CLIP_MEAN, CLIP_STD))
    torch.testing.assert_close(targets.logits, direct.float(), rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        unadapted = trainer.parts.teacher.model(batch.images)
    assert not torch.allclose(targets.logits, unadapted.float(), atol=1e-3), "the check can fail"
    summary = trainer.fit(tmp_path / "run")
    assert summary["inputs"]["teacher"]["mean"] == pytest.approx(list(CLIP_MEAN))
    assert summary["inputs"]["student"]["mean"] == pytest.approx(list(IMAGENET_MEAN))


def test_a_pretrained_teacher_takes_its_weights_statistics_unless_the_config_names_them(tiny_config):
    from dali_kd.models import build_model, model_input

    cfg = tiny_config()
    teacher = build_model(cfg.model.teacher, "teacher", 32, 4)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "mean": CLIP_MEAN, "std": CLIP_STD}
    pipeline = InputSpec(32, IMAGENET_MEAN, IMAGENET_STD)
    spec = cfg.model.teacher.model_copy(update={"pretrained": True})
    assert model_input(spec, teacher, 32, pipeline).mean == CLIP_MEAN
    named = spec.model_copy(update={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    assert model_input(named, teacher, 32, pipeline).mean == (0.5, 0.5, 0.5)
    # Weights trained here (a checkpoint, which wins over pretrained; a random init) learnt with the pipeline's.
    assert model_input(
        spec.model_copy(update={"checkpoint": "t.safetensors"}), teacher, 32, pipeline
    ).mean == (IMAGENET_MEAN)
    assert model_input(cfg.model.teacher, teacher, 32, pipeline).mean == IMAGENET_MEAN


def test_a_cache_with_a_larger_teacher_replays_what_the_teacher_saw(tiny_config, tmp_path):
    """The cache's views are the pipeline's: the teacher resizes them when filling, probing and replaying alike."""
    cfg = tiny_config(
        "data.teacher_image_size=48",
        "train.cache_teacher_features=true",
        f"train.teacher_feature_dir={tmp_path / 'cache'}",
        "train.cache_views_per_image=1",
        "train.epochs=3",
        "train.max_steps_per_epoch=4",
        "train.cache_probe_every_n_steps=5",
    )
    summary = Trainer(cfg, CPU, show_progress=False).fit(tmp_path / "run")
    assert summary["cache_hits"] > 0
    assert summary["teacher_probe_batches"] > 0 and summary["cache_fidelity_min"] > 0.999, summary
