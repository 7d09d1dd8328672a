"""How a metrics row's losses are said: the total, and with several teachers each teacher's."""

from __future__ import annotations

from typing import Any

# The loss parts a teacher's metrics carry as loss_<part>_<key>, beside its total loss_<key>.
TEACHER_LOSS_PARTS = ("feature", "patch", "logit")
MULTI_CROP_KINDS = ("global", "local")


def teacher_losses(row: dict[str, Any]) -> dict[str, float]:
    """With several teachers, each teacher's total loss in a metrics row, by key (loss_<key> beside its parts,
    loss_feature_<key>, ...); empty with one teacher, whose losses are named without keys."""
    found = {}
    for name, value in row.items():
        key = name.removeprefix("loss_")
        if key in MULTI_CROP_KINDS:  # one teacher's multi-crop losses: loss_global beside loss_feature_global
            continue
        if name.startswith("loss_") and any(f"loss_{part}_{key}" in row for part in TEACHER_LOSS_PARTS):
            found[key] = value
    return found


def loss_words(row: dict[str, Any], separator: str = " ") -> str:
    """The row's loss, and each teacher's after it where there are several: `loss 0.43 (dino 0.21, clip 0.22)`."""
    said = f"loss{separator}{row['loss']:.4f}"
    teachers = teacher_losses(row)
    if teachers:
        said += " (" + ", ".join(f"{key} {value:.4f}" for key, value in teachers.items()) + ")"
    return said
