"""What the demo's config files mean for images of one's own: the demo's val folder and the demo's teacher belong to
the demo's data, so a data.root of one's own takes neither (docs/data.md, "Your own images")."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dali_kd.config.data_section import DataConfig
from dali_kd.config.files import DEMO_CONFIG_DIR, SECTION_FILES
from dali_kd.config.schema import Config

# The part of each class held out for evaluation where the demo's val folder gives way to a data.root of one's own.
OWN_DATA_HOLDOUT = 0.1


@dataclass(frozen=True)
class DemoFiles:
    """The demo's own paths, as its config files write them."""

    root: str
    val_root: str
    teacher_name: str
    teacher_checkpoint: str
    model_file: Path


@functools.cache
def demo_files() -> DemoFiles:
    data = yaml.safe_load((DEMO_CONFIG_DIR / SECTION_FILES["data"]).read_text(encoding="utf-8"))
    model_file = DEMO_CONFIG_DIR / SECTION_FILES["model"]
    teacher = yaml.safe_load(model_file.read_text(encoding="utf-8"))["teacher"]
    return DemoFiles(data["root"], data["val_root"], teacher["name"], teacher["checkpoint"], model_file)


def same_path(a: str | Path | None, b: str | Path | None) -> bool:
    """The same path however written (~ or the home folder)."""
    return a is not None and b is not None and Path(a).expanduser() == Path(b).expanduser()


def is_demo_data(data: DataConfig) -> bool:
    return same_path(data.root, demo_files().root)


def own_data_teacher_path(data: DataConfig, teacher_name: str) -> str:
    """Where the demo's recipe keeps a teacher it trained on data.root: beside the demo's teacher, in a folder
    named after data.root and a hash of what the teacher trains on (the folder, the file list, the held-out
    part it must never see, the image size), so that no other data ever gets it."""
    root = Path(data.root).expanduser().resolve()
    trains_on = {
        "root": str(root),
        "file_list": str(Path(data.file_list).expanduser().resolve()) if data.file_list else None,
        "holdout_fraction": data.holdout_fraction if data.holds_out else 0.0,
        "format": data.format,
        "image_size": data.image_size,  # a teacher trained at one size sees another badly
    }
    digest = hashlib.sha256(json.dumps(trains_on, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(demo_files().teacher_checkpoint).parent / "teachers" / f"{root.name}-{digest}"
    return str(folder / f"teacher_{re.sub(r'[^A-Za-z0-9_.-]', '_', teacher_name)}.safetensors")


def own_data_changes(
    cfg: Config, explicit: Collection[str], given: Collection[str], model_file: Path
) -> dict[str, Any]:
    """The keys (dotted) to change, with their new values, when cfg trains on a data.root other than the demo's:

    - the demo's data.val_root (unless given on the command line or in a preset: explicit) becomes null, and
      data.holdout_fraction, unless given anywhere, OWN_DATA_HOLDOUT;
    - the demo's teacher checkpoint (unless explicit) becomes a teacher the demo's recipe trains on this data
      (own_data_teacher_path), or none when model.teacher.pretrained asks for pretrained weights;
    - model.teacher.num_classes from the demo's model file (the demo's classes), or beside the demo's teacher,
      becomes null where the teacher has weights (a checkpoint, pretrained): the head those weights have.
    A model.teachers list is left as it is.
    """
    demo = demo_files()
    data, teacher = cfg.data, cfg.model.primary_teacher
    if is_demo_data(data):
        return {}
    changes: dict[str, Any] = {}
    if same_path(data.val_root, demo.val_root) and "data.val_root" not in explicit:
        changes["data.val_root"] = None
        if "data.holdout_fraction" not in given:
            changes["data.holdout_fraction"] = OWN_DATA_HOLDOUT
    if cfg.model.teachers is not None:
        # A list of teachers is given whole (by the user or a preset such as two_teachers): its entries are
        # read as written, the demo's one-teacher substitution does not reach into it.
        return changes
    demo_teacher = same_path(teacher.checkpoint, demo.teacher_checkpoint)
    if demo_teacher and "model.teacher.checkpoint" not in explicit:
        own = data.model_copy(update={k.partition(".")[2]: v for k, v in changes.items()})
        changes["model.teacher.checkpoint"] = (
            None if teacher.pretrained else own_data_teacher_path(own, teacher.name)
        )
    from_demo = demo_teacher or model_file.resolve() == demo.model_file.resolve()
    # A random-init teacher (no checkpoint, not pretrained) keeps the count: no weights have a head to take.
    weights = changes.get("model.teacher.checkpoint", teacher.checkpoint) is not None or teacher.pretrained
    if (
        from_demo
        and weights
        and teacher.num_classes is not None
        and "model.teacher.num_classes" not in explicit
    ):
        changes["model.teacher.num_classes"] = None
    return changes
