"""Faults of input and output: a full disk under every writer, files that are not what they claim, inputs that
changed since a checkpoint, and the modes of what a run writes. Each fault: one `error:` line naming what and
where, exit 2, nothing saved before touched, no temporary file left.

A full disk is real: a small tmpfs where this machine may mount one (skipped elsewhere), and everywhere a file-size
limit (RLIMIT_FSIZE, SIGXFSZ ignored), under which writes fail with EFBIG ("file too large").

Run as a script, this module is a `dali_kd.train` whose output disk fills up after the second checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_kd.errors import UserError
from dali_kd.training.callbacks import Callback
from tests.faults import ROOT, assert_one_line_error, run_module, tiny_args

BIG = 1 << 20  # a write larger than the small filesystem and the file-size limit
LIMIT = 16 << 10  # RLIMIT_FSIZE of a limited writer
TMPFS_SIZE = 512 << 10
NO_SPACE = "no space left on device"
TOO_LARGE = "file too large"


# ---- a small real filesystem, a file-size limit ---------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `where`; the test is skipped where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> None:
    """Take every free block of the filesystem that holds `directory`."""
    with open(directory / f"filler-{uuid.uuid4().hex}", "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)


def limit_file_size(limit: int) -> None:
    """From now on (in this process and the ones it starts) files may not grow past `limit`: a write that would
    fails with EFBIG instead of killing the process with SIGXFSZ."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


# ---- every writer: a small first version, then a write that the disk refuses ----------------------------------
def _checkpoint(d: Path, big: bool) -> None:
    from dali_kd.runs.checkpoint import CheckpointDir

    CheckpointDir(d, keep_last=5).save(
        {"format": 1, "w": torch.zeros(BIG // 4 if big else 8)}, 2 if big else 1
    )


def _metrics(d: Path, big: bool) -> None:
    from dali_kd.telemetry.sinks import MetricsSink

    sink = MetricsSink(d)
    try:
        sink.write({"step": 2 if big else 1, "loss": 0.5, "note": "x" * (BIG if big else 10)})
    finally:
        sink.close()


def _summary(d: Path, big: bool) -> None:
    from dali_kd.io import write_json_atomic

    write_json_atomic(d / "summary.json", {"steps": 2 if big else 1, "note": "x" * (BIG if big else 10)})


def _student(d: Path, big: bool) -> None:
    from dali_kd.io import save_safetensors_atomic

    save_safetensors_atomic(d / "student.safetensors", {"w": torch.ones(BIG // 4 if big else 8)})


def _report(d: Path, big: bool) -> None:
    from dali_kd.commands import report

    if not big:  # a run's rows; the report's picture is far larger than the limits
        row = {"step": 1, "epoch": 0, "loss": 1.0, "img_per_s": 10.0, "step_ms": 5.0}
        (d / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "step": 2}) + "\n")
        (d / "report.png").write_bytes(b"the previous report")
        return
    report.draw(d, report.read_rows(d), None)


def _teacher_cache(d: Path, big: bool) -> None:
    from dali_kd.data.batch import ViewRecord
    from dali_kd.data.outputs import ModelOutput
    from dali_kd.teacher_cache.layout import Part
    from dali_kd.teacher_cache.store import TeacherCache

    # 100 images × 2 views × 128 fp32: the pooled array is 100 KiB, sparse until rows are written.
    cache = TeacherCache(
        d / "cache", {"teacher": "t"}, [Part("pooled", (128,), "float32")], 100, 2, create=True
    )
    ids = np.array([99, 98] if big else [0], dtype=np.int64)  # rows past the file-size limit
    n = len(ids)
    view = ViewRecord(
        crop_anchor=torch.zeros(n, 2), crop_shape=torch.ones(n, 2), flip=torch.zeros(n, dtype=torch.long),
        jitter=torch.ones(n, 4),
    )  # fmt: skip
    cache.write(ids, np.zeros(n, dtype=np.int64), ModelOutput(torch.ones(n, 128), None, None), view)


WRITERS: dict[str, Callable[[Path, bool], None]] = {
    "checkpoint": _checkpoint, "metrics": _metrics, "summary": _summary, "student": _student,
    "report": _report, "teacher_cache": _teacher_cache,
}  # fmt: skip
# What the one line names: the file the refused write was for.
NAMED = {
    "checkpoint": r"cannot write checkpoint \S+/checkpoints/step_000000002\.pt: {reason}; earlier checkpoints are "
                  r"untouched",
    "metrics": r"cannot write \S+/metrics\.jsonl: {reason}; the rows written before are kept",
    "summary": r"cannot write \S+/summary\.json: {reason}; the previous version is untouched",
    "student": r"cannot write \S+/student\.safetensors: {reason}; the previous version is untouched",
    "report": r"cannot write \S+/report\.png: {reason}; the previous version is untouched",
    "teacher_cache": r"train\.teacher_feature_dir: cannot write \S+/cache/pooled\.bin: {reason}; the rows written "
                     r"before are kept",
}  # fmt: skip


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file's bytes (the teacher cache's arrays aside: its done bytes say which rows count)."""
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.name.startswith("filler-") and p.parent.name != "cache"
    }


def refuse(writer: str, directory: str) -> int:
    """The writer's big write; prints the UserError it raised (in a process of its own: a write into a memory
    map on a full disk kills the process with SIGBUS)."""
    try:
        WRITERS[writer](Path(directory), True)
    except UserError as e:
        print(json.dumps({"error": str(e)}))
        return 0
    return 1


def write_refused(medium: str, writer: str, d: Path) -> str:
    """The writer's second, big write on a full disk (medium tmpfs) or past a file-size limit (medium limit):
    the one line it fails with."""
    if medium == "tmpfs":
        fill(d)  # what was saved had room; now nothing has
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_faults_io import refuse; sys.exit(refuse(*sys.argv[1:]))",
         writer, str(d)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        preexec_fn=(lambda: limit_file_size(LIMIT)) if medium == "limit" else None,
    )  # fmt: skip
    assert child.returncode == 0, f"exit {child.returncode}, no UserError:\n{child.stderr[-3000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])["error"]


@pytest.fixture(params=["tmpfs", "limit"])
def medium(request, tmp_path) -> Iterator[tuple[str, Path]]:
    """Where a writer writes: a small tmpfs, or a plain folder (its refused write then runs under a size limit)."""
    if request.param == "limit":
        yield "limit", tmp_path
        return
    with small_tmpfs(tmp_path / "disk", TMPFS_SIZE) as d:
        yield "tmpfs", d


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_refused_write_is_one_line_and_keeps_what_was_saved(medium, writer):
    kind, d = medium
    WRITERS[writer](d, False)
    before = snapshot(d)
    message = write_refused(kind, writer, d)
    assert re.fullmatch(NAMED[writer].format(reason=NO_SPACE if kind == "tmpfs" else TOO_LARGE), message), (
        message
    )
    assert snapshot(d) == before, "a file saved before the refused write changed"
    assert not list(d.rglob("*.tmp")), "a temporary file was left"
    if writer == "teacher_cache":
        from dali_kd.teacher_cache.store import DONE

        done = np.fromfile(d / "cache" / "done.bin", dtype=np.uint8).reshape(100, 2)
        assert done[0, 0] == DONE and done.sum() == DONE, "the first row counts, the refused ones do not"


# ---- the command line: one line per fault -----------------------------------------------------------------------
RUN_ARGS = ["train.max_steps_per_epoch=4", "train.save_every_n_steps=1", "train.log_every_n_steps=1"]


def train_as(umask: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dali_kd.train", *args], capture_output=True, text=True, cwd=cwd, timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(image_tree, tmp_path_factory) -> Path:
    """A finished tiny run (umask 022) with a checkpoint after each of its 4 steps."""
    out = tmp_path_factory.mktemp("trained")
    result = train_as(0o022, [*tiny_args(image_tree, out), *RUN_ARGS], out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "fault"


@dataclass
class Case:
    """What a case runs with: its own folder, the test images, a finished run; `out` is where its run writes."""

    tmp: Path
    images: Path
    trained: Path
    stack: contextlib.ExitStack
    out: Path | None = None

    def file(self, name: str, data: bytes) -> str:
        (self.tmp / name).write_bytes(data)
        return str(self.tmp / name)

    def train(self, *extra: str) -> tuple[str, list[str]]:
        self.out = self.out or self.tmp / "out"
        return "dali_kd.train", [*tiny_args(self.images, self.out), *extra]

    def resume(self, *extra: str) -> tuple[str, list[str]]:
        return self.train("--resume", str(self.trained / "checkpoints" / "step_000000004.pt"), *extra)

    def report_on(self, rows: list[dict]) -> tuple[str, list[str]]:
        (self.tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return "dali_kd.report", [str(self.tmp)]

    def disk_fills_up(self, how: str) -> tuple[str, list[str]]:
        """A run whose output disk fills up (or whose files may grow no more) after its second checkpoint."""
        self.out = (
            self.stack.enter_context(small_tmpfs(self.tmp / "disk", 32 << 20)) if how == "tmpfs" else None
        )
        return "tests.test_faults_io", [how, *self.train(*RUN_ARGS)[1]]

    def data_changed(self) -> tuple[str, list[str]]:
        """A run on a folder that then gets 2 more images, resumed."""
        data = self.tmp / "data"
        shutil.copytree(self.images / "train", data)
        module, args = self.train(f"data.root={data}", *RUN_ARGS)
        assert run_module(module, args, self.tmp).returncode == 0
        for name in ("new_1.jpg", "new_2.jpg"):
            shutil.copy(data / "class_0" / "0.jpg", data / "class_0" / name)
        return self.train(f"data.root={data}", *RUN_ARGS, "--resume", "auto")


GARBAGE = bytes(range(256)) * 20
LATIN_1 = "root: café\n".encode("latin-1")
TWICE = b"root: a\nimage_size: 32\nimage_size: 64\n"
NOT_OURS = r"--resume: \S+ is not a dali_kd checkpoint, or it is damaged"
ROW_KEYS = "'img_per_s', 'loss', 'step', 'step_ms'"
CLI_CASES = [  # (id, how to run it, what its one error line says); every fault exits 2
    ("resume-empty-file", lambda c: c.train("--resume", c.file("s.pt", b"")), rf"{NOT_OURS} \(the file is empty\)$"),
    ("resume-garbage", lambda c: c.train("--resume", c.file("s.pt", GARBAGE)), rf"^(?!.*weights_only).*{NOT_OURS} \("),
    ("resume-other-student", lambda c: c.resume("--allow-config-change", "model.student.name=test_vit3"),
     r"--resume: the checkpoint's student does not fit this model \(size mismatch for backbone\.\S+: copying a"),
    ("config-not-utf8", lambda c: c.train("--data_config", c.file("d.yaml", LATIN_1)), r"d\.yaml: line 1: not UTF-8 text"),
    ("config-duplicate-key", lambda c: c.train("--data_config", c.file("d.yaml", TWICE)),
     r"d\.yaml: line 3: key 'image_size' appears twice \(first on line 2\)"),
    ("config-empty", lambda c: c.train("--model_config", c.file("m.yaml", b"")), r"m\.yaml: no settings in the file"),
    ("lr-inf", lambda c: c.train("train.optimizer.lr=.inf"), r"command line: train\.optimizer\.lr: .*finite number"),
    ("unknown-key-on-command-line", lambda c: c.train("train.optimzer.lr=1"),
     r"^error: command line: train\.optimzer: unknown key \(did you mean 'optimizer'\?\)$"),
    ("report-on-another-tools-metrics", lambda c: c.report_on([{"epoch": 1, "train_loss": 0.3}]),
     rf"metrics\.jsonl: not a dali_kd run \(line 1 lacks {ROW_KEYS}\)"),
    ("disk-full-mid-run", lambda c: c.disk_fills_up("tmpfs"),
     rf"cannot write checkpoint \S+/step_000000003\.pt: {NO_SPACE}; earlier checkpoints are untouched"),
    ("file-size-limit-mid-run", lambda c: c.disk_fills_up("limit"), rf"cannot write \S+: {TOO_LARGE}"),
    ("data-changed", lambda c: c.data_changed(), r"the data changed since the checkpoint: 48 files then, "
     r"50 now \(2 added, 0 removed\); pass --allow"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "how", "says"), CLI_CASES, ids=[getattr(c, "values", c)[0] for c in CLI_CASES]
)
def test_cli_fault_is_one_line(case, how, says, tmp_path, image_tree, trained):
    from dali_kd.runs.checkpoint import CheckpointDir, load

    with contextlib.ExitStack() as stack:
        c = Case(tmp_path, image_tree, trained, stack)
        module, args = how(c)
        assert_one_line_error(
            run_module(module, args, ROOT if module.startswith("tests") else tmp_path), 2, says
        )
        if case.endswith("mid-run"):
            checkpoints = CheckpointDir(c.out / "fault", 1)
            assert [load(p)["step"] for p in checkpoints.complete()] == [1, 2], (
                "the checkpoints before it load"
            )
            assert not list(checkpoints.path.glob("*.tmp")), "a temporary file was left"


# ---- a changed file list --------------------------------------------------------------------------------------
def test_a_resume_on_a_changed_file_list_is_refused_or_warned(trained, image_tree, tmp_path, capsys):
    from dali_kd.config import load_config
    from dali_kd.data.dataset import ImageIndex
    from dali_kd.distributed import DistInfo
    from dali_kd.identity import data_identity
    from dali_kd.training.build import build_run

    files = ImageIndex.from_folder(image_tree / "train").files
    state = torch.load(trained / "checkpoints" / "step_000000004.pt", weights_only=True)
    # The checkpoint's list: two files that are gone since, and without two that came.
    state["data_files"] = data_identity(
        tuple(sorted({*files[2:], "class_9/gone_1.jpg", "class_9/gone_2.jpg"}))
    )
    changed = tmp_path / "step_000000004.pt"
    torch.save(state, changed)
    cfg = load_config(overrides=[a for a in [*tiny_args(image_tree, tmp_path), *RUN_ARGS] if "=" in a])
    with pytest.raises(UserError) as refused:
        build_run(cfg, torch.device("cpu"), DistInfo(), resume_from=changed)
    assert str(refused.value) == (
        f"--resume {changed}: the data changed since the checkpoint: 48 files then, 48 now (2 added, 2 removed); "
        "pass --allow-config-change to resume anyway, the stream position is then approximate"
    )
    capsys.readouterr()
    parts = build_run(cfg, torch.device("cpu"), DistInfo(), resume_from=changed, allow_config_change=True)
    parts.stream.close()
    assert (
        "warning: the data changed since the checkpoint: 48 files then, 48 now (2 added, 2 removed); resuming "
        "anyway (--allow-config-change): the stream position is approximate"
    ) in capsys.readouterr().out.splitlines()
    # Unchanged: resumed without a word.
    state["data_files"] = data_identity(files)
    torch.save(state, changed)
    build_run(cfg, torch.device("cpu"), DistInfo(), resume_from=changed).stream.close()
    assert "warning" not in capsys.readouterr().out


# ---- a checkpoint from an older dali_kd ------------------------------------------------------------------------
def test_a_checkpoint_from_before_new_config_keys_resumes(trained, image_tree, tmp_path):
    """Upgrading dali_kd mid-run adds config keys (this round: data.augment.mix and its three); the checkpoint's
    config lacks them. Left at their defaults they train what the old version trained, so the run resumes; set
    away from the default they are a change, refused by name."""
    from dali_kd.config import load_config
    from dali_kd.identity import config_fingerprint, config_hash
    from dali_kd.runs.checkpoint import config_changes

    state = torch.load(trained / "checkpoints" / "step_000000003.pt", weights_only=True)
    added = {f"data.augment.{key}" for key in ("mix", "mix_alpha", "cutmix_alpha", "mix_prob")}
    assert added <= set(state["config_fingerprint"]), "the checkpoint has the keys this test removes"
    old = {k: v for k, v in state["config_fingerprint"].items() if k not in added}
    state["config_fingerprint"] = old
    state["config_hash"] = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert "scaler" not in state
    state["scaler"] = None  # older versions wrote it (bf16 needs no loss scaling); it is ignored
    older = tmp_path / "step_000000003.pt"
    torch.save(state, older)

    args = [a for a in [*tiny_args(image_tree, tmp_path), *RUN_ARGS] if "=" in a]
    same = load_config(overrides=args)
    assert config_hash(same) != state["config_hash"] and set(config_fingerprint(same)) - set(old) == added
    assert config_changes(state, same) == []
    mixed = load_config(overrides=[*args, "data.augment.mix=mixup"])
    assert config_changes(state, mixed) == ["data.augment.mix"]
    assert config_changes(state, load_config(overrides=[*args, "train.optimizer.lr=0.1"])) == [
        "train.optimizer.lr"
    ]
    # A key the checkpoint has and this dali_kd does not (renamed or removed) is a change too.
    gone = {**state, "config_fingerprint": {**old, "train.retired_key": 1}}
    assert config_changes(gone, same) == ["train.retired_key"]

    # Through the CLI: the older checkpoint resumes at its step and finishes the run.
    resumed = train_as(0o022, [*tiny_args(image_tree, tmp_path), *RUN_ARGS, "--resume", str(older)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 4/4" in resumed.stdout and "step 3/4" not in resumed.stdout, resumed.stdout[-2000:]
    refused = train_as(
        0o022,
        [*tiny_args(image_tree, tmp_path), *RUN_ARGS, "--resume", str(older), "data.augment.mix=cutmix"],
        tmp_path,
    )
    assert refused.returncode == 2
    assert "the config differs from the checkpoint's in data.augment.mix;" in refused.stderr, refused.stderr


def test_checkpoints_remember_the_file_list(tiny_config, tmp_path):
    from dali_kd.distributed import DistInfo
    from dali_kd.identity import data_identity
    from dali_kd.runs.checkpoint import data_change
    from dali_kd.training.checkpointer import Checkpointer
    from dali_kd.training.run_state import RunState

    files = tuple(f"c/{i}.jpg" for i in range(48))
    saved = Checkpointer(
        tmp_path,
        tiny_config(),
        dist=DistInfo(),
        steps_per_epoch=6,
        states={"progress": RunState()},
        stream=RunState(),
        identity={"teacher": {}, "data_files": data_identity(files)},
    )
    state = saved.collect(1)
    assert state["data_files"]["count"] == 48 and len(state["data_files"]["digests"]) == 48
    assert data_change(state["data_files"], data_identity(files)) is None
    assert data_change(state["data_files"], data_identity((*files, "c/x.jpg", "c/y.jpg"))) == (
        "the data changed since the checkpoint: 48 files then, 50 now (2 added, 0 removed)"
    )
    assert data_change(state["data_files"], data_identity(files[::-1])).endswith(
        "(the same files in another order)"
    )
    assert data_change(None, data_identity(files)) is None, "a checkpoint from before file lists were stored"


# ---- file modes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_run_files_follow_the_umask(umask, trained, image_tree, tmp_path):
    run_dir = trained  # written under umask 022
    if umask != 0o022:
        result = train_as(umask, [*tiny_args(image_tree, tmp_path), *RUN_ARGS], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = tmp_path / "fault"
    modes = {
        str(p.relative_to(run_dir)): oct(p.stat().st_mode & 0o777) for p in run_dir.rglob("*") if p.is_file()
    }
    for name in (
        "config.yaml",
        "summary.json",
        "student.safetensors",
        "metrics.jsonl",
        "checkpoints/step_000000004.pt",
    ):
        assert name in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# ---- run as a script: a training run whose output disk fills up after its second checkpoint -------------------------
class _DiskFillsUp(Callback):
    def __init__(self, how: str):
        self.how, self.saved = how, 0

    def on_checkpoint(self, trainer, path) -> None:
        self.saved += 1
        if self.saved == 2:
            fill(path.parent) if self.how == "tmpfs" else limit_file_size(1024)


if __name__ == "__main__":
    from dali_kd.commands import train

    sys.exit(train.main(sys.argv[2:], callbacks=[_DiskFillsUp(sys.argv[1])]))
