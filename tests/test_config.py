"""Config errors: one line naming the file and the dotted key, exit code 2, before any work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dali_kd.config import CONFIG_DIR, DEMO_CONFIG_DIR, SECTION_FILES, dump_config, load_config
from dali_kd.errors import UserError


def test_shipped_configs_are_valid():
    real = load_config(*(CONFIG_DIR / f for f in SECTION_FILES.values()))
    assert real.train.max_steps_per_epoch == 500 and real.train.num_workers == 4
    assert not real.train.persistent_workers and not real.train.use_local_crops
    assert real.model.teacher.name == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert real.model.teacher.pretrained
    assert real.train.batch_size == 256
    demo = load_config()
    assert demo.data.backend == "dali" and demo.train.compile_student == "auto"


def test_overrides_reach_every_section():
    cfg = load_config(
        overrides=[
            "train.batch_size=64",
            "model.teacher.checkpoint=null",
            "data.augment.flip_prob=0",
            "data.val_root=/data/val",
        ]
    )
    assert cfg.train.batch_size == 64 and cfg.model.teacher.checkpoint is None
    assert cfg.data.augment.flip_prob == 0 and cfg.data.val_root == "/data/val"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "train.batch_sise=3",
            r"command line: train\.batch_sise: unknown key \(did you mean 'batch_size'\?\)",
        ),
        ("train.batch_size=0", r"train\.batch_size: .*greater than or equal to 1"),
        ("train.batch_size=abc", r"train\.batch_size: .*valid integer"),
        ("train.grad_accum_steps=0", r"^command line: train\.grad_accum_steps: .*greater than or equal to 1"),
        ("train.grad_accum_steps=2.5", r"^command line: train\.grad_accum_steps: .*valid integer"),
        ("data.backend=pil", r"data\.backend: .*'dali' or 'torchvision'"),
        ("data.augment.crop_scale=[0.9,0.1]", r"data\.augment\.crop_scale: need 0 < low <= high <= 1"),
        ("data.augment.hue=0.7", r"data\.augment\.hue: .*less than or equal to 0\.5"),
        ("train.loss.temprature=2", r"train\.loss\.temprature: unknown key \(did you mean 'temperature'\?\)"),
        ("optimizer.lr=1", r"unknown section 'optimizer'"),
        ("train.batch_size", r"expected KEY=VALUE"),
        # An unknown section made by an override is the command line's, not the YAML file's.
        (
            "train.optimzer.lr=1",
            r"^command line: train\.optimzer: unknown key \(did you mean 'optimizer'\?\)$",
        ),
        (
            "train.optimizer.lr=.inf",
            r"^command line: train\.optimizer\.lr: Input should be a finite number \(got inf\)",
        ),
        (
            "data.augment={flip_prob: 0, flip_prob: 1}",
            r"^command line: 'data\.augment=.*': key 'flip_prob' appears twice",
        ),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(UserError, match=expected):
        load_config(overrides=[override])


def test_errors_in_files_name_the_file(tmp_path):
    bad = tmp_path / "train.yaml"
    text = (
        (DEMO_CONFIG_DIR / "train_config_kd.yaml")
        .read_text()
        .replace("log_every_n_steps:", "log_every_n_stepz:")
    )
    bad.write_text(text)
    with pytest.raises(UserError, match=rf"{bad}: train\.log_every_n_stepz: unknown key \(did you mean"):
        load_config(train_config=bad)
    nested = tmp_path / "model.yaml"
    nested.write_text("teacher: {name: resnet18}\nstudent: {nmae: resnet10t}\n")
    with pytest.raises(
        UserError, match=rf"{nested}: model\.student\.nmae: unknown key \(did you mean 'name'"
    ):
        load_config(model_config=nested)
    broken = tmp_path / "data.yaml"
    broken.write_text("root: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(data_config=broken)
    with pytest.raises(UserError, match="config file not found"):
        load_config(data_config=tmp_path / "missing.yaml")


def test_files_that_hold_no_config_say_what_they_are(tmp_path):
    twice = tmp_path / "data.yaml"
    twice.write_text("root: /a\naugment:\n  hue: 0.1\n  flip_prob: 0.2\n  hue: 0.3\n")
    with pytest.raises(UserError, match=rf"^{twice}: line 5: key 'hue' appears twice \(first on line 3\)$"):
        load_config(data_config=twice)
    merged = tmp_path / "merged.yaml"  # overriding a merged key is what YAML merging is for, not a duplicate
    merged.write_text("root: /a\naugment: &a {hue: 0.1}\nx: {<<: *a, hue: 0.2}\n")
    with pytest.raises(UserError, match=r"data\.x: unknown key"):
        load_config(data_config=merged)
    for text in ("", "# all settings to come\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(UserError, match=rf"^{empty}: no settings in the file \(empty or only comments\)"):
            load_config(train_config=empty)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("root: /data\nname: café\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"^{latin}: line 2: not UTF-8 text \(byte 0xe9\)"):
        load_config(model_config=latin)


def _float_keys(model=None, prefix=""):
    """Every float setting of the schema as (dotted key, how many floats it holds)."""
    from pydantic import BaseModel

    from dali_kd.config import Config

    for name, field in (model or Config).model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _float_keys(ann, f"{prefix}{name}.")
        elif ann in (float, float | None):
            yield f"{prefix}{name}", 1
        elif getattr(ann, "__origin__", None) is tuple and set(ann.__args__) == {float}:
            yield f"{prefix}{name}", len(ann.__args__)


@pytest.mark.parametrize(("key", "size"), list(_float_keys()))
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_no_float_setting_takes_inf_or_nan(key, size, value):
    given = value if size == 1 else "[" + ", ".join([value] + ["0.5"] * (size - 1)) + "]"
    with pytest.raises(
        UserError, match=rf"^command line: {re.escape(key)}(\.0)?: Input should be a finite number"
    ):
        load_config(overrides=[f"{key}={given}"])


def test_float_settings_are_all_checked():
    keys = dict(_float_keys())
    assert {
        "train.optimizer.lr",
        "train.optimizer.betas",
        "data.augment.std",
        "model.student.drop_path_rate",
    } <= set(keys)
    assert len(keys) >= 20, keys


# Settings that are each valid but do not work together: one line naming every key involved with its value.
DEMO_DATA, DEMO_TRAIN = DEMO_CONFIG_DIR / "data_config.yaml", DEMO_CONFIG_DIR / "train_config_kd.yaml"
CACHE_ON = ("train.cache_teacher_features=true", "train.teacher_feature_dir=cache")
LOCAL = "train.use_local_crops=true"
ZERO_WEIGHTS = ["train.loss.feature_weight=0", "train.loss.logit_weight=0"]
CONFLICTS = [  # (overrides, what the one-line error says)
    (["data.image_size=224"], "data.eval_resize=36 is smaller than data.image_size=224: the eval centre"),
    (["data.eval_resize=30"], "data.eval_resize=30 is smaller than data.image_size=32"),
    (["train.optimizer.min_lr=0.01"], "train.optimizer.min_lr=0.01 is larger than train.optimizer.lr=0.002"),
    ([LOCAL, "data.local_crop_size=80"], "data.local_crop_size=80 is larger than data.image_size=32 with"),
    ([LOCAL, *CACHE_ON], "train.cache_teacher_features=true cannot be combined with " + LOCAL),
    ([LOCAL, "data.num_global_crops=1", "train.loss.global_pairing=cross"],
     "train.loss.global_pairing=cross needs data.num_global_crops >= 2 (got data.num_global_crops=1)"),
    ([*CACHE_ON, "data.backend=torchvision"], "needs data.backend=dali (got data.backend=torchvision)"),
    (["train.cache_teacher_features=true"], "needs a folder (got train.teacher_feature_dir=null)"),
    ([*CACHE_ON, "train.cache_outputs=[tokens]"], "cache_outputs=[tokens] with train.cache_teacher_features"),
    ([*CACHE_ON, "train.cache_outputs=[logits]"], "feature_weight=1 needs pooled in train.cache_outputs"),
    (ZERO_WEIGHTS, "train.loss.feature_weight=0, train.loss.patch_weight=0, train.loss.logit_weight=0 and "),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "expected"), CONFLICTS)
def test_conflicting_settings_name_both_keys(overrides, expected):
    with pytest.raises(UserError, match=re.escape(expected)) as caught:
        load_config(overrides=overrides)
    message = str(caught.value)
    assert "\n" not in message and ": :" not in message and not message.startswith("config")


def test_conflict_says_where_each_key_was_set():
    with pytest.raises(UserError) as caught:
        load_config(overrides=["data.image_size=224"])
    assert str(caught.value) == (
        f"{DEMO_DATA} and command line: data.eval_resize=36 is smaller than data.image_size=224: the eval "
        "centre crop would not fit; raise data.eval_resize or lower data.image_size"
    )
    where = re.escape(f"{DEMO_TRAIN} and command line: ")
    with pytest.raises(UserError, match=rf"^{where}train\.loss\.feature_weight=1 needs pooled"):
        load_config(overrides=[*CACHE_ON, "train.cache_outputs=[logits]"])


@pytest.mark.parametrize(
    "overrides",
    [
        ("data.image_size=224", "data.val_root=null"),  # no evaluation, no eval crop
        ("data.image_size=36",),  # equal sizes fit
        ("data.local_crop_size=80",),  # local crops off
        ("train.optimizer.min_lr=0.002",),
        (*ZERO_WEIGHTS, "train.loss.label_weight=1"),
        (*CACHE_ON, "train.cache_outputs=[logits]", "train.loss.feature_weight=0"),
    ],
)
def test_settings_that_work_together_load(overrides):
    load_config(overrides=list(overrides))


def test_cli_refuses_a_conflict_before_any_work(tmp_path):
    """`python -m dali_kd.train data.image_size=224` with the demo's eval_resize 36 used to die in DALI."""
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "dali_kd.train", "data.image_size=224"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "HOME": str(home)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        f"error: {DEMO_DATA} and command line: data.eval_resize=36 is smaller than data.image_size=224: "
        "the eval centre crop would not fit; raise data.eval_resize or lower data.image_size"
    ]
    assert list(home.iterdir()) == [] and not (tmp_path / "runs").exists(), "no demo data, no run directory"


def test_dump_round_trips(tmp_path):
    cfg = load_config(overrides=["train.seed=7"])
    out = tmp_path / "config.yaml"
    out.write_text(dump_config(cfg))
    import yaml

    raw = yaml.safe_load(out.read_text())
    assert load_config(overrides=[f"train.seed={raw['train']['seed']}"]) == cfg


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dali_kd.train", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train.batch_sise=3"], "train.batch_sise: unknown key (did you mean 'batch_size'?)"),
        (["--device", "tpu"], "argument --device: invalid choice"),
        (["--data_config", "nowhere.yaml"], "config file not found: nowhere.yaml"),
        (["model.student.name=resnet_not_real"], "model.student.name: unknown timm model 'resnet_not_real'"),
        (
            [
                "data.root=/no/such/dir",
                "model.teacher.checkpoint=null",
                "--data_config",
                str(DEMO_CONFIG_DIR / "data_config.yaml"),
            ],
            "data folder not found: /no/such/dir",
        ),
        (
            [
                "train.use_local_crops=true",
                "train.cache_teacher_features=true",
                "train.teacher_feature_dir=cache",
            ],
            "train.cache_teacher_features=true cannot be combined with train.use_local_crops=true",
        ),
        (
            ["train.use_local_crops=true", "data.num_global_crops=1", "train.loss.global_pairing=cross"],
            "train.loss.global_pairing=cross needs data.num_global_crops >= 2 (got data.num_global_crops=1)",
        ),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, expected):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "runs").exists(), "no run directory before the config is valid"


def test_cli_accepts_overrides_between_flags():
    from dali_kd.commands.train import build_parser

    args = build_parser().parse_intermixed_args(
        ["train.batch_size=4", "--device", "cpu", "data.image_size=32", "--resume", "none", "train.seed=3"]
    )
    assert args.overrides == ["train.batch_size=4", "data.image_size=32", "train.seed=3"]
    assert args.device == "cpu" and args.resume == "none"


def test_yaml_off_means_off():
    assert load_config(overrides=["data.scan=off"]).data.scan == "off"
    assert load_config(overrides=["data.scan=full"]).data.scan == "full"


def test_keys_free_on_resume_come_from_the_schema():
    from dali_kd.config import resume_free_keys
    from dali_kd.identity import config_hash

    assert resume_free_keys() == {
        "data.val_root", "data.dali_threads", "data.prefetch_batches", "train.cpu_threads", "train.output_dir", "train.run_name",
        "train.log_every_n_steps", "train.save_every_n_steps", "train.keep_last_checkpoints",
        "train.telemetry", "train.tensorboard", "train.device", "train.knn_k", "train.knn_bank_size",
        "train.eval_every_n_epochs", "train.num_workers", "train.persistent_workers",
        "train.max_skipped_steps", "data.hw_decoder_load", "data.device_memory_padding",
        "data.host_memory_padding", "data.preallocate_width_hint", "data.preallocate_height_hint",
        "train.eval_head", "model.teacher.compile", "train.optimizer.fused",
    }  # fmt: skip
    base = config_hash(load_config())
    for free in (
        "train.log_every_n_steps=7",
        "data.val_root=null",
        "train.run_name=x",
        "data.dali_threads=1",
    ):
        assert config_hash(load_config(overrides=[free])) == base, free
    for bound in ("train.batch_size=32", "data.augment.flip_prob=0", "train.optimizer.lr=0.001"):
        assert config_hash(load_config(overrides=[bound])) != base, bound


def test_every_config_file_ships_inside_the_package():
    """A wheel carries configs/ as dali_kd/configs (package data): every file there must match a package-data glob,
    or `python -m dali_kd.train` after a plain `pip install` misses it."""
    import fnmatch

    from dali_kd.config import CONFIG_DIR, DEMO_CONFIG_DIR

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    assert (root / "configs").resolve() == CONFIG_DIR and CONFIG_DIR / "demo" == DEMO_CONFIG_DIR
    assert (root / "dali_kd" / "configs").resolve() == CONFIG_DIR, "dali_kd/configs links to configs/"
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = setuptools["package-data"]["dali_kd"]
    files = [f"configs/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*") if p.is_file()]
    # fnmatch's * also matches "/", a setuptools glob's does not: a file in a subfolder needs its folder's glob.
    shipped = [f for f in files if any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert files and shipped == files, (sorted(set(files) - set(shipped)), globs)


TWO_TEACHERS = """\
teachers:
  - name: resnet14t
  - name: resnet14t
    image_size: 48
  - name: resnet10t.a1_in1k
    key: small
student:
  name: resnet10t
"""


def test_several_teachers_load_with_their_own_names_and_sizes(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(TWO_TEACHERS)
    cfg = load_config(model_config=model, overrides=["data.image_size=32"])
    assert cfg.model.teacher_keys == ["resnet14t", "resnet14t_2", "small"]
    # Each teacher's own size, else data.teacher_image_size, else data.image_size; views cut at the largest.
    assert cfg.teacher_image_sizes == [32, 48, 32]
    assert cfg.view_size == 48
    assert cfg.model.teacher_where(1) == "model.teachers[1] (resnet14t)"
    # One teacher is a list of one.
    single = load_config()
    assert single.model.teacher_specs == [single.model.teacher]
    assert single.model.teacher_where(0) == "model.teacher"


def test_an_override_reaches_one_teacher_of_several(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(TWO_TEACHERS)
    cfg = load_config(
        model_config=model, overrides=["model.teachers.1.image_size=64", "model.teachers.0.key=big"]
    )
    assert cfg.teacher_image_sizes[1] == 64
    assert cfg.model.teacher_keys[0] == "big"
    # A key given to one teacher is its own: a default that would repeat it is numbered instead.
    taken = load_config(model_config=model, overrides=["model.teachers.2.key=resnet14t"])
    assert taken.model.teacher_keys == ["resnet14t_2", "resnet14t_3", "resnet14t"]
    with pytest.raises(UserError, match=r"model\.teachers\.3\.key: .*entries 0 to 2"):
        load_config(model_config=model, overrides=["model.teachers.3.key=x"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.teacher.name=resnet18"], "model.teacher, or several as model.teachers"),
        (["model.teachers.0.key=big", "model.teachers.2.key=big"], "key 'big' names more than one teacher"),
        (["model.teachers.0.key=Big"], r"model\.teachers\.0\.key: String should match"),
        (
            ["model.teachers.1.key=label"],
            r"model\.teachers\.1\.key: .*'label' is a name the losses already use",
        ),
    ],
)
def test_teacher_list_errors_are_one_line(tmp_path, overrides, expected):
    model = tmp_path / "model.yaml"
    model.write_text(TWO_TEACHERS)
    with pytest.raises(UserError, match=expected) as caught:
        load_config(model_config=model, overrides=overrides)
    assert "\n" not in str(caught.value)
