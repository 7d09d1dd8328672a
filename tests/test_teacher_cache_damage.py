"""A damaged teacher cache is found, not trained on: a file missing or cut short is refused in one line when the
cache is opened; a row whose outputs fail their checksum is computed again by the teacher (and rewritten); a row
whose view record fails is never replayed; a fidelity probe far below its floor stops replay from the cache.

One cache is filled once (48 images × 1 view: six fill steps) and each test damages a copy of it, then trains six
replayed steps on it (each row replayed once), with a fidelity probe on every step: the probe compares the targets
the student is given with the live teacher on the same views, so a step trained on damaged targets shows there."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_kd.config import load_config
from dali_kd.data.outputs import ModelOutput
from dali_kd.errors import UserError
from dali_kd.teacher_cache.store import TeacherCache
from dali_kd.training.trainer import Trainer
from tests.conftest import tiny_overrides

CPU = torch.device("cpu")
NUM_ROWS = 48  # 48 images × 1 view
ONE_PASS = ["train.cache_teacher_features=true", "train.cache_views_per_image=1", "train.epochs=1",
            "train.max_steps_per_epoch=6", "data.val_root=null", "train.run_name=run"]  # fmt: skip


def config(image_tree: Path, out: Path, cache: Path, *overrides: str):
    return load_config(
        overrides=[
            *tiny_overrides(image_tree, out),
            *ONE_PASS,
            f"train.teacher_feature_dir={cache}",
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def filled(image_tree, tmp_path_factory) -> Path:
    """A complete cache, every row written by a fill."""
    out = tmp_path_factory.mktemp("filled")
    summary = Trainer(config(image_tree, out, out / "cache"), CPU, show_progress=False).fit(out / "run")
    assert summary["cache_rows_done"] == summary["cache_rows_total"] == NUM_ROWS
    return out / "cache"


@pytest.fixture
def cache_dir(filled, tmp_path) -> Path:
    """A copy of the filled cache, to damage."""
    return Path(shutil.copytree(filled, tmp_path / "cache"))


@pytest.fixture
def said() -> Iterator[list[str]]:
    """The lines the run says at WARNING (dali_kd's logger does not propagate to pytest's)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("dali_kd")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def replay(image_tree: Path, tmp_path: Path, cache: Path, *overrides: str) -> tuple[dict, Trainer]:
    """Six steps on the cache, each probed; (the run's summary, its trainer)."""
    cfg = config(image_tree, tmp_path, cache, "train.cache_probe_every_n_steps=1", *overrides)
    trainer = Trainer(cfg, CPU, show_progress=False)
    return trainer.fit(tmp_path / "run"), trainer


def row_size(cache: Path, name: str) -> int:
    return (cache / f"{name}.bin").stat().st_size // NUM_ROWS


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def stored_pooled(cache: TeacherCache) -> torch.Tensor:
    ids = np.arange(NUM_ROWS)
    return cache.read(ids, np.zeros_like(ids), CPU).pooled


# ---- the files, checked when the cache is opened ----------------------------------------------------------------
def test_a_file_cut_short_is_refused_in_one_line_and_rebuilt_when_asked(image_tree, tmp_path, cache_dir):
    pooled = cache_dir / "pooled.bin"
    size = pooled.stat().st_size
    with open(pooled, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(UserError) as info:
        replay(image_tree, tmp_path, cache_dir)
    message = str(info.value)
    assert f"pooled.bin is {size // 2} bytes where its header implies {size}" in message
    assert message.endswith("set train.cache_rebuild=true to rebuild it") and "\n" not in message
    assert pooled.stat().st_size == size // 2, "the damaged file was left as found"
    summary, _ = replay(image_tree, tmp_path, cache_dir, "train.cache_rebuild=true")
    assert summary["teacher_forward_batches"] == 6, "the rebuilt cache is filled by the teacher"
    assert summary["cache_rows_done"] == NUM_ROWS and summary["cache_rows_damaged"] == 0


@pytest.mark.parametrize("name", ["done.bin", "header.json", "checks.bin", "views.bin"])
def test_a_missing_file_is_refused_in_one_line(image_tree, tmp_path, cache_dir, name):
    (cache_dir / name).unlink()
    with pytest.raises(
        UserError, match=rf"the cache there is damaged \({name} is missing\); set train\.cache_rebuild"
    ):
        replay(image_tree, tmp_path, cache_dir)


def test_a_header_that_is_not_json_is_refused_in_one_line(image_tree, tmp_path, cache_dir):
    (cache_dir / "header.json").write_bytes(b'{"format": \xff\xfe}')  # not UTF-8
    with pytest.raises(UserError, match=r"damaged \(header\.json is not JSON\)"):
        replay(image_tree, tmp_path, cache_dir)


# ---- the rows, checked when they are read -----------------------------------------------------------------------
def test_zeroed_rows_are_computed_again_by_the_teacher_and_rewritten(
    image_tree, tmp_path, cache_dir, filled, said
):
    """What the file system leaves after a file was cut short and grown back: the rows past the cut read as zeros,
    their done bytes still set. No step trains on them: the teacher computes them again."""
    pooled = cache_dir / "pooled.bin"
    data = bytearray(pooled.read_bytes())
    damaged = 20  # the last 20 rows
    data[-damaged * row_size(cache_dir, "pooled") :] = bytes(damaged * row_size(cache_dir, "pooled"))
    pooled.write_bytes(bytes(data))
    summary, trainer = replay(image_tree, tmp_path, cache_dir)
    assert summary["cache_fidelity_min"] > 0.999, "a step trained on targets the teacher does not give"
    assert summary["cache_rows_refilled"] == summary["cache_rows_damaged"] == damaged
    assert summary["cache_hits"] == 6 * 8 - damaged and summary["cache_missing_rows"] == 0
    assert summary["teacher_probe_batches"] == 6 and summary["cache_stopped_at_step"] is None
    assert len([line for line in said if "fail their checksum" in line]) == 1, said
    # The cache holds the teacher's outputs again, and says so.
    ids = np.arange(NUM_ROWS)
    assert trainer.parts.targets.cache.read_rows(ids, np.zeros_like(ids)).intact.all()
    original = Trainer(
        config(image_tree, tmp_path / "x", filled), CPU, show_progress=False
    ).parts.targets.cache
    assert torch.allclose(
        stored_pooled(trainer.parts.targets.cache), stored_pooled(original), rtol=2e-3, atol=2e-3
    )


def test_a_flipped_byte_in_a_rows_outputs_is_computed_again(image_tree, tmp_path, cache_dir, filled):
    victim = 7
    flip_byte(
        cache_dir / "pooled.bin", victim * row_size(cache_dir, "pooled") + 1
    )  # a high byte: a real change
    summary, trainer = replay(image_tree, tmp_path, cache_dir)
    assert summary["cache_rows_refilled"] == summary["cache_rows_damaged"] == 1
    assert summary["cache_fidelity_min"] > 0.999
    original = Trainer(
        config(image_tree, tmp_path / "x", filled), CPU, show_progress=False
    ).parts.targets.cache
    assert torch.allclose(
        stored_pooled(trainer.parts.targets.cache), stored_pooled(original), rtol=2e-3, atol=2e-3
    )


@pytest.mark.parametrize("name", ["views", "done", "checks"])
def test_a_row_whose_view_record_fails_its_check_is_never_replayed(image_tree, tmp_path, cache_dir, name):
    """A view record that is not as written cannot be rendered again to match its targets: another row stands in
    (one view per image here: a same-class image's)."""
    victim = 11
    flip_byte(cache_dir / f"{name}.bin", victim * row_size(cache_dir, name))
    summary, trainer = replay(image_tree, tmp_path, cache_dir)
    assert summary["cache_rows_damaged"] == 1 and summary["cache_missing_rows"] == 1
    assert summary["cache_rows_refilled"] == 0 and summary["cache_fidelity_min"] > 0.999
    assert (victim, 0) in trainer.parts.targets.cache.damaged


# ---- the fidelity probe -------------------------------------------------------------------------------------------
def test_a_probe_far_below_the_floor_stops_replay_from_the_cache(image_tree, tmp_path, cache_dir, said):
    """Rows as written (every checksum holds) but not the teacher's: the first probe stops replay, and every later
    step's targets come from the live teacher."""
    cfg = config(image_tree, tmp_path, cache_dir, "train.cache_probe_every_n_steps=null")
    trainer = Trainer(cfg, CPU, show_progress=False)
    cache, ids = trainer.parts.targets.cache, np.arange(NUM_ROWS)
    slots = np.zeros_like(ids)
    stored = cache.read(ids, slots, CPU)
    torch.manual_seed(0)
    foreign = ModelOutput(torch.randn_like(stored.pooled), stored.logits, stored.patch_tokens)
    cache.write(ids, slots, foreign, cache.read_views(ids, slots))
    summary = trainer.fit(tmp_path / "run")
    assert summary["cache_stopped_at_step"] == 1 and summary["cache_fidelity_min"] < 0.9
    assert summary["teacher_forward_batches"] == 5, "steps 2 to 6 ran the teacher"
    assert summary["cache_hits"] == 8, "only the first step's batch was read from the cache"
    stops = [line for line in said if "the teacher runs on every batch from here on" in line]
    assert len(stops) == 1 and re.search(r"fidelity -?0\.\d{4} at step 1, far below 0\.999", stops[0]), said
    assert not [line for line in said if line.startswith("WARNING: teacher cache fidelity")], (
        "one line, not two"
    )
