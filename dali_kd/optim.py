"""The student's optimiser and learning-rate schedule: AdamW (no decay on biases and norms), warm-up then cosine."""

from __future__ import annotations

import math

import torch

from dali_kd.config import OptimizerConfig


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from lr/warmup to lr, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr,
        betas=opt.betas,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, opt: OptimizerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, total_steps, opt.warmup_steps, opt.lr, opt.min_lr) / opt.lr,
    )
