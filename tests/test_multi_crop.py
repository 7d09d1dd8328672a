"""DINO-style multi-crop: crop counts, sizes and scales, one decode per image, a replayable record per crop, both
backends, the pairing of student crops with the teacher's global crops, and a multi-crop run that trains."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from PIL import Image

import dali_kd.data.torchvision_loader as tv_loader
from dali_kd.config import StreamSettings
from dali_kd.data.batch import Batch
from dali_kd.data.dali_loader import DaliTrainStream
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import make_train_stream
from dali_kd.data.outputs import ModelOutput
from dali_kd.data.pil_views import decode_rgb, render_pil
from dali_kd.data.torchvision_loader import TorchvisionTrainStream
from dali_kd.errors import UserError
from dali_kd.pipelines.graphs import train_pipeline
from dali_kd.pipelines.params import AugmentParams, MultiCropParams, resolve_multi_crop_graph
from dali_kd.teacher_cache.renderer import DaliViewRenderer
from dali_kd.training.losses import distillation_losses, multi_crop_losses, view_pairs
from dali_kd.training.trainer import Trainer

CPU = torch.device("cpu")
MEAN = torch.tensor(AugmentParams().mean).view(1, 1, 3, 1, 1)
STD = torch.tensor(AugmentParams().std).view(1, 1, 3, 1, 1)
# The DALI multi-crop graphs (MultiCropParams.graph): every record must replay through the graph that drew it.
GRAPHS = ("batched", "per_crop")


def multi_crop_params(num_global=2, num_local=4, graph="auto", **augment) -> MultiCropParams:
    view = AugmentParams(view_size=40, **augment)
    return MultiCropParams(
        global_view=AugmentParams(**{**vars(view), "crop_scale": (0.4, 1.0)}),
        local_view=AugmentParams(**{**vars(view), "view_size": 16, "crop_scale": (0.05, 0.3)}),
        num_global=num_global,
        num_local=num_local,
        graph=graph,
    )


@pytest.fixture(scope="module")
def index(image_tree) -> ImageIndex:
    return ImageIndex.from_folder(image_tree / "train")


def crop(batch, v: int) -> torch.Tensor:
    """Crop v of every sample (globals first), [B, 3, s, s]."""
    g = batch.images.shape[1]
    return batch.images[:, v] if v < g else batch.local_images[:, v - g]


def batches(stream, n):
    out = list(itertools.islice(iter(stream), n))
    stream.close()
    return out


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_crop_counts_sizes_ranges_and_records(index, backend):
    params = multi_crop_params()
    if backend == "dali":
        stream = DaliTrainStream(StreamSettings.with_defaults(params, 8, 0), index)
    else:
        stream = TorchvisionTrainStream(StreamSettings.with_defaults(params, 8, 0), index)
    (batch,) = batches(stream, 1)
    assert batch.multi_crop and len(batch) == 8
    assert batch.images.shape == (8, 2, 3, 40, 40) and batch.images.dtype == torch.float32
    assert batch.local_images.shape == (8, 4, 3, 16, 16) and batch.local_images.dtype == torch.float32
    view = batch.view
    assert view.crop_anchor.shape == (8, 6, 2) and view.crop_shape.shape == (8, 6, 2)
    assert view.flip.shape == (8, 6) and view.flip.dtype == torch.int64 and view.jitter.shape == (8, 6, 4)
    for crops in (batch.images, batch.local_images):
        pixels = crops * STD + MEAN
        assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
        assert crops.std() > 0.1, "crops should not be flat"
    expected = torch.tensor([index.labels[i] for i in batch.sample_ids])
    assert torch.equal(batch.labels, expected)
    # Every crop draws its own window: no two crops of a sample share one.
    for windows in torch.cat([view.crop_anchor, view.crop_shape], dim=-1):
        assert len({tuple(w) for w in windows.tolist()}) == 6


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_global_and_local_crops_respect_their_scale_ranges(index, backend):
    params = multi_crop_params(num_local=3, crop_ratio=(0.8, 1.25))
    if backend == "dali":
        stream = DaliTrainStream(StreamSettings.with_defaults(params, 16, 1), index)
    else:
        stream = TorchvisionTrainStream(StreamSettings.with_defaults(params, 16, 1), index)
    sizes = {i: Image.open(f).size for i, f in enumerate(index.files)}  # (W, H)
    in_range = {"global": [0, 0], "local": [0, 0]}
    for batch in batches(stream, 4):
        anchor, shape = batch.view.crop_anchor, batch.view.crop_shape
        assert (anchor >= 0).all() and (anchor + shape <= 1 + 1e-6).all()
        for sid, windows in zip(batch.sample_ids.tolist(), shape.tolist(), strict=True):
            W, H = sizes[sid]
            tol = 2.0 / min(W, H)  # one pixel of rounding on each side of the window
            for v, (h, w) in enumerate(windows):
                kind = "global" if v < params.num_global else "local"
                low, high = params.view_params(v).crop_scale
                in_range[kind][0] += low - tol <= h * w <= high + tol
                in_range[kind][1] += 1
    # RandomResizedCrop falls back to a centre crop when 10 tries fail; that is rare for these settings.
    for kind, (good, total) in in_range.items():
        assert good / total >= 0.9, f"{kind} crops: {good} of {total} in range"


@pytest.mark.parametrize("graph", GRAPHS)
def test_dali_decodes_each_image_once(index, graph):
    """The multi-crop graph holds one full-image decoder and no crop decoder: every crop is cut from one decode."""
    params = multi_crop_params(num_local=6, graph=graph)
    pipe = train_pipeline(index.files, params, batch_size=4, seed=0, num_threads=1)
    pipe.build()
    kinds = [op._op.schema_name for op in pipe._ops]
    decoders = [k for k in kinds if k.startswith("decoders__")]
    assert decoders == ["decoders__Image"], decoders
    if graph == "per_crop":
        assert kinds.count("Resize") == 8, (
            "one cut per crop (2 global + 6 local), each resized out of the decode"
        )
    one_view = train_pipeline(index.files, AugmentParams(view_size=40), batch_size=4, seed=0, num_threads=1)
    one_view.build()
    assert [op._op.schema_name for op in one_view._ops if op._op.schema_name.startswith("decoders__")] == [
        "decoders__ImageSlice"
    ], "one view decodes its window only"


def graph_operators(pipe, path) -> set[str]:
    """The operators of a built pipeline, read from its DOT graph (Pipeline.save_graph_to_dot_file)."""
    pipe.save_graph_to_dot_file(str(path))
    return {name for edge in re.findall(r"(\S+) -> (\S+);", path.read_text()) for name in edge}


def test_dali_batched_multi_crop_graph_does_not_grow_with_the_crop_count(index, tmp_path):
    """All crops of a kind are cut by one chain of operators: 2 + 8 crops build as many as 2 + 3. (Not 2 + 2:
    there the globals' and the locals' stacks of the image are the same expression, which DALI builds once.) The
    per-crop graph, counted the same way, grows: the count sees the chains."""
    counts = {}
    for graph, num_local in itertools.product(GRAPHS, (3, 8)):
        params = multi_crop_params(num_local=num_local, graph=graph)
        pipe = train_pipeline(index.files, params, 4, seed=0, num_threads=1)
        pipe.build()
        counts[graph, num_local] = len(graph_operators(pipe, tmp_path / f"{graph}-{num_local}.dot"))
    assert counts["batched", 3] == counts["batched", 8], counts
    assert counts["per_crop", 8] > counts["per_crop", 3], counts


def test_auto_graph_is_per_crop_in_dali_cpu_mode(index, tiny_config):
    """The default (auto) builds the per-crop graph on a CPU pipeline and the batched one on a GPU: the same
    crops as per_crop here, other crops than batched (whose windows come from other random numbers)."""
    assert tiny_config("train.use_local_crops=true").crop_params().graph == "auto"
    assert resolve_multi_crop_graph("auto", on_gpu=True) == "batched"
    assert resolve_multi_crop_graph("auto", on_gpu=False) == "per_crop"

    def first_batch(graph: str) -> Batch:
        settings = StreamSettings.with_defaults(multi_crop_params(num_local=2, graph=graph), 4, 3)
        return batches(DaliTrainStream(settings, index), 1)[0]

    first = {graph: first_batch(graph) for graph in ("auto", *GRAPHS)}
    assert torch.equal(first["auto"].local_images, first["per_crop"].local_images)
    assert torch.equal(first["auto"].view.crop_anchor, first["per_crop"].view.crop_anchor)
    assert not torch.equal(first["auto"].view.crop_anchor, first["batched"].view.crop_anchor)
    # A renderer left at auto replays the CPU stream's records too.
    renderer = DaliViewRenderer(index, multi_crop_params().local_view, batch_size=4, full_decode=True)
    again = renderer.render(first["auto"].sample_ids, first["auto"].view.select(2))
    assert torch.equal(again, first["auto"].local_images[:, 0])


def test_resume_refuses_another_multi_crop_graph(index, tiny_config):
    """A checkpoint records the graph its stream resolved; auto on another device (or another setting) would build
    the other graph, into which the pipeline's state does not restore: refused in one line."""
    cfg = tiny_config("train.use_local_crops=true", "data.num_local_crops=2", "data.local_crop_size=16")
    stream = make_train_stream(cfg.stream_settings(), index, CPU)
    state = stream.state_dict()
    stream.close()
    assert state["multi_crop_graph"] == "per_crop"
    with pytest.raises(UserError, match="cut by the batched graph, this run would use per_crop"):
        make_train_stream(cfg.stream_settings(), index, CPU, state={**state, "multi_crop_graph": "batched"})
    make_train_stream(cfg.stream_settings(), index, CPU, state=state).close()


def test_torchvision_decodes_each_image_once(index, monkeypatch):
    calls = []
    decode = tv_loader.decode_rgb

    def counting(path):
        calls.append(path)
        return decode(path)

    monkeypatch.setattr(tv_loader, "decode_rgb", counting)
    stream = TorchvisionTrainStream(StreamSettings.with_defaults(multi_crop_params(num_local=6), 8, 0), index)
    (batch,) = batches(stream, 1)
    assert len(calls) == 8 and sorted(calls) == sorted(index.files[i] for i in batch.sample_ids.tolist())


@pytest.mark.parametrize(("graph", "num_local"), [("batched", 3), ("batched", 8), ("per_crop", 3)])
def test_every_dali_crop_replays_from_its_record(index, graph, num_local):
    params = multi_crop_params(num_local=num_local, graph=graph)
    (batch,) = batches(DaliTrainStream(StreamSettings.with_defaults(params, 8, 4), index), 1)
    for v in range(params.num_views):
        renderer = DaliViewRenderer(
            index, params.view_params(v), batch_size=8, full_decode=True, multi_crop_graph=graph
        )
        again = renderer.render(batch.sample_ids, batch.view.select(v))
        assert torch.equal(again, crop(batch, v)), f"crop {v} does not replay to the same pixels"


def test_every_torchvision_crop_replays_from_its_record(index):
    params = multi_crop_params(num_local=2)
    (batch,) = batches(TorchvisionTrainStream(StreamSettings.with_defaults(params, 4, 4), index), 1)
    for i, sid in enumerate(batch.sample_ids.tolist()):
        for v in range(params.num_views):
            view = batch.view.select(v)
            again = render_pil(
                decode_rgb(index.files[sid]), view.crop_anchor[i], view.crop_shape[i], bool(view.flip[i]), view.jitter[i],
                params.view_params(v),
            )  # fmt: skip
            assert torch.equal(again, crop(batch, v)[i])


@pytest.mark.parametrize("graph", GRAPHS)
def test_each_crop_has_its_own_flip_and_jitter(index, graph):
    params = multi_crop_params(num_local=6, graph=graph, flip_prob=0.5, jitter_prob=1.0)
    (batch,) = batches(DaliTrainStream(StreamSettings.with_defaults(params, 16, 6), index), 1)
    flips = batch.view.flip.float()
    # Per sample the 8 crops' flips are independent coin flips: some samples have both kinds.
    assert ((flips.sum(1) > 0) & (flips.sum(1) < 8)).float().mean() > 0.5
    # Jitter factors differ from crop to crop (jitter_prob=1: all drawn).
    assert all(len({tuple(j) for j in sample.tolist()}) == 8 for sample in batch.view.jitter)
    # And every flipped crop really is mirrored: the replay with its flip bit turned over is its mirror image.
    for v in range(params.num_views):
        renderer = DaliViewRenderer(
            index, params.view_params(v), batch_size=16, full_decode=True, multi_crop_graph=graph
        )
        view = batch.view.select(v)
        view.flip = 1 - view.flip
        turned = renderer.render(batch.sample_ids, view)
        assert torch.equal(turned.flip(-1), crop(batch, v)), f"crop {v}"
        assert not torch.equal(turned, crop(batch, v)), f"crop {v}: the flip bit changed nothing"


@pytest.mark.parametrize("graph", GRAPHS)
def test_no_local_crops_means_global_crops_only(index, graph):
    params = multi_crop_params(num_local=0, graph=graph)
    (batch,) = batches(DaliTrainStream(StreamSettings.with_defaults(params, 4, 0), index), 1)
    assert batch.images.shape == (4, 2, 3, 40, 40) and batch.local_images is None
    assert batch.view.flip.shape == (4, 2)


# ---- pairing in the loss ----------------------------------------------------------------------------------------
def test_view_pairs():
    assert view_pairs(2, 0, "same") == ([(0, 0), (1, 1)], [])
    assert view_pairs(2, 0, "cross") == ([(0, 1), (1, 0)], [])
    assert view_pairs(2, 0, "all") == ([(0, 0), (0, 1), (1, 0), (1, 1)], [])
    # Locals learn every teacher global crop; the teacher never sees a local crop.
    assert view_pairs(2, 2, "same")[1] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    with pytest.raises(ValueError, match="at least 2 global crops"):
        view_pairs(1, 4, "cross")


def loss_cfg(tiny_config, *overrides):
    return tiny_config(*overrides).train.loss


def test_same_view_pairing_pulls_each_global_toward_its_own_crop(tiny_config):
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 8)  # [G, B, D]
    student = torch.cat([teacher, torch.randn(3, 5, 8)])  # globals equal the teacher's crops, 3 locals
    same = multi_crop_losses(
        loss_cfg(tiny_config, "train.loss.logit_weight=0"),
        2,
        ModelOutput(student, None, None),
        ModelOutput(teacher, None, None),
    )
    assert same["loss_global"].item() == pytest.approx(0.0, abs=1e-6)
    cross = multi_crop_losses(
        loss_cfg(tiny_config, "train.loss.logit_weight=0", "train.loss.global_pairing=cross"),
        2,
        ModelOutput(student, None, None),
        ModelOutput(teacher, None, None),
    )
    assert cross["loss_global"].item() > 0.5, "cross pairing compares each global crop with the other one"
    # A local crop's loss is the mean over the teacher's global crops, computed pair by pair here.
    cfg = loss_cfg(tiny_config, "train.loss.logit_weight=0")
    by_hand = torch.stack(
        [distillation_losses(cfg, student[2 + v], teacher[g])["loss"] for v in range(3) for g in range(2)]
    ).mean()
    assert same["loss_local"].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_total_is_the_pair_weighted_mean(tiny_config):
    torch.manual_seed(1)
    teacher_pooled, teacher_logits = torch.randn(2, 4, 8), torch.randn(2, 4, 6)
    student_pooled, student_logits = torch.randn(5, 4, 8), torch.randn(5, 4, 6)
    labels = torch.randint(0, 6, (4,))
    for weight in (1.0, 0.25, 0.0):
        cfg = loss_cfg(tiny_config, f"train.loss.local_weight={weight}", "train.loss.label_weight=0.5")
        out = multi_crop_losses(
            cfg,
            2,
            ModelOutput(student_pooled, student_logits, None),
            ModelOutput(teacher_pooled, teacher_logits, None),
            labels=labels,
        )
        # 2 global pairs (same view) and 3 locals × 2 globals = 6 local pairs.
        expected = (2 * out["loss_global"] + weight * 6 * out["loss_local"]) / (2 + weight * 6)
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
        assert {"loss_feature_global", "loss_logit_local", "loss_label_local"} <= set(out)


# ---- training ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_multi_crop_run_trains_and_logs_per_view_losses(tiny_config, tmp_path, backend):
    cfg = tiny_config(
        "train.use_local_crops=true", "data.num_local_crops=3", "data.local_crop_size=16", f"data.backend={backend}",
        "train.epochs=4", "train.max_steps_per_epoch=6", "train.optimizer.lr=0.003", "train.optimizer.warmup_steps=2",
    )  # fmt: skip
    trainer = Trainer(cfg, CPU, show_progress=False)
    forwards = []
    trainer.parts.teacher.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(args[0].shape), with_kwargs=True
    )
    summary = trainer.fit(tmp_path / "run")
    # Training steps: the 2 global crops of 8 samples; the k-NN evaluation also embeds 32 px images.
    assert (16, 3, 32, 32) in forwards
    assert all(shape[-2:] == (32, 32) for shape in forwards), "the teacher never sees a local crop"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary["steps"] == 24
    assert {"loss_global", "loss_local", "loss_feature_global", "loss_feature_local"} <= set(rows[0])
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.8 * first, f"loss should fall: first {first:.4f}, last {last:.4f}"
    for kind in ("loss_global", "loss_local"):
        assert sum(r[kind] for r in rows[-4:]) < sum(r[kind] for r in rows[:4]), kind
    assert summary["student_knn_top1"] is not None
