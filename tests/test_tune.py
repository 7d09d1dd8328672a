"""`python -m dali_kd.tune`: times the configured step per candidate option, tabulates them, and prints only
overrides that a training run accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dali_kd.commands import tune
from dali_kd.commands.tune_verdict import (
    Candidate,
    fastest_overrides,
    noise_pct,
    table,
    verdict,
    verdict_lines,
)
from dali_kd.config import load_config
from dali_kd.config.loading import parse_override
from tests.conftest import tiny_overrides


def test_tune_tabulates_each_option_and_prints_overrides_a_run_accepts(image_tree, tmp_path, capsys):
    base = tiny_overrides(image_tree, tmp_path)
    argv = [*base, "--steps", "2", "--warmup", "1", "--options", "telemetry,prefetch_batches"]
    argv += ["--try", "model.teacher.no_such_option=true", "--json", str(tmp_path / "tune.json")]
    assert tune.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    for option in ("defaults", "train.telemetry=false", "data.prefetch_batches=1", "data.prefetch_batches=4"):
        cells = [c.strip() for c in rows[option].strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[3]) > 0, rows[option]  # ms/step, img/s
    assert "skipped: not accepted by this config" in rows["model.teacher.no_such_option=true"]
    assert "unknown key" in rows["model.teacher.no_such_option=true"]

    (fastest,) = [line for line in out.splitlines() if line.startswith("fastest: ")]
    report = json.loads((tmp_path / "tune.json").read_text())
    printed = [] if fastest.startswith("fastest: no option") else fastest.removeprefix("fastest: ").split()
    assert printed == report["fastest_overrides"]
    for item in printed:
        parse_override(item)
        load_config(overrides=[*base, item])  # a training run takes it
    assert not (tmp_path / "runs").exists(), "tuning runs go to a temporary folder"


def test_each_switch_is_tried_the_other_way_from_what_this_config_resolves_it_to(tiny_config):
    # compile and telemetry set off here, fused left at auto (off on the CPU): each is tried on.
    cfg = tiny_config("model.teacher.compile=false", "train.telemetry=false")
    names = {c.name for c in tune.speed_options(cfg, on_gpu=False)}
    assert {"model.teacher.compile=true", "train.telemetry=true", "train.optimizer.fused=true"} <= names
    names = {c.name for c in tune.speed_options(tiny_config(), on_gpu=True)}  # auto is on on a GPU
    assert {"model.teacher.compile=false", "train.optimizer.fused=false"} <= names


def test_only_overrides_faster_than_the_noise_are_chosen_the_fastest_value_per_key():
    def timed(name: str, *ms: float) -> Candidate:
        return Candidate(name, [] if name == "defaults" else [name], ms=list(ms))

    candidates = [
        timed("defaults", 100.0, 104.0),  # spread 4%: the noise
        timed("train.telemetry=false", 99.0, 100.0),  # -2.5%: inside the noise
        timed("data.prefetch_batches=1", 90.0, 91.0),  # -11%
        timed("data.prefetch_batches=4", 80.0, 81.0),  # -21%: the faster value of the same key
        timed("data.dali_threads=8", 120.0, 121.0),  # slower
        Candidate("model.teacher.compile=false", ["model.teacher.compile=false"], note="skipped"),
    ]
    noise = noise_pct(candidates)
    assert round(noise, 2) == round(100 * 4 / 102, 2)
    assert fastest_overrides(candidates, noise) == ["data.prefetch_batches=4"]
    rows = table(candidates, batch_size=8)
    assert "| data.prefetch_batches=4 | 80.50 | -21.1% | 99.4 | 80.00, 81.00 |" in rows
    assert "| model.teacher.compile=false | — | — | — | skipped |" in rows


def test_a_bad_override_is_one_line_and_exit_2(image_tree, tmp_path, capsys):
    assert tune.main([*tiny_overrides(image_tree, tmp_path), "data.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command line: data.no_such_key: unknown key") and err.count("\n") == 1


def test_the_verdict_names_a_winner_only_where_the_timings_tell_them_apart():
    def timed(name: str, *ms: float) -> Candidate:
        return Candidate(name, [] if name == "defaults" else [name], ms=list(ms))

    defaults = timed("defaults", 100.0, 102.0, 101.0)
    overlapping = timed(
        "data.dali_threads=1", 97.0, 101.5, 96.0
    )  # -3%, but a repeat inside the defaults' range
    separated = timed("data.prefetch_batches=4", 80.0, 82.0, 81.0)  # -20%, apart
    slower = timed("data.prefetch_batches=1", 120.0, 121.0, 119.0)
    noise = noise_pct([defaults, overlapping, separated, slower])
    assert verdict(defaults, overlapping, noise).startswith(
        "within noise: can't tell data.dali_threads=1 from defaults"
    )
    assert verdict(defaults, separated, noise).startswith(
        "data.prefetch_batches=4: 19.8% faster than defaults"
    )
    assert verdict(defaults, slower, noise).startswith("data.prefetch_batches=1: 18.8% slower than defaults")
    # Medians 30% apart, beyond the 20% noise, but a repeat of one inside the other's range: can't tell.
    tail, late = timed("defaults", 100.0, 100.0, 120.0), timed("data.dali_threads=2", 119.0, 130.0, 130.0)
    assert noise_pct([tail, late]) == 20.0
    assert verdict(tail, late, 20.0).startswith(
        "within noise: can't tell data.dali_threads=2 from defaults (+30.0%"
    )
    # Apart in range but not beyond the noise (one setting varied by 10%): still can't tell.
    wide = timed("train.telemetry=false", 90.0, 99.0, 95.0)
    close = timed("data.decode=full", 95.0, 95.5, 95.2)
    assert "can't tell" in verdict(defaults, close, noise_pct([defaults, close, wide]))
    assert "faster" in verdict(defaults, close, noise_pct([defaults, close]))

    # Two values of one key that both beat the defaults but not each other: the faster is chosen, and said to be
    # indistinguishable from the other.
    four = timed("data.prefetch_batches=4", 80.0, 82.0, 81.0)
    eight = timed("data.prefetch_batches=8", 80.5, 81.5, 81.2)
    candidates = [defaults, four, eight]
    noise = noise_pct(candidates)
    assert fastest_overrides(candidates, noise) == ["data.prefetch_batches=4"]
    assert verdict_lines(candidates, noise)[-1].startswith(
        "within noise: can't tell data.prefetch_batches=8 from data.prefetch_batches=4"
    )


def test_quick_mode_times_few_options_in_three_rounds_and_says_what_the_noise_decides(
    image_tree, tmp_path, capsys
):
    argv = [
        *tiny_overrides(image_tree, tmp_path),
        "--quick",
        "--steps",
        "2",
        "--json",
        str(tmp_path / "t.json"),
    ]
    assert tune.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["repeats"] == tune.QUICK["repeats"] >= 3 and report["warmup"] == tune.QUICK["warmup"]
    timed = [c for c in report["candidates"] if c["ms"]]
    assert {c["name"].partition("=")[0] for c in timed} == {
        "defaults",
        "data.dali_threads",
        "data.prefetch_batches",
    }
    assert all(len(c["ms"]) == report["repeats"] for c in timed)
    assert f"noise: {report['noise_pct']:.1f}%" in out
    for line in report["verdicts"]:
        assert line in out and ("can't tell" in line or "than defaults" in line)
    assert len(report["verdicts"]) >= len(timed) - 1


@pytest.mark.slow
def test_tune_prepares_the_demo_from_an_empty_home_as_train_does(tmp_path, monkeypatch, capsys):
    """`python -m dali_kd.tune` with the demo's configs on a fresh machine used to end with "data folder not found"."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    # Only for speed: a small image and batch (the teacher trains on these too), no compile, one thread.
    speed = ["data.image_size=32", "data.eval_resize=36", "data.dali_threads=1", "train.batch_size=8",
             "train.compile_student=false", "--steps", "2", "--options", "prefetch_batches"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert tune.main(["--quick", *speed, "--json", str(tmp_path / "t.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "demo: generating the demo dataset" in out and "demo: training the resnet14t teacher" in out
    demo = load_config()
    assert Path(demo.model.teacher.checkpoint).expanduser().is_file(), "the demo's teacher, kept for train"
    assert str(Path(demo.model.teacher.checkpoint).expanduser()).startswith(str(home))
    report = json.loads((tmp_path / "t.json").read_text())
    assert all(len(c["ms"]) == 3 for c in report["candidates"]) and report["verdicts"]


def test_a_list_of_teachers_is_timed_as_written():
    """`python -m dali_kd.tune --preset two_teachers`: the one-teacher pin (model.teacher.checkpoint) beside
    model.teachers made every timing run's config invalid."""
    mine = ["data.root=/my/images"]  # nothing of the demo to prepare
    cfg = load_config(presets=["two_teachers"], overrides=mine)
    pinned = tune.prepare(cfg, torch.device("cpu"))
    assert load_config(presets=["two_teachers"], overrides=[*mine, *pinned]) == cfg
    assert pinned == []
