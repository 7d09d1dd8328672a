"""The teacher cache with several teachers: each teacher's outputs under its key, with its own checksum; a cache
built for another set of teachers is refused by name; one teacher's cache keeps today's files byte for byte."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dali_kd.config import load_config
from dali_kd.data.batch import ViewRecord
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.teacher_cache.layout import Part
from dali_kd.teacher_cache.store import TeacherCache
from dali_kd.training.callbacks import Callback
from dali_kd.training.trainer import Trainer
from tests.conftest import tiny_overrides

CPU = torch.device("cpu")
NUM_SAMPLES, NUM_VIEWS = 6, 2


def entry(key: str, name: str, weights: str = "w", classes: int = 4) -> dict:
    return {"key": key, "teacher": {"name": name, "weights_hash": weights}, "num_classes": classes}


TWO = [entry("res", "resnet"), entry("vit", "vit_tiny", classes=0)]
PARTS = {
    "res": [Part("pooled", (3,), "float16"), Part("logits", (4,), "float16")],
    "vit": [Part("pooled", (5,), "float16"), Part("tokens", (4, 5), "float16")],
}


def open_two(
    directory: Path, teachers: list[dict] = TWO, parts: dict | None = None, **kwargs
) -> TeacherCache:
    identity = {"teachers": teachers, "image_size": 32}
    return TeacherCache(directory, identity, parts or PARTS, NUM_SAMPLES, NUM_VIEWS, create=True, **kwargs)


def views(n: int) -> ViewRecord:
    return ViewRecord(
        crop_anchor=torch.rand(n, 2), crop_shape=torch.rand(n, 2), flip=torch.randint(0, 2, (n,)),
        jitter=torch.rand(n, 4),
    )  # fmt: skip


def outputs(n: int, seed: int) -> list[ModelOutput]:
    g = torch.Generator().manual_seed(seed)
    return [
        ModelOutput(pooled=torch.randn(n, 3, generator=g), logits=torch.randn(n, 4, generator=g), patch_tokens=None),
        ModelOutput(pooled=torch.randn(n, 5, generator=g), logits=None, patch_tokens=torch.randn(n, 4, 5, generator=g)),
    ]  # fmt: skip


def filled(directory: Path) -> tuple[TeacherCache, np.ndarray, np.ndarray, list[ModelOutput]]:
    cache = open_two(directory)
    ids, slots = np.arange(NUM_SAMPLES).repeat(NUM_VIEWS), np.tile(np.arange(NUM_VIEWS), NUM_SAMPLES)
    outs = outputs(len(ids), seed=0)
    cache.write(ids, slots, outs, views(len(ids)))
    return cache, ids, slots, outs


def tensors(out: ModelOutput) -> tuple[torch.Tensor | None, ...]:
    return out.pooled, out.logits, out.patch_tokens


def same(a: ModelOutput, b: ModelOutput) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(tensors(a), tensors(b), strict=True)
    )


def as_stored(out: ModelOutput, rows: slice = slice(None)) -> ModelOutput:
    """The outputs as fp16 storage gives them back (only `rows`)."""
    return ModelOutput(*(None if t is None else t[rows].half().float() for t in tensors(out)))


def test_each_teachers_outputs_are_stored_under_its_key_and_read_back(tmp_path):
    cache, ids, slots, outs = filled(tmp_path / "cache")
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert names == sorted(["header.json", "views.bin", "done.bin", "checks.bin", "res.pooled.bin",
                            "res.logits.bin", "vit.pooled.bin", "vit.tokens.bin"])  # fmt: skip
    assert (tmp_path / "cache" / "checks.bin").stat().st_size == NUM_SAMPLES * NUM_VIEWS * 3 * 4
    rows = cache.read_rows(ids, slots)
    assert rows.intact.shape == (2, len(ids)) and rows.intact.all()
    back = rows.to_outputs(CPU)
    assert len(back) == 2 and all(same(b, as_stored(o)) for b, o in zip(back, outs, strict=True))
    # Reopened from disk: the same rows, each teacher's own.
    again = open_two(tmp_path / "cache").read_rows(ids[::-1].copy(), slots[::-1].copy()).to_outputs(CPU)
    assert same(again[1], ModelOutput(*(None if t is None else t.flip(0) for t in tensors(back[1]))))


def test_a_damaged_row_of_one_teacher_fails_only_that_teachers_check_and_is_refilled(tmp_path):
    cache, ids, slots, outs = filled(tmp_path / "cache")
    victim = 5  # row (2, 1)
    path = tmp_path / "cache" / "vit.tokens.bin"
    data = bytearray(path.read_bytes())
    data[victim * 4 * 5 * 2 + 3] ^= 0x10
    path.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    cache = open_two(tmp_path / "cache")
    rows = cache.read_rows(ids, slots)
    assert rows.intact[0].all(), "the other teacher's outputs are as written"
    assert np.flatnonzero(~rows.intact[1]).tolist() == [victim]
    assert cache.damaged == {(2, 1)}
    fresh = outputs(1, seed=7)[1]
    cache.write_outputs(1, ids[[victim]], slots[[victim]], fresh)
    rows = cache.read_rows(ids, slots)
    assert rows.intact.all()
    assert same(as_stored(rows.to_outputs(CPU)[1], slice(victim, victim + 1)), as_stored(fresh))
    after = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed == ["checks.bin", "vit.pooled.bin", "vit.tokens.bin"], (
        "only that teacher's files and checks"
    )


def test_each_teachers_top_k_logits_spread_over_its_own_classes(tmp_path):
    teachers = [entry("res", "resnet", classes=4), entry("big", "vit_tiny", classes=10)]
    topk = [Part("logits_topk", (2,), "float32"), Part("logits_index", (2,), "int32")]
    cache = open_two(tmp_path / "cache", teachers, {"res": topk, "big": topk})
    logits = [torch.tensor([[0.0, 3.0, 1.0, 2.0]]), torch.tensor([[9.0, 0, 0, 0, 0, 0, 0, 0, 0, 8.0]])]
    cache.write(np.array([1]), np.array([0]), [ModelOutput(None, x, None) for x in logits], views(1))
    res, big = cache.read_rows(np.array([1]), np.array([0])).to_outputs(CPU)
    assert res.logits.shape == (1, 4) and big.logits.shape == (1, 10)
    assert res.logits[0, [1, 3]].tolist() == [3.0, 2.0] and big.logits[0, [0, 9]].tolist() == [9.0, 8.0]
    assert (res.logits[0, [0, 2]] < -1e3).all() and (big.logits[0, 1:9] < -1e3).all()


@pytest.mark.parametrize(
    ("teachers", "named"),
    [
        ([TWO[0], entry("vit", "vit_tiny", weights="other", classes=0)], r"teacher vit \(vit_tiny\) changed: its weights differ"),
        ([TWO[0], entry("vit", "vit_small", classes=0)], r"teacher vit \(vit_small\) changed: was vit_tiny"),
        ([TWO[0], {**TWO[1], "input": {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}}],
         r"teacher vit \(vit_tiny\) changed: its input size or normalisation differs"),
        ([*TWO, entry("conv", "convnext")], r"teacher conv \(convnext\) is not in it"),
        ([TWO[0]], r"it holds teacher vit \(vit_tiny\), which this run does not have"),
        ([TWO[1], TWO[0]], r"in another order"),
    ],
)  # fmt: skip
def test_a_cache_of_another_teacher_set_is_refused_naming_the_teacher(tmp_path, teachers, named):
    filled(tmp_path / "cache")
    parts = {e["key"]: PARTS.get(e["key"], PARTS["res"]) for e in teachers}
    with pytest.raises(UserError) as info:
        open_two(tmp_path / "cache", teachers, parts)
    message = str(info.value)
    assert "\n" not in message and message.endswith("set train.cache_rebuild=true to rebuild it"), message
    assert "built for something else (" in message
    assert re.search(named, message), message
    rebuilt = open_two(tmp_path / "cache", teachers, parts, rebuild=True)
    assert rebuilt.rows_done() == 0


def test_a_one_teacher_cache_is_refused_by_a_run_with_two_naming_the_one_added(tmp_path):
    one = {"teacher": {"name": "resnet", "weights_hash": "w"}, "num_classes": 4, "image_size": 32}
    TeacherCache(tmp_path / "cache", one, PARTS["res"], NUM_SAMPLES, NUM_VIEWS, create=True)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir())[:2] == ["checks.bin", "done.bin"]
    assert (tmp_path / "cache" / "pooled.bin").exists(), "one teacher: today's file names"
    with pytest.raises(
        UserError, match=r"\(teacher vit \(vit_tiny\) is not in it\); set train\.cache_rebuild"
    ):
        open_two(tmp_path / "cache")


# ---- one teacher: today's files ------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
# The last commit before caches of several teachers: a one-teacher cache's files are still what it writes.
BEFORE_SEVERAL_TEACHERS = "77e5db4"


def fill_args(image_tree: Path, out: Path) -> list[str]:
    return [
        "--data_config", str(ROOT / "configs" / "demo" / "data_config.yaml"), "--device", "cpu", "--no-progress",
        f"data.root={image_tree / 'train'}", "data.val_root=null", "data.image_size=32", "data.dali_threads=1",
        "model.teacher.name=test_resnet", "model.teacher.checkpoint=null", "model.teacher.num_classes=4",
        "model.student.name=test_vit", "train.compile_student=false", "train.run_name=run", "train.batch_size=8",
        f"train.output_dir={out}", f"train.teacher_feature_dir={out / 'cache'}", "train.telemetry=false",
        "train.cache_teacher_features=true", "train.cache_views_per_image=2", "train.cache_logits_topk=3",
        "train.epochs=1", "train.max_steps_per_epoch=3",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_one_teacher_cache_is_byte_for_byte_what_the_code_before_several_teachers_writes(
    image_tree, tmp_path
):
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BEFORE_SEVERAL_TEACHERS], capture_output=True
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE_SEVERAL_TEACHERS} is not in this checkout")
    before = tmp_path / "before"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(before, filter="data")
    caches = {}
    for name, code in (("before", before), ("now", ROOT)):
        out = tmp_path / name / "out"
        # From its own folder: `python -m` puts the working directory first on the path.
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "dali_kd.train", *fill_args(image_tree, out)],
                                capture_output=True, text=True, timeout=600, env=env, cwd=code)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        caches[name] = {p.name: p.read_bytes() for p in sorted((out / "cache").iterdir())}
    assert sorted(caches["now"]) == sorted(caches["before"])
    assert [n for n in caches["now"] if caches["now"][n] != caches["before"][n]] == []
    assert any(caches["now"]["done.bin"]), "the fill wrote rows"


# ---- two teachers, end to end ---------------------------------------------------------------------------------------
TEACHERS = (
    "model.teacher=null",
    "model.teachers=[{name: test_resnet, num_classes: 4, key: res},"
    " {name: test_vit, num_classes: 4, key: vit, outputs: [pooled]}]",
)
# 48 images × 1 view: steps 1-6 fill the cache, 7-12 replay it; a checkpoint every 2 steps.
TWO_TEACHER_RUN = (
    *TEACHERS, "train.cache_teacher_features=true", "train.cache_views_per_image=1", "train.cache_dtype=fp32",
    "train.epochs=2", "train.max_steps_per_epoch=6", "train.save_every_n_steps=2", "train.keep_last_checkpoints=10",
    "train.cache_probe_every_n_steps=3", "train.telemetry=false", "data.val_root=null",
)  # fmt: skip


class ReplayedTargets(Callback):
    """Per replayed batch: whether its cached targets are, bit for bit, what the live teachers give on its views."""

    def __init__(self) -> None:
        self.exact: list[bool] = []

    def on_step(self, trainer, batch) -> None:
        if batch.cache is None or not batch.cache.from_cache:
            return
        for teacher, cached in zip(trainer.parts.teachers, batch.cache.targets, strict=True):
            live = teacher(batch.images)
            self.exact.append(torch.equal(live.pooled, cached.pooled))


def losses(run_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def two_teacher_run(image_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    cfg = load_config(
        overrides=[
            *tiny_overrides(image_tree, out),
            *TWO_TEACHER_RUN,
            f"train.teacher_feature_dir={out / 'cache'}",
        ]
    )
    watch = ReplayedTargets()
    summary = Trainer(cfg, CPU, show_progress=False, callbacks=[watch]).fit(out / "whole")
    return cfg, out, summary, watch


def test_a_two_teacher_cache_replays_every_teachers_targets_bit_for_bit(two_teacher_run):
    cfg, out, summary, watch = two_teacher_run
    assert summary["teacher_forward_batches"] == 6, "the teachers ran for the fill only"
    assert summary["cache_hits"] == 6 * 8 and summary["cache_rows_done"] == 48
    assert len(watch.exact) == 6 * 2 and all(watch.exact), "a replayed target differs from its teacher's"
    assert summary["teacher_probe_batches"] >= 2 and summary["cache_fidelity_min"] > 0.9999
    header = json.loads((out / "cache" / "header.json").read_text())
    assert [t["key"] for t in header["teachers"]] == ["res", "vit"] and "teacher" not in header
    assert (out / "cache" / "vit.pooled.bin").exists() and not (out / "cache" / "vit.tokens.bin").exists()


def test_a_resume_in_the_middle_of_a_two_teacher_replay_is_exact(two_teacher_run):
    cfg, out, _, _ = two_teacher_run
    checkpoint = out / "whole" / "checkpoints" / "step_000000008.pt"
    summary = Trainer(cfg, CPU, show_progress=False, resume_from=checkpoint).fit(out / "resumed")
    whole, after = losses(out / "whole"), losses(out / "resumed")
    assert sorted(after) == [9, 10, 11, 12] and all(after[s] == whole[s] for s in after), (after, whole)
    assert summary["teacher_forward_batches"] == 6, "no teacher ran after the resume (probes aside)"
    mine, theirs = (
        load_file(out / "resumed" / "student.safetensors"),
        load_file(out / "whole" / "student.safetensors"),
    )
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "final weights are not bit-identical"


@pytest.mark.parametrize(
    ("teachers", "named"),
    [
        ("[{name: test_resnet, num_classes: 4, key: res}, {name: test_resnet, num_classes: 4, key: vit}]",
         r"teacher vit \(test_resnet\) changed: was test_vit"),
        ("[{name: test_resnet, num_classes: 4, key: res}, {name: test_vit, num_classes: 4, key: vit, outputs: "
         "[pooled]}, {name: test_resnet, num_classes: 3, key: small}]", r"teacher small \(test_resnet\) is not in it"),
        ("[{name: test_resnet, num_classes: 4, key: res}]", r"it holds teacher vit \(test_vit\), which this run"),
    ],
)  # fmt: skip
def test_a_run_with_another_teacher_set_refuses_the_cache_naming_the_teacher(
    two_teacher_run, image_tree, tmp_path, teachers, named
):
    _, out, _, _ = two_teacher_run
    overrides = [
        *tiny_overrides(image_tree, tmp_path),
        *TWO_TEACHER_RUN,
        f"train.teacher_feature_dir={out / 'cache'}",
    ]
    cfg = load_config(overrides=[*overrides, f"model.teachers={teachers}"])
    with pytest.raises(UserError) as info:
        Trainer(cfg, CPU, show_progress=False)
    message = str(info.value)
    assert re.search(named, message) and message.endswith("set train.cache_rebuild=true to rebuild it"), (
        message
    )


def test_a_damaged_row_of_one_teacher_is_computed_again_by_that_teacher(
    two_teacher_run, image_tree, tmp_path
):
    _, out, _, _ = two_teacher_run
    cache = Path(shutil.copytree(out / "cache", tmp_path / "cache"))
    path = cache / "vit.pooled.bin"
    data = bytearray(path.read_bytes())
    victim = 13
    data[victim * len(data) // 48 + 2] ^= 0x10
    path.write_bytes(bytes(data))
    untouched = (cache / "res.pooled.bin").read_bytes()
    cfg = load_config(overrides=[*tiny_overrides(image_tree, tmp_path), *TWO_TEACHER_RUN, "train.epochs=1",
                                 "train.cache_probe_every_n_steps=1", f"train.teacher_feature_dir={cache}"])  # fmt: skip
    trainer = Trainer(cfg, CPU, show_progress=False)
    summary = trainer.fit(tmp_path / "run")
    assert summary["cache_rows_refilled"] == summary["cache_rows_damaged"] == 1
    assert summary["cache_hits"] == 6 * 8 - 1 and summary["cache_fidelity_min"] > 0.9999
    # The row holds the teacher's outputs again (run on that one row, so to float rounding), and says so; the other
    # teacher's outputs were left as they were.
    stored = trainer.parts.targets.cache
    ids = np.arange(48)
    assert stored.read_rows(ids, np.zeros_like(ids)).intact.all()
    original = np.fromfile(out / "cache" / "vit.pooled.bin", dtype=np.float32).reshape(48, -1)
    refilled = np.fromfile(cache / "vit.pooled.bin", dtype=np.float32).reshape(48, -1)
    assert np.allclose(refilled[victim], original[victim], rtol=1e-4, atol=1e-5)
    assert np.array_equal(np.delete(refilled, victim, 0), np.delete(original, victim, 0))
    assert (cache / "res.pooled.bin").read_bytes() == untouched


def test_the_probe_runs_every_teacher_and_names_the_one_whose_targets_are_not_its_own(
    two_teacher_run, image_tree, tmp_path, caplog
):
    """The second teacher's rows as written (their checksums hold) but not its outputs: the first probe stops
    replay, naming that teacher; the first teacher's targets alone would have passed."""
    _, out, _, _ = two_teacher_run
    cache_dir = Path(shutil.copytree(out / "cache", tmp_path / "cache"))
    cfg = load_config(overrides=[*tiny_overrides(image_tree, tmp_path), *TWO_TEACHER_RUN, "train.epochs=1",
                                 "train.cache_probe_every_n_steps=null", f"train.teacher_feature_dir={cache_dir}"])  # fmt: skip
    trainer = Trainer(cfg, CPU, show_progress=False)
    cache, ids = trainer.parts.targets.cache, np.arange(48)
    slots = np.zeros_like(ids)
    torch.manual_seed(0)
    vit = cache.read(ids, slots, CPU, teacher=1)
    cache.write_outputs(
        1, ids, slots, ModelOutput(torch.randn_like(vit.pooled), vit.logits, vit.patch_tokens)
    )
    assert cache.read_rows(ids, slots).intact.all()
    summary = trainer.fit(tmp_path / "run")
    assert summary["cache_stopped_at_step"] == 1 and summary["cache_fidelity_min"] < 0.9
    assert summary["teacher_forward_batches"] == 5, "steps 2 to 6 ran the teachers"
    stops = [r.getMessage() for r in caplog.records if "the teacher runs on every batch" in r.getMessage()]
    assert len(stops) == 1 and "(teacher vit) at step 1" in stops[0], stops
