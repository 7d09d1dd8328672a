"""Fast guards for mistakes a slow end-to-end test would catch late or not at all: an evaluation pass that restarts
after a decode failure, a teacher hash blind to BatchNorm statistics, k-NN votes without DINO's temperature, and a
resume that hands every rank rank 0's stream position."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_kd.data.dataset import ImageIndex
from dali_kd.data.eval_quarantine import EvalQuarantine
from dali_kd.evaluation.knn import knn_accuracy
from dali_kd.identity import weights_hash
from dali_kd.runs import checkpoint as ckpt
from dali_kd.training.checkpointer import restore


# ---- evaluation: a decode failure in a later batch -------------------------------------------------------------
def test_a_decode_failure_in_a_later_batch_counts_every_usable_image_exactly_once():
    files = tuple(f"/data/class_{i % 2}/{i}.jpg" for i in range(10))
    index = ImageIndex(root=Path("/data"), files=files, labels=tuple(i % 2 for i in range(10)),
                       class_names=("class_0", "class_1"))  # fmt: skip
    spoilt = files[6]  # in the second batch of 4: the first batch was already given out
    calls = []

    def make_batches(part: ImageIndex):
        calls.append(part.files)
        for start in range(0, len(part.files), 4):
            batch = part.files[start : start + 4]
            if spoilt in batch:
                raise RuntimeError(f"[DALI] Error in thread 0: nvjpeg failed to decode {spoilt}")
            yield list(batch)

    quarantine = EvalQuarantine("val", index, "dali", max_files=5)
    seen = [path for batch in quarantine.batches(make_batches, 4) for path in batch]
    assert sorted(seen) == sorted(f for f in files if f != spoilt), "each usable image exactly once"
    assert calls[1] == files[4:6] + files[7:], "the pass goes on from the failing batch"
    assert list(quarantine.set_aside) == [6]


# ---- identity: the teacher's hash sees its buffers ---------------------------------------------------------------
def test_a_teacher_with_other_batchnorm_statistics_has_another_hash():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    other.load_state_dict(teacher.state_dict())
    assert weights_hash(other) == weights_hash(teacher)
    other[1].running_mean += 0.5  # the same parameters, other statistics: it normalises differently
    assert weights_hash(other) != weights_hash(teacher)
    other.load_state_dict(teacher.state_dict())
    other[1].num_batches_tracked += 1
    assert weights_hash(other) != weights_hash(teacher)


# ---- k-NN: the temperature decides the vote ----------------------------------------------------------------------
def unit(cos: float) -> list[float]:
    return [cos, math.sqrt(1 - cos * cos)]


def test_knn_weights_each_vote_by_exp_of_cosine_over_the_temperature():
    """One class-0 neighbour at cosine 0.9 against two class-1 neighbours at 0.5. With DINO's T = 0.07 the close
    one wins: exp(0.9/0.07) = 3.9e5 > 2·exp(0.5/0.07) = 2.5e3. Without the temperature the two win:
    exp(0.9) = 2.46 < 2·exp(0.5) = 3.30 (and plain cosines: 0.9 < 1.0)."""
    bank = torch.tensor([unit(0.9), unit(0.5), unit(0.5)])
    bank_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_accuracy(bank, bank_labels, query, torch.tensor([0]), num_classes=2, k=3)[0] == 100.0
    # A temperature of 10 flattens the weights: the two farther neighbours outvote the close one.
    assert knn_accuracy(bank, bank_labels, query, torch.tensor([1]), 2, k=3, temperature=10.0)[0] == 100.0


# ---- resume: each rank gets its own stream position and RNG state ----------------------------------------------
def seeded_state(seed: int) -> dict:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return ckpt.rng_state()


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_resumes_its_own_stream_position_and_random_state(rank):
    rngs = [seeded_state(10), seeded_state(11)]
    expected = []  # what each rank draws next from its own saved state
    for state in rngs:
        ckpt.set_rng_state(state)
        expected.append(draws())
    streams = [{"position": 128, "epoch": 2}, {"position": 256, "epoch": 2}]
    state = {"step": 9, "epoch": 2, "step_in_epoch": 1, "progress": {}, "stream": streams, "rng": rngs}
    seeded_state(99)  # whatever this process drew before the resume
    assert restore(state, {}, rank) == streams[rank]
    assert draws() == expected[rank]
