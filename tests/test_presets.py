"""Presets (`--preset NAME|PATH`): layered over the three files and under the command line, found by name or path,
every mistake in one a one-line error naming the preset file; the shipped function-matching preset is valid."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dali_kd.commands.demo import demo_teacher_path
from dali_kd.commands.train import build_parser, config_from_args, main
from dali_kd.config import CONFIG_DIR, DEMO_CONFIG_DIR, SECTION_FILES, load_config
from dali_kd.config.presets import PRESET_DIR, available_presets, find_preset
from dali_kd.errors import UserError
from tests.faults import tiny_args

FUNCTION_MATCHING = PRESET_DIR / "function_matching.yaml"
REAL_FILES = [CONFIG_DIR / f for f in SECTION_FILES.values()]
DEMO_TRAIN = DEMO_CONFIG_DIR / "train_config_kd.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_layers_go_files_then_presets_in_order_then_command_line(tmp_path):
    first = write(tmp_path / "first.yaml", "train: {seed: 1, epochs: 5}\ndata: {augment: {hue: 0.2}}\n")
    second = write(tmp_path / "second.yaml", "train: {seed: 2}\n")
    cfg = load_config(presets=[first, second], overrides=["train.epochs=7"])
    assert cfg.train.seed == 2, "a later preset wins over an earlier one"
    assert cfg.train.epochs == 7, "the command line wins over every preset"
    assert cfg.data.augment.hue == 0.2, "a preset wins over the file"
    # Deep merge: keys the preset does not name keep the file's values, not the schema's defaults.
    demo = load_config()
    assert cfg.data.augment.saturation == demo.data.augment.saturation == 0.4  # the default is 0.2
    assert cfg.train.batch_size == demo.train.batch_size == 64
    assert load_config(presets=[second, first]).train.seed == 1, "order matters"


def test_a_preset_by_name_by_path_and_in_the_current_folder(tmp_path, monkeypatch):
    cache_dir = ["train.teacher_feature_dir=/scratch/c"]
    by_path = load_config(*REAL_FILES, presets=[FUNCTION_MATCHING], overrides=cache_dir)
    for name in ("function_matching", "function_matching.yaml"):
        assert find_preset(name) == FUNCTION_MATCHING
    assert load_config(*REAL_FILES, presets=["function_matching"], overrides=cache_dir) == by_path
    assert by_path.data.augment.mix == "mixup"
    assert "function_matching" in available_presets()
    # A file of the user's own in the current folder is taken before a shipped preset of that name.
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "function_matching.yaml", "train: {epochs: 3}\n")
    assert find_preset("function_matching.yaml") == Path("function_matching.yaml")
    assert load_config(presets=["function_matching.yaml"]).train.epochs == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: {epochz: 3}\n", r"{p}: train\.epochz: unknown key \(did you mean 'epochs'\?\)$"),
        (
            "train:\n  optimzer:\n    lr: 0.1\n",
            r"{p}: train\.optimzer: unknown key \(did you mean 'optimizer'\?\)$",
        ),
        ("data: {augment: {mix: mixupp}}\n", r"{p}: data\.augment\.mix: Input should be 'none', 'mixup'"),
        ("train: {optimizer: {lr: -1}}\n", r"{p}: train\.optimizer\.lr: .*greater than 0"),
        (
            "trian: {epochs: 3}\n",
            r"{p}: unknown section 'trian' \(did you mean 'train'\? a preset holds data:",
        ),
        (
            "optimizer: {lr: 0.1}\n",
            r"{p}: unknown section 'optimizer' \(a preset holds data:, train: and/or model:\)$",
        ),
        ("train: 5\n", r"{p}: train: expected a mapping of the train keys the preset sets \(got 5\)$"),
        (
            "- train\n- data\n",
            r"{p}: expected a mapping of sections \(data:, train:, model:\) at the top level$",
        ),
        ("# nothing yet\n", r"{p}: no settings in the preset \(empty or only comments\)"),
        ("train: {epochs: 3, epochs: 4}\n", r"{p}: line 1: key 'epochs' appears twice"),
    ],
)
def test_a_mistake_in_a_preset_is_one_line_naming_the_preset(tmp_path, text, expected):
    preset = write(tmp_path / "mine.yaml", text)
    with pytest.raises(UserError, match="^" + expected.format(p=re.escape(str(preset)))) as caught:
        load_config(presets=[preset])
    assert "\n" not in str(caught.value)


def test_a_preset_that_is_not_there(tmp_path):
    with pytest.raises(
        UserError, match=rf"^preset file not found: {re.escape(str(tmp_path / 'nope.yaml'))}$"
    ):
        load_config(presets=[tmp_path / "nope.yaml"])
    with pytest.raises(UserError) as caught:
        load_config(presets=["function_matchin"])
    assert str(caught.value) == (
        f"--preset function_matchin: no such file, and no preset named 'function_matchin' in {PRESET_DIR} "
        f"(available: {', '.join(available_presets())})"
    )
    assert "function_matching" in str(caught.value)


def test_a_conflict_names_the_preset_and_the_file_beside_it():
    """The shipped preset leaves train.teacher_feature_dir to the user: the error says so, and where each was set."""
    with pytest.raises(UserError) as caught:
        load_config(presets=["function_matching"])
    assert str(caught.value).startswith(
        f"{FUNCTION_MATCHING} and {DEMO_TRAIN}: train.cache_teacher_features=true needs a folder "
        "(got train.teacher_feature_dir=null)"
    )


@pytest.mark.parametrize("files", [REAL_FILES, []], ids=["real", "demo"])
def test_the_function_matching_preset_is_valid_and_scales_its_base(files):
    base = load_config(*files)
    cfg = load_config(
        *files, presets=["function_matching"], overrides=["train.teacher_feature_dir=/scratch/c"]
    )
    a, t = cfg.data.augment, cfg.train
    assert (a.mix, a.mix_alpha, a.mix_prob, a.crop_scale) == ("mixup", 1.0, 1.0, (0.08, 1.0))
    assert (t.cache_teacher_features, t.cache_mode, t.cache_views_per_image) == (True, "replay", 16)
    assert t.teacher_feature_dir == "/scratch/c"
    # The loss, the models and the step window are the base config's.
    assert t.loss == base.train.loss and cfg.model == base.model
    assert t.max_steps_per_epoch == base.train.max_steps_per_epoch
    if files:  # the real-use base: a 4x schedule, warm-up scaled alike
        assert (base.train.epochs, t.epochs) == (100, 400)
        assert (base.train.optimizer.warmup_steps, t.optimizer.warmup_steps) == (2500, 10000)
    raw = yaml.safe_load(FUNCTION_MATCHING.read_text())
    assert "teacher_feature_dir" not in raw["train"], "the cache folder is the user's to choose"


@pytest.mark.parametrize("files", [REAL_FILES, []], ids=["real", "demo"])
def test_the_two_teachers_preset_gives_the_demos_two_teachers_and_nothing_else(files):
    base = load_config(*files)
    cfg = load_config(*files, presets=["two_teachers"])
    assert cfg.model.teacher is None and len(cfg.model.teachers or []) == 2
    assert cfg.model.teacher_keys == ["resnet14t", "cs3darknet_focus_s"]
    assert [t.checkpoint for t in cfg.model.teacher_specs] == [
        demo_teacher_path(k) for k in cfg.model.teacher_keys
    ]
    # The student, the data and the training are the base config's.
    assert cfg.model.student == base.model.student and cfg.data == base.data and cfg.train == base.train
    assert "two_teachers" in available_presets()


def test_train_parses_preset_flags_and_loads_through_them(tmp_path):
    mine = write(tmp_path / "mine.yaml", "train: {seed: 5, epochs: 9}\n")
    args = build_parser().parse_intermixed_args(
        ["--preset", "function_matching", "train.epochs=3", "--preset", str(mine), "--device", "cpu",
         "train.teacher_feature_dir=/tmp/fm"]
    )  # fmt: skip
    assert args.preset == ["function_matching", str(mine)]
    cfg, presets = config_from_args(args)
    assert presets == [FUNCTION_MATCHING, mine]
    assert cfg.data.augment.mix == "mixup" and cfg.train.seed == 5
    assert cfg.train.epochs == 3 and cfg.train.device == "cpu", "flags and KEY=VALUE win over presets"
    assert build_parser().parse_intermixed_args([]).preset == []


def test_cli_preset_errors_are_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dali_kd.train", "--preset", "no_such_preset"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        # This checkout's dali_kd, whatever the environment has installed.
        env={**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        f"error: --preset no_such_preset: no such file, and no preset named 'no_such_preset' in {PRESET_DIR} "
        f"(available: {', '.join(available_presets())})"
    ]
    assert not (tmp_path / "runs").exists()


def test_a_run_started_with_a_preset_resumes_with_the_same_preset(image_tree, tmp_path, capsys):
    """The run's config.yaml holds what the preset set, so the same --preset resumes it (same config hash); leaving
    the preset out changes the config and is refused like any other change."""
    # Not train.seed: that would also change the random-init test teacher, refused for its own reason.
    preset = write(tmp_path / "mine.yaml", "train: {optimizer: {lr: 0.001}}\ndata: {augment: {mix: mixup}}\n")
    args = [*tiny_args(image_tree, tmp_path / "runs"), "data.scan=off", "train.eval_every_n_epochs=1"]
    assert main([*args, "--preset", str(preset)]) == 0
    run_dir = tmp_path / "runs" / "fault"
    said = capsys.readouterr().out
    assert f"presets: {preset} (over the config files" in said
    assert f"presets: {preset}" in (run_dir / "train.log").read_text()
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["train"]["optimizer"]["lr"] == 0.001 and written["data"]["augment"]["mix"] == "mixup"

    assert main([*args, "--preset", str(preset), "--resume", "auto"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert main([*args, "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "the config differs from the checkpoint's in" in err and "train.optimizer.lr" in err, err
