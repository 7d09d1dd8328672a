"""The student's parameter groups, optimiser and lr schedule (timm's): who gets weight decay, what lr each update gets."""

from __future__ import annotations

import io
import logging
import math

import pytest
import timm
import torch
from torch import nn

from dali_kd.config import OptimizerConfig
from dali_kd.errors import UserError
from dali_kd.models import Student
from dali_kd.training.optim import build_optimizer, build_scheduler, current_lr, peak_lr
from dali_kd.training.trainer import Trainer

CPU = torch.device("cpu")


def old_warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """The schedule before timm's (dali_kd.training.optim until 2026-12): the lr of update step+1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def student(name: str, hidden_dim: int = 0) -> Student:
    return Student(
        timm.create_model(name, num_classes=4), teacher_dim=24, hidden_dim=hidden_dim, with_patches=False
    )


def decay_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter's weight decay as the optimiser will apply it (a parameter in two groups would be a bug)."""
    decay: dict[int, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in decay, "a parameter is in two groups"
            decay[id(p)] = group["weight_decay"]
    return {name: decay[id(p)] for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["test_resnet", "resnet10t"])
def test_resnet_student_gets_the_same_weight_decay_as_before(name):
    """The demo's ResNet student: decay on every matrix and kernel, none on biases and norms, as the old AdamW."""
    model = student(name, hidden_dim=16)
    optimizer = build_optimizer(model, OptimizerConfig(weight_decay=0.05), lr=1e-3)
    old_rule = {n: (0.05 if p.ndim > 1 else 0.0) for n, p in model.named_parameters()}
    assert decay_by_name(model, optimizer) == old_rule
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == (0.9, 0.999)


def test_vit_student_has_no_decay_on_pos_embed_cls_token_biases_and_norms():
    model = student("test_vit")
    decay = decay_by_name(model, build_optimizer(model, OptimizerConfig(weight_decay=0.05), lr=1e-3))
    exempt = ["backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.norm1.weight",
              "backbone.blocks.0.attn.qkv.bias", "backbone.norm.bias", "adaptors.0.pooled.bias"]  # fmt: skip
    decayed = ["backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight", "backbone.head.weight",
               "adaptors.0.pooled.weight"]  # fmt: skip
    assert {n: decay[n] for n in exempt} == dict.fromkeys(exempt, 0.0)
    assert {n: decay[n] for n in decayed} == dict.fromkeys(decayed, 0.05)


def lrs(total: int, opt: OptimizerConfig, lr: float = 1.0) -> list[float]:
    """The lr of updates 1..total, as the trainer sets it (step_update(n) before update n)."""
    model = student("test_resnet")
    optimizer = build_optimizer(model, opt, lr)
    scheduler = build_scheduler(optimizer, total, opt)
    out = []
    for n in range(1, total + 1):
        scheduler.step_update(n)
        out.append(current_lr(optimizer))
    return out


def test_schedule_is_the_old_warmup_then_the_old_cosine_one_update_earlier():
    """Warm-up: the old lr at every update. After it the old schedule held the peak for two updates (the last
    warm-up one and the first cosine one); timm's holds it for one, so every later update is one update further
    along the same cosine, and the last update gets min_lr exactly (the old one stopped one update short of it)."""
    total, warmup, min_lr = 100, 10, 0.01
    new = lrs(total, OptimizerConfig(warmup_steps=warmup, min_lr=min_lr))
    old = [old_warmup_cosine(s, total, warmup, 1.0, min_lr) for s in range(total + 1)]  # old[n-1]: update n
    assert new[:warmup] == pytest.approx(old[:warmup], rel=1e-12)  # updates 1..warmup: 0.1, 0.2, ..., 1.0
    assert new[warmup:] == pytest.approx(
        old[warmup + 1 :], rel=1e-12
    )  # update n > warmup: the old update n+1
    assert new[warmup - 1] == pytest.approx(1.0) and new[-1] == pytest.approx(min_lr)
    assert all(a > b for a, b in zip(new[warmup - 1 :], new[warmup:], strict=False))


def test_warmup_longer_than_the_run_stays_linear():
    """A run shorter than its warm-up (the tests' tiny runs) only climbs, as before."""
    new = lrs(8, OptimizerConfig(warmup_steps=500))
    assert new == pytest.approx([old_warmup_cosine(s, 8, 500, 1.0, 1e-6) for s in range(8)], rel=1e-12)


def test_a_one_update_cosine_is_quiet_and_ends_at_min_lr(caplog):
    """A smoke run (warm-up plus one update) must not print timm's "no effect" warning: its last update still gets
    min_lr, the schedule's promise."""
    with caplog.at_level(logging.WARNING):
        new = lrs(3, OptimizerConfig(warmup_steps=2, min_lr=0.01))
    assert new == pytest.approx([0.5, 1.0, 0.01])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert logging.getLogger("timm.scheduler.cosine_lr").level == logging.NOTSET, "level restored"


def test_lr_of_an_update_survives_a_checkpoint_round_trip():
    """A resumed run's scheduler (loaded from the checkpoint, weights_only) sets the lr the first run would have."""
    opt = OptimizerConfig(warmup_steps=5, min_lr=0.0)
    model = student("test_resnet")
    first = build_optimizer(model, opt, 1.0)
    scheduler = build_scheduler(first, 20, opt)
    scheduler.step_update(12)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_optimizer(model, opt, 1.0)
    resumed_scheduler = build_scheduler(resumed, 20, opt)
    resumed_scheduler.load_state_dict(torch.load(buffer, weights_only=True))
    seen = []
    for n in (13, 20):
        scheduler.step_update(n)
        resumed_scheduler.step_update(n)
        assert current_lr(resumed) == current_lr(first)
        seen.append(current_lr(resumed))
    assert seen[0] > 0 and seen[1] == 0.0  # update 20 is the last: min_lr


def test_layer_decay_scales_lower_layers_down_and_leaves_the_projector_at_full_lr():
    opt = OptimizerConfig(layer_decay=0.5, warmup_steps=0)
    model = student("test_vit")
    optimizer = build_optimizer(model, opt, lr=1.0)
    build_scheduler(optimizer, 10, opt).step_update(1)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    lr = {n: lr_of[id(p)] for n, p in model.named_parameters()}
    peak = current_lr(optimizer)
    assert lr["adaptors.0.pooled.weight"] == lr["backbone.head.weight"] == peak
    assert lr["backbone.blocks.0.attn.qkv.weight"] < lr["backbone.blocks.1.attn.qkv.weight"] < peak
    assert lr["backbone.pos_embed"] < lr["backbone.blocks.0.attn.qkv.weight"]  # the stem is the lowest layer
    assert decay_by_name(model, optimizer)["backbone.pos_embed"] == 0.0


def test_layer_decay_needs_a_model_that_says_its_layers():
    class Plain(nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

    model = Student(Plain(), teacher_dim=8, hidden_dim=0, with_patches=False)
    with pytest.raises(UserError, match=r"train.optimizer.layer_decay: .*Plain has no group_matcher"):
        build_optimizer(model, OptimizerConfig(layer_decay=0.75), lr=1.0)


def test_other_timm_optimizers_by_name_and_a_typo_named():
    model = student("test_resnet")
    assert type(build_optimizer(model, OptimizerConfig(name="sgd"), 0.1)) is torch.optim.SGD
    assert type(build_optimizer(model, OptimizerConfig(name="lamb"), 0.1)).__name__ == "Lamb"
    with pytest.raises(
        UserError, match=r"train.optimizer.name: unknown timm optimizer 'adamww' \(did you mean"
    ):
        build_optimizer(model, OptimizerConfig(name="adamww"), 0.1)


def test_lr_scales_with_the_global_batch():
    assert peak_lr(OptimizerConfig(lr=1e-3), 4096) == 1e-3  # no lr_scale_batch: as given
    assert peak_lr(OptimizerConfig(lr=1e-3, lr_scale_batch=256), 1024) == pytest.approx(4e-3)
    assert peak_lr(OptimizerConfig(lr=1e-3, lr_scale_batch=256, lr_scale_rule="sqrt"), 1024) == pytest.approx(
        2e-3
    )


def test_a_run_trains_at_the_scaled_lr_and_says_so(tiny_config, capsys):
    """batch_size 8 on one process, lr given for a batch of 4: the run's peak lr is twice the configured one."""
    cfg = tiny_config(
        "train.optimizer.lr=0.001", "train.optimizer.lr_scale_batch=4", "train.optimizer.warmup_steps=0"
    )
    trainer = Trainer(cfg, CPU, show_progress=False)
    assert (
        "lr 0.002: train.optimizer.lr 0.001 scaled (linear) from a batch of 4 to 8" in capsys.readouterr().out
    )
    assert [g["initial_lr"] for g in trainer.parts.optimizer.param_groups] == pytest.approx([0.002] * 4)


def test_a_checkpoint_from_before_timms_optimizer_is_refused_by_name(tmp_path):
    """Format-1 checkpoints hold the old optimizer groups and LambdaLR state: one clear line, not a half load."""
    from dali_kd.errors import UserError
    from dali_kd.runs.checkpoint import load

    old = tmp_path / "step_000000004.pt"
    torch.save({"format": 1, "step": 4, "optimizer": {}, "scheduler": {}}, old)
    with pytest.raises(
        UserError, match=r"written by an earlier dali_kd \(checkpoint format 1, this one reads 2"
    ):
        load(old)
