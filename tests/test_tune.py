"""`python -m dali_kd.tune`: times the configured step per candidate option, tabulates them, and prints only
overrides that a training run accepts."""

from __future__ import annotations

import json

from dali_kd.commands import tune
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
    printed = [] if fastest.startswith("fastest: the defaults") else fastest.removeprefix("fastest: ").split()
    assert printed == report["fastest_overrides"]
    for item in printed:
        parse_override(item)
        load_config(overrides=[*base, item])  # a training run takes it
    assert not (tmp_path / "runs").exists(), "tuning runs go to a temporary folder"


def test_only_overrides_faster_than_the_noise_are_chosen_the_fastest_value_per_key():
    def timed(name: str, *ms: float) -> tune.Candidate:
        return tune.Candidate(name, [] if name == "defaults" else [name], ms=list(ms))

    candidates = [
        timed("defaults", 100.0, 104.0),  # spread 4%: the noise
        timed("train.telemetry=false", 99.0, 100.0),  # -2.5%: inside the noise
        timed("data.prefetch_batches=1", 90.0, 91.0),  # -11%
        timed("data.prefetch_batches=4", 80.0, 81.0),  # -21%: the faster value of the same key
        timed("data.dali_threads=8", 120.0, 121.0),  # slower
        tune.Candidate("model.teacher.compile=false", ["model.teacher.compile=false"], note="skipped"),
    ]
    noise = tune.noise_pct(candidates)
    assert round(noise, 2) == round(100 * 4 / 102, 2)
    assert tune.fastest_overrides(candidates, noise) == ["data.prefetch_batches=4"]
    table = tune.table(candidates, batch_size=8)
    assert "| data.prefetch_batches=4 | 80.50 | -21.1% | 99.4 | 80.00, 81.00 |" in table
    assert "| model.teacher.compile=false | — | — | — | skipped |" in table


def test_a_bad_override_is_one_line_and_exit_2(image_tree, tmp_path, capsys):
    assert tune.main([*tiny_overrides(image_tree, tmp_path), "data.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command line: data.no_such_key: unknown key") and err.count("\n") == 1
