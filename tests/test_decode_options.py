"""Decoder choices: crop-window or whole-image decode, the GPU decoder's tuning and the output dtype.

DALI CPU-only, except one gpu-marked test. Each check has a counterpart that must come out differently (the replay
in the other mode, the tuning on a mixed decoder), so a test that compared a graph with itself could not pass.
"""

from __future__ import annotations

import re
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types

from dali_kd.config import StreamSettings
from dali_kd.data.dali_loader import DaliTrainStream
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.torchvision_loader import TorchvisionTrainStream
from dali_kd.errors import UserError
from dali_kd.models import FrozenTeacher, create_model
from dali_kd.pipelines.augment import decode_full
from dali_kd.pipelines.graphs import REPLAY_INPUTS, eval_pipeline, replay_pipeline, train_pipeline
from dali_kd.pipelines.params import AugmentParams, DecodeParams, EvalParams, MultiCropParams
from dali_kd.teacher_cache.cache_identity import open_teacher_cache

PARAMS = AugmentParams(view_size=32)
BATCH = 8
# GPU-decoder tuning far from DALI's defaults: on the CPU it must change nothing.
TUNED = DecodeParams(
    hw_decoder_load=0.3,
    device_memory_padding=0,
    host_memory_padding=1024,
    preallocate_width_hint=4321,
    preallocate_height_hint=1234,
)


@pytest.fixture(scope="module")
def files(image_tree) -> list[str]:
    return list(ImageIndex.from_folder(image_tree / "train").files)


def as_numpy(outputs) -> list[np.ndarray]:
    """Pipeline outputs (CPU or GPU tensor lists) as one host array each."""
    return [
        np.stack([np.array(t) for t in (out.as_cpu() if hasattr(out, "as_cpu") else out)]) for out in outputs
    ]


def first_batch(files, decode: DecodeParams, params=PARAMS, device_id: int | None = None) -> list[np.ndarray]:
    """images, sample ids, crop anchors, crop shapes, flips, jitter of the first batch (same seed every time)."""
    pipe = train_pipeline(
        files, params, batch_size=BATCH, seed=0, num_threads=1, device_id=device_id, decode=decode
    )
    pipe.build()
    return as_numpy(pipe.run())


def replay(files, batch: list[np.ndarray], **kwargs) -> np.ndarray:
    _, ids, anchor, shape, flip, jitter = batch
    pipe = replay_pipeline(PARAMS, BATCH, num_threads=1, **kwargs)
    pipe.build()
    columns = {
        "encoded": [np.fromfile(files[i], dtype=np.uint8) for i in ids.reshape(-1)],
        "crop_anchor": anchor,
        "crop_shape": shape,
        "flip": flip.astype(np.int32),
        "jitter": jitter,
    }
    for name in REPLAY_INPUTS:
        pipe.feed_input(name, columns[name])
    (images,) = pipe.run()
    return as_numpy([images])[0]


def test_decode_params_refuse_what_dali_would_misread():
    for bad, match in [
        ({"mode": "crop"}, "decode mode must be one of window, full, got 'crop'"),
        ({"dtype": "bfloat16"}, "output dtype must be one of float32, float16"),
        ({"hw_decoder_load": 1.5}, r"hw_decoder_load must be in \[0, 1\], got 1.5"),
        ({"hw_decoder_load": float("nan")}, "hw_decoder_load must be in"),
        ({"host_memory_padding": -1}, "host_memory_padding must be a whole number >= 0, got -1"),
        ({"preallocate_width_hint": 2.5}, "preallocate_width_hint must be a whole number"),
    ]:
        with pytest.raises(ValueError, match=match):
            DecodeParams(**bad)


def test_window_and_full_decode_render_the_same_view_but_at_its_edges(files):
    window = first_batch(files, DecodeParams(mode="window"))
    full = first_batch(files, DecodeParams(mode="full"))
    for a, b in zip(window[1:], full[1:], strict=True):
        np.testing.assert_array_equal(a, b)  # the same samples and view records: only the decode differs
    assert window[0].shape == full[0].shape == (BATCH, 3, 32, 32)
    assert window[0].dtype == full[0].dtype == np.float32
    diff = np.abs(window[0] - full[0])
    # Normalised units (1/255 of a channel's range is about 0.017): the resize's filter reads pixels outside the
    # window only in full mode, so the two differ in the outermost output pixels and nowhere else.
    assert diff[:, :, 2:-2, 2:-2].max() < 0.03 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert diff.max() > 0, "the two modes ran the same graph"


@pytest.mark.parametrize("mode", ["window", "full"])
def test_replay_in_the_training_mode_gives_identical_pixels(files, mode):
    decode = DecodeParams(mode=mode)
    batch = first_batch(files, decode)
    np.testing.assert_array_equal(replay(files, batch, decode=decode), batch[0])
    other = replace(decode, mode="full" if mode == "window" else "window")
    assert np.abs(replay(files, batch, decode=other) - batch[0]).max() > 0, "replay ignored decode.mode"


def test_full_decode_keyword_means_multi_crop_records(files):
    """dali_kd's view renderer says full_decode=True for multi-crop records: the per-crop graph (auto's choice in
    CPU mode) cuts them as one-view mode "full" does, the batched graph through its own chain
    (test_multi_crop checks that both replay exactly)."""
    batch = first_batch(files, DecodeParams(mode="full"))
    np.testing.assert_array_equal(replay(files, batch, decode=DecodeParams(mode="full")), batch[0])
    np.testing.assert_array_equal(replay(files, batch, full_decode=True), batch[0])
    np.testing.assert_array_equal(
        replay(files, batch, full_decode=True, multi_crop_graph="per_crop"), batch[0]
    )
    assert np.abs(replay(files, batch, full_decode=True, multi_crop_graph="batched") - batch[0]).max() > 0
    np.testing.assert_array_equal(
        replay(files, batch, full_decode=False), first_batch(files, DecodeParams())[0]
    )


def test_multi_crop_decodes_the_whole_image_whatever_the_mode(files):
    view = AugmentParams(view_size=32)
    params = MultiCropParams(view, replace(view, view_size=16), num_global=2, num_local=2)
    window, full = (first_batch(files, DecodeParams(mode=m), params) for m in ("window", "full"))
    for a, b in zip(window, full, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["window", "full"])
def test_float16_output_is_the_float32_output_rounded(files, mode):
    wide = first_batch(files, DecodeParams(mode=mode))
    half = first_batch(files, DecodeParams(mode=mode, dtype="float16"))
    assert half[0].dtype == np.float16 and half[0].shape == wide[0].shape
    np.testing.assert_array_equal(half[0], wide[0].astype(np.float16))
    for a, b in zip(wide[1:], half[1:], strict=True):
        np.testing.assert_array_equal(a, b)  # the records stay float32 and unchanged
    decode = DecodeParams(mode=mode, dtype="float16")
    np.testing.assert_array_equal(replay(files, half, decode=decode), half[0])


def test_float16_eval_output(image_tree):
    val = list(ImageIndex.from_folder(image_tree / "val").files)

    def images(dtype: str) -> np.ndarray:
        pipe = eval_pipeline(val, EvalParams(32, 36), BATCH, num_threads=1, decode=DecodeParams(dtype=dtype))
        pipe.build()
        return as_numpy(pipe.run())[0]

    half, wide = images("float16"), images("float32")
    assert half.dtype == np.float16 and half.shape == (BATCH, 3, 32, 32)
    np.testing.assert_array_equal(half, wide.astype(np.float16))


def test_gpu_decoder_tuning_is_ignored_on_the_cpu(files):
    assert TUNED.decoder_options("cpu") == {}
    for mode in ("window", "full"):
        tuned = first_batch(files, replace(TUNED, mode=mode))
        plain = first_batch(files, DecodeParams(mode=mode))
        for a, b in zip(tuned, plain, strict=True):
            np.testing.assert_array_equal(a, b)


def decoder_graph(decode_device: str, decode: DecodeParams) -> bytes:
    """The serialized graph of one whole-image decode (built, never run: a mixed decoder needs no GPU for that)."""

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return decode_full(fn.external_source(name="encoded", dtype=types.UINT8), decode_device, decode)

    return pipe().serialize()


def test_gpu_decoder_tuning_reaches_only_a_mixed_decoder():
    assert set(TUNED.decoder_options("mixed")) == {
        "hw_decoder_load", "device_memory_padding", "host_memory_padding", "preallocate_width_hint",
        "preallocate_height_hint",
    }  # fmt: skip
    mixed, cpu = decoder_graph("mixed", TUNED), decoder_graph("cpu", TUNED)
    # The serialized graph names each argument an operator was given, with its type and value.
    assert b"hw_decoder_load\x12\x05float\x1d" + struct.pack("<f", 0.3) in mixed
    assert b"preallocate_width_hint\x12\x05int64" in mixed
    assert not re.search(rb"(hw_decoder_load|memory_padding|preallocate_\w+)\x12", cpu)


def test_config_keys_make_the_decode_params(tiny_config):
    assert tiny_config().decode_params() == DecodeParams()
    cfg = tiny_config(
        "data.decode=full", "data.hw_decoder_load=0.3", "data.device_memory_padding=0",
        "data.host_memory_padding=1024", "data.preallocate_width_hint=4321", "data.preallocate_height_hint=1234",
        "data.output_dtype=float16", "train.precision=bf16",
    )  # fmt: skip
    assert cfg.decode_params() == replace(TUNED, mode="full", dtype="float16")


def test_a_stream_made_over_an_index_takes_the_data_keys_it_is_given(image_tree):
    """StreamSettings.with_defaults (tests, benchmarks): the keys given set the data section and the decode follows
    them, as a run's config does; float16 settings give float16 images on both backends."""
    settings = StreamSettings.with_defaults(
        PARAMS, BATCH, 0, decode="full", output_dtype="float16", dali_threads=1
    )
    assert settings.data.dali_threads == 1 and settings.decode == DecodeParams(mode="full", dtype="float16")
    index = ImageIndex.from_folder(image_tree / "train")
    for stream in (DaliTrainStream(settings, index), TorchvisionTrainStream(settings, index)):
        assert next(iter(stream)).images.dtype == torch.float16
        stream.close()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.precision=fp32"], "train.precision=fp32 with train.device=cpu"),
        (["train.precision=auto"], "train.precision=auto with train.device=cpu"),
    ],
)
def test_float16_output_needs_bf16_autocast(tiny_config, overrides, expected):
    with pytest.raises(UserError) as caught:
        tiny_config("data.output_dtype=float16", *overrides)
    message = str(caught.value)
    assert "\n" not in message and "data.output_dtype=float16 needs bf16 autocast" in message
    assert (
        f"(got {expected})" in message and "set train.precision=bf16 or data.output_dtype=float32" in message
    )


def test_float16_output_loads_with_bf16_autocast(tiny_config):
    assert tiny_config("data.output_dtype=float16", "train.precision=bf16").data.output_dtype == "float16"
    cuda = tiny_config("data.output_dtype=float16", "train.precision=auto", "train.device=cuda")
    assert cuda.decode_params().dtype == "float16"


def test_only_the_gpu_decoder_tuning_may_change_on_resume():
    from dali_kd.config import resume_free_keys

    free = resume_free_keys()
    tuning = {f"data.{name}" for name in DecodeParams().decoder_options("mixed")}
    assert tuning <= free and not {"data.decode", "data.output_dtype"} & free


@pytest.mark.parametrize("change", ["data.decode=full", "data.output_dtype=float16"])
def test_a_teacher_cache_built_with_other_decoding_is_refused(tiny_config, tmp_path, change):
    """Its rows are the teacher's outputs on pixels this decoding no longer makes."""
    cache = ("train.cache_teacher_features=true", f"train.teacher_feature_dir={tmp_path / 'cache'}")
    base = tiny_config(*cache, "train.precision=bf16")
    index = ImageIndex.from_folder(base.data.root)
    teacher = FrozenTeacher(create_model("test_resnet", 32, 4), None)
    teacher_id = {"name": "test_resnet", "weights_hash": "x"}
    cpu = torch.device("cpu")
    open_teacher_cache(base, [teacher], [teacher_id], index, [False], cpu, True)
    open_teacher_cache(
        tiny_config(*cache, "train.precision=bf16"), [teacher], [teacher_id], index, [False], cpu, True
    )
    with pytest.raises(UserError, match="built for something else"):
        open_teacher_cache(
            tiny_config(*cache, change, "train.precision=bf16"),
            [teacher],
            [teacher_id],
            index,
            [False],
            cpu,
            True,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["window", "full"])
def test_gpu_decode_modes_with_tuning_render_and_replay(files, mode):
    """On the GPU ("mixed" decoder, tuned): each mode renders float16 views that its own replay renders again."""
    decode = replace(TUNED, mode=mode, dtype="float16")
    batch = first_batch(files, decode, device_id=0)
    assert batch[0].dtype == np.float16 and batch[0].shape == (BATCH, 3, 32, 32)
    again = replay(files, batch, decode=decode, device_id=0)
    # The GPU decoder may differ from itself by rounding only (hardware and CUDA decoders share the batch).
    assert np.abs(again.astype(np.float32) - batch[0].astype(np.float32)).mean() < 0.01
