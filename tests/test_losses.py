"""Loss functions against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dali_kd.config import LossConfig
from dali_kd.training.losses import cosine_loss, distillation_losses, kl_logit_loss, mse_loss


def test_cosine_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    # orthogonal → 1 - 0 = 1; parallel → 1 - 1 = 0; mean 0.5
    assert cosine_loss(s, t).item() == pytest.approx(0.5)


def test_mse_loss_by_hand():
    assert mse_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]])).item() == pytest.approx(2.0)


def test_kl_logit_loss_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher probabilities (3/4, 1/4) at T=1
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_logit_loss(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-5)
    # With T=2 the teacher is softened to (sqrt3, 1)/(sqrt3+1), and the loss is multiplied by T²=4.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected_t2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert kl_logit_loss(s, t, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-5)
    assert kl_logit_loss(t, t, temperature=3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_weighted_sum_and_parts():
    cfg = LossConfig(
        feature="cosine+mse", feature_weight=2.0, logit_weight=0.5, label_weight=1.0, temperature=1.0
    )
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    logits_s, logits_t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    parts = distillation_losses(cfg, s, t, logits_s, logits_t, labels=torch.tensor([1]))
    assert set(parts) == {"loss", "loss_feature", "loss_logit", "loss_label"}
    assert parts["loss_feature"].item() == pytest.approx(1.0 + 1.0)  # cosine 1 + mse 1
    assert parts["loss_label"].item() == pytest.approx(math.log(2.0))
    expected = 2.0 * 2.0 + 0.5 * parts["loss_logit"].item() + math.log(2.0)
    assert parts["loss"].item() == pytest.approx(expected)


def test_parts_without_their_inputs_are_left_out():
    parts = distillation_losses(LossConfig(patch_weight=1.0), torch.ones(2, 3), torch.ones(2, 3))
    assert set(parts) == {"loss", "loss_feature"}
    assert parts["loss"].item() == pytest.approx(0.0, abs=1e-6)
