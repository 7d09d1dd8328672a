"""The student's optimiser and learning-rate schedule, both from timm: parameter groups, optimiser, warm-up + cosine.

Parameter groups follow timm's rules: no weight decay on biases, norms and what the backbone's `no_weight_decay()`
names (a ViT's pos_embed and cls_token); with `layer_decay`, timm's layer-wise lr scales from its `group_matcher()`.
The projectors sit on top of the backbone, like its head: same decay rules, full lr.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import math
from typing import Any

import torch
from timm.optim import (
    create_optimizer_v2,
    get_optimizer_info,
    list_optimizers,
    param_groups_layer_decay,
    param_groups_weight_decay,
)
from timm.scheduler import CosineLRScheduler
from torch import nn

from dali_kd.config import OptimizerConfig
from dali_kd.errors import UserError

LOOKAHEAD = "lookahead_"  # timm's prefix that wraps any optimiser in Lookahead
# What train.optimizer.fused=auto fuses on CUDA: torch's Adam and AdamW (the others' fused kernels are narrower:
# Adagrad's runs on the CPU only).
FUSED_BY_DEFAULT = frozenset({"adam", "adamw"})


def peak_lr(opt: OptimizerConfig, global_batch: int) -> float:
    """opt.lr, or, with lr_scale_batch, opt.lr scaled from that batch to this run's global batch (images per
    update over all processes): linearly (DINO's lr × batch/256) or by the square root (timm's train.py)."""
    if opt.lr_scale_batch is None:
        return opt.lr
    ratio = global_batch / opt.lr_scale_batch
    return opt.lr * (ratio if opt.lr_scale_rule == "linear" else math.sqrt(ratio))


def check_optimizer_name(name: str) -> None:
    known = list_optimizers()
    if name.lower().removeprefix(LOOKAHEAD) not in known:
        close = difflib.get_close_matches(name.lower(), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"train.optimizer.name: unknown timm optimizer '{name}'{hint}")


def param_groups(student: nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """The student's parameter groups: its backbone's by timm's rules, then the projectors' (full lr)."""
    backbone = student.backbone
    assert isinstance(backbone, nn.Module)
    # Names the timm model itself exempts from decay (pos_embed, cls_token, ...): decaying them toward 0 hurts.
    no_decay = set(getattr(backbone, "no_weight_decay", set)())
    if layer_decay is None:
        groups = param_groups_weight_decay(backbone, weight_decay, no_weight_decay_list=no_decay)
    else:
        if not hasattr(backbone, "group_matcher"):
            raise UserError(
                f"train.optimizer.layer_decay: the student {type(backbone).__name__} has no group_matcher() that "
                "says which layer each parameter is in; set layer_decay: null"
            )
        groups = param_groups_layer_decay(
            backbone, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay
        )
    heads = nn.ModuleDict({name: m for name, m in student.named_children() if m is not backbone})
    groups += param_groups_weight_decay(heads, weight_decay)
    grouped = sum(len(g["params"]) for g in groups)
    assert grouped == sum(p.requires_grad for p in student.parameters()), "a student parameter is in no group"
    return groups


def use_fused(opt: OptimizerConfig, device: torch.device) -> bool:
    """train.optimizer.fused, resolved: auto fuses adam and adamw on CUDA; true needs a torch optimiser that has a
    fused implementation (torch's fused=True; timm hands the keyword through)."""
    name = opt.name.lower().removeprefix(LOOKAHEAD)
    if opt.fused == "auto":
        return device.type == "cuda" and name in FUSED_BY_DEFAULT
    opt_class = get_optimizer_info(name).opt_class
    # apex and bitsandbytes optimisers are named by import path (timm imports them when built); none is torch's.
    if opt.fused and (isinstance(opt_class, str) or "fused" not in inspect.signature(opt_class).parameters):
        raise UserError(
            f"train.optimizer.fused=true: the optimizer '{opt.name}' has no fused implementation (torch has one "
            "for adam, adamw, sgd, momentum and adagrad); set train.optimizer.fused to auto or false"
        )
    return opt.fused


def build_optimizer(
    student: nn.Module, opt: OptimizerConfig, lr: float, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """timm's optimiser `opt.name` over the student's parameter groups, at peak learning rate lr; fused kernels
    where use_fused says (device: where the student's parameters live; None: the CPU)."""
    check_optimizer_name(opt.name)
    fused = use_fused(opt, device or torch.device("cpu"))
    groups = param_groups(student, opt.weight_decay, opt.layer_decay)
    # betas go to the optimisers that have them (timm drops them for the others, e.g. sgd); fused=... only where
    # asked, for timm's own optimisers have no such keyword.
    extra: dict[str, Any] = {"fused": True} if fused else {}
    optimizer = create_optimizer_v2(
        groups, opt.name, lr=lr, weight_decay=opt.weight_decay, betas=opt.betas, **extra
    )
    inner = getattr(
        optimizer, "_base_optimizer", optimizer
    )  # timm's Lookahead loads into the optimiser it wraps
    if "fused" in inner.defaults:
        inner.register_load_state_dict_post_hook(functools.partial(_keep_fused, fused=bool(fused)))
    return optimizer


def _keep_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """A loaded state dict brings the saving run's choice of kernels (its param groups' `fused`); this run's config
    decides instead. A fused optimiser keeps each parameter's step count on the parameter's device (no host read
    per step); the unfused one on the host."""
    for group in optimizer.param_groups:
        group["fused"] = fused or None
        if fused:
            group["foreach"] = None
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor):
                device = param.device if fused else torch.device("cpu")
                optimizer.state[param]["step"] = step.to(device=device, dtype=torch.float32)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, opt: OptimizerConfig
) -> CosineLRScheduler:
    """timm's cosine schedule, per update: call `step_update(n)` before update n (1-based); its lr is a function of
    n alone, so a resumed run sets the same lr. The peak is the optimiser's lr (peak_lr), reached at update
    warmup_steps (linear from 0: update n < warmup_steps gets lr·n/warmup_steps), then cosine to min_lr, which
    the last update (total_steps) gets; layer-decay groups get their `lr_scale` share of it.
    """
    # A run whose budget is at most the warm-up plus one update (a smoke run, a 1-step demo) has a one-update cosine;
    # timm then warns that the schedule "will have no effect", which only alarms: that update gets min_lr, as above.
    timm_log = logging.getLogger(CosineLRScheduler.__module__)
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(
            optimizer,
            t_initial=max(1, total_steps - opt.warmup_steps),
            lr_min=opt.min_lr,
            warmup_t=opt.warmup_steps,
            warmup_lr_init=0.0,
            warmup_prefix=True,  # the cosine starts after the warm-up, as the run's total minus warm-up
            t_in_epochs=False,
        )
    finally:
        timm_log.setLevel(level)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's lr now: the largest group's (layer decay scales the lower layers down, never up)."""
    return max(group["lr"] for group in optimizer.param_groups)
