"""YAML a user hands the config loader (section files, presets, overrides, a run's config.yaml) that is nested too
deep or whose aliases explode is refused in one line naming the file, before anything is built from it."""

from __future__ import annotations

import pytest

from dali_kd.config import load_config, read_yaml
from dali_kd.errors import UserError
from tests.faults import assert_one_line_error, run_module


def billion_laughs(key_path: str = "train:\n  optimizer:\n    betas: ") -> str:
    """Nine aliases of nine aliases, eight deep: a few hundred bytes that expand to 9**9 strings."""
    lists = ["[&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]]"]
    for previous, name in zip("abcdefg", "bcdefgh", strict=True):
        lists.append(f"[&{name} [{', '.join([f'*{previous}'] * 9)}]]")
    return key_path + f"[{', '.join(lists)}, [{', '.join(['*h'] * 9)}]]\n"


def test_a_preset_of_nested_aliases_is_refused_in_one_line_naming_the_file(tmp_path):
    preset = tmp_path / "laughs.yaml"
    preset.write_text(billion_laughs())
    assert len(preset.read_bytes()) < 500
    # The timeout only stops a hang (the unguarded loader printed 9**9 strings); it times nothing.
    result = run_module("dali_kd.train", ["--preset", str(preset)], tmp_path, timeout=120)
    assert_one_line_error(
        result, 2, rf"^error: {preset}: line 3: its aliases expand to more than 100,000 values \("
    )


@pytest.mark.parametrize("where", ["data_config", "preset"])
def test_a_list_nested_10000_deep_is_refused_in_one_line_naming_the_file(tmp_path, where):
    deep = tmp_path / "deep.yaml"
    nested = "[" * 10_000 + "]" * 10_000
    deep.write_text(f"root: {nested}\n" if where == "data_config" else f"data:\n  root: {nested}\n")
    line = 1 if where == "data_config" else 2
    with pytest.raises(UserError, match=rf"^{deep}: line {line}: nested more than 64 levels deep"):
        load_config(**({"data_config": deep} if where == "data_config" else {"presets": [deep]}))


def test_an_override_nested_too_deep_or_holding_itself_is_one_line_on_the_command_line():
    with pytest.raises(
        UserError, match=r"^command line: 'train\.optimizer\.betas=\[\[\[.*': nested more than 64"
    ):
        load_config(overrides=["train.optimizer.betas=" + "[" * 5000 + "]" * 5000])
    with pytest.raises(UserError, match=r"^command line: '.*': an alias inside its own anchor"):
        load_config(overrides=["train.optimizer.betas=&a [1, *a]"])


def test_a_value_that_holds_itself_is_refused(tmp_path):
    looped = tmp_path / "model.yaml"
    looped.write_text("student:\n  name: x\n  extra: &a {again: *a}\n")
    with pytest.raises(UserError, match=rf"^{looped}: line 3: an alias inside its own anchor"):
        load_config(model_config=looped)


def test_deep_nesting_and_aliases_within_the_limits_are_read_as_yaml_reads_them(tmp_path):
    path = tmp_path / "ok.yaml"
    nested = "[" * 60 + "1" + "]" * 60
    path.write_text(f"deep: {nested}\nbase: &b [1, 2, 3]\nmany: [{', '.join(['*b'] * 20_000)}]\n")
    data = read_yaml(path)
    inner = data["deep"]
    for _ in range(59):
        (inner,) = inner
    assert inner == [1]
    assert len(data["many"]) == 20_000 and data["many"][-1] == [1, 2, 3]


def test_a_long_wrong_value_is_quoted_cut_short(tmp_path):
    preset = tmp_path / "long.yaml"
    preset.write_text(f"train:\n  optimizer:\n    betas: [{', '.join(['0.5'] * 1000)}]\n")
    with pytest.raises(UserError, match=r"train\.optimizer\.betas: .*\(got \[.{99}… \(5,000 characters\)\)$"):
        load_config(presets=[preset])
