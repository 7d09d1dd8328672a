"""The thread count a run chooses: the CPUs it may use (affinity, cgroup quota) less the cores others keep busy."""

from __future__ import annotations

import os
import re

import pytest
import torch

import dali_kd
from dali_kd.cpu_budget import CpuSampler, cgroup_cpu_limit, usable_cpus
from dali_kd.training.callbacks import Callback
from tests.conftest import tiny_overrides

CPUS = sorted(os.sched_getaffinity(0))


def write_stat(path, busy: dict[int, int], total: int) -> None:
    """A /proc/stat with a line per CPU: `busy` jiffies of user time, the rest of `total` idle (plus CPUs not ours)."""
    lines = [f"cpu  {sum(busy.values())} 0 0 {total * len(CPUS)} 0 0 0 0 0 0"]
    for cpu in [*CPUS, max(CPUS) + 1]:  # one CPU outside the affinity mask, always fully busy
        used = busy.get(cpu, 0) if cpu in CPUS else total
        lines.append(f"cpu{cpu} {used} 0 0 {total - used} 0 0 0 0 0 0")
    path.write_text("\n".join([*lines, "intr 1 2 3", "ctxt 5"]) + "\n")


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path, files, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == cores


def test_a_quota_below_the_affinity_mask_caps_the_usable_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # Docker's --cpus 1.5
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{100000 * (len(CPUS) + 4)} 100000\n")
    assert usable_cpus(tmp_path) == len(CPUS), "a quota above the mask changes nothing"


@pytest.mark.parametrize(
    ("busy_cpus", "expected"),
    [
        (0, len(CPUS)),  # quiet: every usable CPU
        (
            len(CPUS),
            1,
        ),  # others keep every CPU busy: one thread, never a team waiting for descheduled members
        (1, max(1, len(CPUS) - 1)),
    ],
)
def test_cores_that_other_processes_keep_busy_are_left_to_them(tmp_path, busy_cpus, expected):
    stat, cgroup = tmp_path / "stat", tmp_path / "cgroup"
    cgroup.mkdir()
    write_stat(stat, {}, total=1000)
    sampler = CpuSampler(stat, cgroup, min_window_s=0, own_cpu_s=lambda: 0.0)
    write_stat(stat, {cpu: 1000 for cpu in CPUS[:busy_cpus]}, total=2000)  # 1000 more jiffies per CPU
    budget = sampler.budget()
    assert budget.threads == expected
    assert budget.others_busy == pytest.approx(busy_cpus, abs=0.3)
    assert f"{len(CPUS)} CPUs usable" in budget.line()
    assert sampler.budget(fixed=3).threads == 3, "a count the user set is kept"


def test_the_run_own_cpu_time_is_not_counted_as_others(tmp_path):
    stat, cgroup = tmp_path / "stat", tmp_path / "cgroup"
    cgroup.mkdir()
    write_stat(stat, {}, total=1000)
    own = iter([0.0, 1e9])  # at the start, then "the whole window": this process itself kept every CPU busy
    sampler = CpuSampler(stat, cgroup, min_window_s=0, own_cpu_s=lambda: next(own))
    write_stat(stat, {cpu: 1000 for cpu in CPUS}, total=2000)
    assert sampler.budget().threads == len(CPUS)


def test_without_proc_stat_the_usable_cpus_decide(tmp_path):
    budget = CpuSampler(tmp_path / "absent", tmp_path, min_window_s=0).budget()
    assert (budget.threads, budget.others_busy) == (len(CPUS), 0.0)


class SeeThreads(Callback):
    def __init__(self):
        self.threads: set[int] = set()

    def on_step(self, trainer, batch) -> None:
        self.threads.add(torch.get_num_threads())


def test_a_run_trains_with_its_thread_budget_and_gives_the_threads_back(image_tree, tmp_path, capsys):
    before = torch.get_num_threads()
    seen = SeeThreads()
    overrides = [*tiny_overrides(image_tree, tmp_path), f"data.val_root={image_tree / 'val'}", "train.run_name=test",
                 "train.cpu_threads=1", "data.dali_threads=3", "train.max_steps_per_epoch=1", "train.epochs=1"]  # fmt: skip
    dali_kd.distill(dali_kd.load_config(overrides=overrides), progress="lines", callbacks=[seen])
    assert seen.threads == {1}
    assert torch.get_num_threads() == before, "the caller's thread count is put back"
    out = capsys.readouterr().out
    assert "cpu: 1 threads (train.cpu_threads)" in out
    config = (tmp_path / "runs" / "test" / "config.yaml").read_text()
    assert re.search(r"^  dali_threads: 1$", config, re.M), "DALI's threads are capped by the budget too"


@pytest.mark.parametrize(
    ("setting", "device", "compiles"),
    [("auto", "cpu", False), ("auto", "cuda", True), (True, "cpu", True), (False, "cuda", False)],
)
def test_auto_compiles_on_cuda_only_and_a_setting_given_is_kept(setting, device, compiles):
    from dali_kd.runtime import resolve_compile

    assert resolve_compile(setting, torch.device(device)) is compiles
