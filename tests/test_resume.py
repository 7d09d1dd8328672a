"""Never lose work: exact resume after SIGKILL, atomic checkpoints, preemption (exit 75, Slurm requeue), a stop between
the batches of an accumulated step, NaN handling, refusing an incompatible resume. Each run is a real process; faults
are injected by tests/drivers/run_with_fault.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dali_kd.distributed import first_host
from dali_kd.runs.checkpoint import CheckpointDir, load
from dali_kd.runs.preemption import slurm_job_id
from dali_kd.training.run_files import truncate_metrics
from tests.faults import fake_scontrol

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "drivers" / "run_with_fault.py"
# 3 epochs × 4 steps, a checkpoint every 3 steps (so some fall mid-epoch) and one at each epoch end.
SETTINGS = [
    "--device", "cpu", "--no-progress",
    "train.epochs=3", "train.max_steps_per_epoch=4", "train.batch_size=8", "train.save_every_n_steps=3",
    "train.keep_last_checkpoints=10", "train.log_every_n_steps=1", "train.eval_every_n_epochs=1",
    "train.optimizer.warmup_steps=2", "train.run_name=run",
    # The student's EMA is checkpointed too: a resumed run must continue the same average.
    "train.ema_decay=0.9",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_args(image_tree, tmp_path_factory):
    """A model config with a teacher checkpoint on disk, so that its identity can be checked on resume."""
    from dali_kd.config import load_config
    from dali_kd.io import save_safetensors_atomic
    from dali_kd.models import build_model

    base = tmp_path_factory.mktemp("resume-base")
    cfg = load_config(
        overrides=[
            "model.teacher.name=test_resnet",
            "model.teacher.num_classes=4",
            "model.teacher.checkpoint=null",
        ]
    )
    torch.manual_seed(1)
    save_safetensors_atomic(
        base / "teacher.safetensors", build_model(cfg.model.teacher, "teacher", 32, 4).state_dict()
    )
    return [
        "--data_config", str(ROOT / "configs" / "demo" / "data_config.yaml"),
        "--train_config", str(ROOT / "configs" / "demo" / "train_config_kd.yaml"),
        "--model_config", str(ROOT / "configs" / "demo" / "model_config_kd.yaml"),
        f"data.root={image_tree / 'train'}", f"data.val_root={image_tree / 'val'}", "data.image_size=32",
        "data.eval_resize=36", "data.dali_threads=1", "model.teacher.name=test_resnet",
        f"model.teacher.checkpoint={base / 'teacher.safetensors'}", "model.teacher.num_classes=4",
        # Stochastic depth draws from torch's RNG every step: the resume must restore it too.
        "model.student.name=test_vit", "model.student.drop_path_rate=0.2", "train.compile_student=false",
        "train.num_workers=0", *SETTINGS,
    ]  # fmt: skip


def run(args, out: Path, fault: str | None = None, step: int = 0, env: dict | None = None, rank=None):
    command = [sys.executable, "-m", "dali_kd.train"] if fault is None else [
        sys.executable, str(DRIVER), fault, str(step), *([str(rank)] if rank is not None else []), "--"
    ]  # fmt: skip
    return subprocess.run(
        [*command, *args, f"train.output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    ]


@pytest.fixture(scope="module")
def reference(base_args, tmp_path_factory):
    """The uninterrupted run every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    result = run(base_args, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


# Other setups whose stream position and RNGs must resume exactly too (each against its own uninterrupted run).
VARIANTS = {
    "torchvision": ["data.backend=torchvision", "train.num_workers=2"],
    "multi-crop": ["train.use_local_crops=true", "data.local_crop_size=16", "data.num_local_crops=2"],
    # Function matching through the command line: the mix draws follow the batch number the checkpoint restores.
    "mixed-multi-crop": [
        "train.use_local_crops=true",
        "data.local_crop_size=16",
        "data.num_local_crops=2",
        "data.augment.mix=both",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "step", "resumes_from", "variant"),
    [
        ("kill-before-step", 6, 4, None),  # mid-epoch 2: back to the epoch-1 end
        (
            "kill-before-step",
            2,
            None,
            None,
        ),  # before any checkpoint: the resume starts afresh in the same run
        ("kill-before-step", 11, 9, None),  # mid-epoch 3, from the mid-epoch step-9 checkpoint
        ("kill-during-checkpoint", 9, 8, None),  # SIGKILL while writing the step-9 checkpoint
        (
            "kill-during-eval",
            8,
            6,
            None,
        ),  # SIGKILL in the epoch-2 evaluation, before its epoch-end checkpoint
        ("kill-before-step", 11, 9, "torchvision"),
        ("kill-before-step", 7, 6, "multi-crop"),
        ("kill-before-step", 11, 9, "mixed-multi-crop"),
    ],
)
def test_sigkill_then_resume_matches_the_uninterrupted_run(
    base_args, reference, tmp_path, tmp_path_factory, fault, step, resumes_from, variant
):
    if variant is not None:
        base_args = [*base_args, *VARIANTS[variant]]
        out = tmp_path_factory.mktemp(f"reference-{variant}")
        uninterrupted = run(base_args, out)
        assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
        reference = out / "run"
    killed = run(base_args, tmp_path, fault, step)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = tmp_path / "run"
    checkpoints = CheckpointDir(run_dir, 1)
    if fault == "kill-during-checkpoint":
        leftovers = list(checkpoints.path.glob(".step_*.tmp"))
        assert leftovers, "the cut-short write leaves only a temporary file"
        latest = checkpoints.latest()
        assert latest.name == "step_000000008.pt", "the previous checkpoint is the newest complete one"
        assert load(latest)["step"] == 8
    resumed = run([*base_args, "--resume", "auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == losses(reference), "per-step losses differ from the uninterrupted run"
    mine, theirs = load_file(run_dir / "student.safetensors"), load_file(reference / "student.safetensors")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "final weights are not bit-identical"
    mine, theirs = (
        load_file(run_dir / "student_ema.safetensors"),
        load_file(reference / "student_ema.safetensors"),
    )
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "the EMA's weights are not bit-identical"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["world_size"] == 1
    if resumes_from is None:
        assert summary["resumed_from"] is None
    else:
        assert summary["resumed_from"].endswith(f"step_{resumes_from:09d}.pt")
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["student_knn_top1"] == ref_summary["student_knn_top1"]
    assert summary["agreement"] == ref_summary["agreement"] is not None
    assert summary["student_ema_knn_top1"] == ref_summary["student_ema_knn_top1"] is not None
    assert not list(checkpoints.path.glob(".step_*.tmp")), "leftovers are cleaned up by the next save"


# Gradient accumulation: 3 epochs × 4 steps of 4 batches of 2. A stop signal between a step's batches lets the step
# finish, then saves: a checkpoint holds whole steps.
ACCUM = ["train.grad_accum_steps=4", "train.batch_size=2"]


@pytest.fixture(scope="module")
def accum_reference(base_args, tmp_path_factory):
    """The uninterrupted run with 4 batches a step."""
    out = tmp_path_factory.mktemp("accum-reference")
    result = run([*base_args, *ACCUM], out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "at", "resumes_from"),
    [
        # SIGUSR1 before the 3rd batch of step 5: step 5 is finished, saved (exit 75), and resumed from.
        ("usr1-at-step", "5:2", 5),
        # SIGKILL before the 3rd batch of step 7: the step-6 checkpoint (every 3 steps) is where it resumes.
        ("kill-before-step", "7:2", 6),
    ],
)
def test_a_stop_between_the_batches_of_a_step_resumes_exactly(
    base_args, accum_reference, tmp_path, fault, at, resumes_from
):
    args = [*base_args, *ACCUM]
    stopped = run(args, tmp_path, fault, at)
    assert stopped.returncode == (75 if fault.startswith("usr1") else -9), stopped.stderr[-3000:]
    run_dir = tmp_path / "run"
    latest = CheckpointDir(run_dir, 1).latest()
    assert latest.name == f"step_{resumes_from:09d}.pt"
    saved = load(latest)
    # A checkpoint holds whole steps: the stream stands after the step's 4 batches of 2.
    assert saved["step"] == resumes_from and saved["stream"][0]["position"] == resumes_from * 4 * 2
    resumed = run([*args, "--resume", "auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == losses(accum_reference), "per-step losses differ from the uninterrupted run"
    for name in ("student.safetensors", "student_ema.safetensors"):
        mine, theirs = load_file(run_dir / name), load_file(accum_reference / name)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), f"{name} is not bit-identical"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["resumed_from"].endswith(latest.name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "job"),
    [
        ({"SLURM_JOB_ID": "4242"}, "4242"),
        ({"SLURM_JOB_ID": "99", "SLURM_ARRAY_JOB_ID": "90", "SLURM_ARRAY_TASK_ID": "7"}, "90_7"),
    ],
)
def test_sigusr1_saves_exits_75_requeues_and_resumes(base_args, reference, tmp_path, env, job):
    path, calls = fake_scontrol(tmp_path)
    slurm = {**env, "PATH": path, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    args = [a for a in base_args if a != "train.run_name=run"]  # under Slurm the run is named by the job
    stopped = run(args, tmp_path, "usr1-at-step", 6, env=slurm)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert calls.read_text().split() == ["requeue", job]
    (run_dir,) = [d for d in tmp_path.iterdir() if d.name.endswith(f"-slurm{job}")]
    assert CheckpointDir(run_dir, 1).latest().name == "step_000000006.pt"
    # The requeued job: same environment, --resume auto by default under Slurm.
    again = run(args, tmp_path, env=slurm)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'step_000000006.pt'}" in again.stdout
    assert losses(run_dir) == losses(reference)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_resume_with_another_teacher_or_config_is_refused(base_args, reference, tmp_path):
    other = tmp_path / "other_teacher.safetensors"
    weights = load_file(
        Path([a for a in base_args if a.startswith("model.teacher.checkpoint=")][0].split("=", 1)[1])
    )
    from safetensors.torch import save_file

    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, other)
    checkpoint = reference / "checkpoints" / "step_000000012.pt"
    refused = run([*base_args, "--resume", str(checkpoint), f"model.teacher.checkpoint={other}"], tmp_path)
    assert refused.returncode == 2
    assert "trained with teacher test_resnet" in refused.stderr and "--allow-config-change" in refused.stderr
    changed = run([*base_args, "--resume", str(checkpoint), "train.optimizer.lr=0.1"], tmp_path)
    assert changed.returncode == 2 and "train.optimizer.lr" in changed.stderr
    forced = run(
        [*base_args, "--resume", str(checkpoint), "train.optimizer.lr=0.1", "--allow-config-change"], tmp_path
    )
    assert forced.returncode == 0, forced.stderr[-2000:]


@pytest.mark.slow
def test_nan_loss_stops_with_the_last_good_checkpoint_or_is_skipped(base_args, tmp_path):
    stopped = run(base_args, tmp_path / "stop", "nan-at-step", 5)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert "NaN/Inf" in last and "step_000000004.pt" in last
    saved = [p.name for p in CheckpointDir(tmp_path / "stop" / "run", 1).complete()]
    assert saved == ["step_000000003.pt", "step_000000004.pt"], "nothing saved after the NaN"
    skipped = run([*base_args, "train.on_nonfinite_loss=skip"], tmp_path / "skip", "nan-at-step", 5)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    summary = json.loads((tmp_path / "skip" / "run" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 12
    weights = load_file(tmp_path / "skip" / "run" / "student.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_checkpoint_dir_keeps_last_k_and_ignores_partial_files(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        checkpoints.save({"format": 1, "step": step}, step)
    assert [p.name for p in checkpoints.complete()] == ["step_000000002.pt", "step_000000003.pt"]
    (checkpoints.path / ".step_000000004.pt.abc.tmp").write_bytes(b"half")
    assert checkpoints.latest().name == "step_000000003.pt"


def test_truncate_metrics_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("gpu[07-09,12],cpu3", "gpu07"),
        ("node5", "node5"),
        ("a100-[1-4]", "a100-1"),
        ("n[003,010-011]", "n003"),
    ],
)
def test_master_address_from_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_job_id_is_validated(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "123; rm -rf /")
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert slurm_job_id() == "123"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "120_3"


@pytest.mark.parametrize(
    "template", sorted((ROOT / "configs" / "slurm").glob("*.sbatch")), ids=lambda p: p.name
)
def test_sbatch_templates_are_valid_and_set_up_resume(template):
    text = template.read_text()
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text
    assert "srun" in text and "python -m dali_kd.train" in text
    for config in (
        "configs/data_config.yaml",
        "configs/train_config_kd.yaml",
        "configs/model_config_kd.yaml",
    ):
        assert config in text and (ROOT / config).is_file()


def test_srun_environment_gives_rank_world_and_local_gpu(monkeypatch):
    from dali_kd.distributed import detect

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    info = detect()
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (9, 16, 1, "slurm")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert detect().launcher == "torchrun" and detect().rank == 3
