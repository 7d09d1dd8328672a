"""The embedded demo's first-use preparation: generate its dataset and train a teacher that knows it (both cached)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dali_kd import console
from dali_kd.commands.demo_data import demo_dataset_ready, make_demo_dataset
from dali_kd.config import Config, load_config
from dali_kd.config.own_data import is_demo_data, own_data_teacher_path, same_path
from dali_kd.data import make_eval_batches, make_train_stream, prepare_data
from dali_kd.errors import UserError
from dali_kd.io import save_safetensors_atomic
from dali_kd.models import create_model
from dali_kd.runtime import autocast

TEACHER_STEPS = 120
TEACHER_LR = 3e-3
LOSS_EVERY_N_STEPS = 10


@dataclass(frozen=True)
class TeacherRecipe:
    """How long and how fast the demo's recipe trains one architecture on the demo data (measured per model:
    benchmarks/demo_teacher.py, RESULTS.md)."""

    steps: int = TEACHER_STEPS
    lr: float = TEACHER_LR


# The teachers the demo makes on first use, each kept at demo_teacher_path(name): the demo's own (ResNet-14-T) and
# a second of another family for the two-teacher preset (configs/presets/two_teachers.yaml).
DEMO_TEACHERS = {
    "resnet14t": TeacherRecipe(),
    "cs3darknet_focus_s": TeacherRecipe(steps=240, lr=3e-3),
}


def demo_teacher_path(name: str) -> str:
    """Where the demo keeps a teacher its recipe trained on the demo data: beside the demo's own teacher, named
    as that one is (teacher_<name>_<size>px.safetensors)."""
    demo = load_config()
    folder = Path(demo.model.primary_teacher.checkpoint or "").parent
    return str(folder / f"teacher_{name}_{demo.data.image_size}px.safetensors")


def demo_teachers(cfg: Config) -> list[int]:
    """The positions of cfg's teachers that are demo teachers (an architecture of DEMO_TEACHERS at its demo
    path), which the command line trains on the demo data on first use."""
    return [
        i
        for i, spec in enumerate(cfg.model.teacher_specs)
        if spec.name in DEMO_TEACHERS and same_path(spec.checkpoint, demo_teacher_path(spec.name))
    ]


def is_own_data_teacher(cfg: Config) -> bool:
    """Whether cfg's teacher is one the demo's recipe trains on cfg's own data (see dali_kd.config.own_data)."""
    teacher = cfg.model.primary_teacher
    return (
        not is_demo_data(cfg.data)
        and not teacher.pretrained
        and same_path(teacher.checkpoint, own_data_teacher_path(cfg.data, teacher.name))
    )


def demo_parts(cfg: Config) -> tuple[bool, bool]:
    """(prepare the demo dataset, train the demo's teacher): what of the demo this config uses, and so what the
    command line makes on first use. Only the demo config's own paths count: a user who points data.root or
    the teacher elsewhere trains on what they pointed at, and a missing folder or file is then an error. The
    one exception: with a data.root of one's own and the demo's teacher, the config names a teacher that the
    demo's recipe trains on that data (is_own_data_teacher), and that is trained on first use too."""
    demo = load_config()
    data = same_path(cfg.data.root, demo.data.root) and (
        cfg.data.val_root is None or same_path(cfg.data.val_root, demo.data.val_root)
    )
    # Trained on other data, a demo teacher would be cached at the demo's own path as a wrong teacher.
    return data, (data and bool(demo_teachers(cfg))) or is_own_data_teacher(cfg)


def prepare_demo(
    cfg: Config,
    device: torch.device,
    show_progress: bool = True,
    prepare_data: bool = True,
    train_teacher: bool = True,
) -> None:
    """Make sure the demo dataset (under data.root's parent) and the teachers' weights exist: on the demo data
    those of its demo teachers (demo_teachers), else the first teacher's (at its checkpoint); each is made only if
    missing. A teacher for data of one's own is trained on that data's training part (never on its
    held-out part), and every run that uses it says so."""
    train_root = Path(cfg.data.root).expanduser()
    data_dir = train_root.parent
    if prepare_data and not demo_dataset_ready(data_dir):
        console.info(f"demo: generating the demo dataset in {data_dir} (first use only)")
        try:
            make_demo_dataset(data_dir)
        except OSError as e:
            raise UserError(f"data.root: cannot write the demo dataset to {data_dir}: {e.strerror}") from None
    checkpoint = cfg.model.primary_teacher.checkpoint
    own = is_own_data_teacher(cfg)
    if own:
        console.info(
            f"teacher: {cfg.model.primary_teacher.name} trained on data.root by the demo's recipe (the demo's own teacher "
            f"knows only the demo's shapes), kept in {checkpoint}; for a teacher of your own set "
            "model.teacher.checkpoint, or model.teacher.name with model.teacher.pretrained=true"
        )
    if not train_teacher:
        return
    # On the demo data, its demo teachers; else the first teacher (one for data of one's own, or whatever paths
    # prepare_demo was given): a checkpoint path of the user's own is never written by the demo's recipe.
    for i in (is_demo_data(cfg.data) and demo_teachers(cfg)) or [0]:
        path = cfg.model.teacher_specs[i].checkpoint
        if path and not Path(path).expanduser().is_file():
            train_demo_teacher(cfg, Path(path).expanduser(), device, show_progress, teacher=i)


def _show_loss(bar: tqdm, step: int, steps: int, loss: torch.Tensor, show_progress: bool) -> None:
    """The teacher's loss on its bar every few steps, or (a log file, no bar) in a line at each quarter."""
    if not bar.disable and step % LOSS_EVERY_N_STEPS == 0:
        bar.set_postfix(loss=f"{loss.item():.3f}")  # a host read every few steps: the bar is for a person
    elif bar.disable and show_progress and step % max(1, steps // 4) == 0:
        console.info(f"demo: teacher step {step}/{steps}, loss {loss.item():.3f}")


def _one_view(cfg: Config) -> Config:
    """The teacher learns from plain one-view batches, whatever the distillation run will do (multi-crop, cache,
    mixing: a mixed image against its own image's label would teach it a wrong answer, and the teacher file is
    shared by every later demo run)."""
    one_view = {"use_local_crops": False, "cache_teacher_features": False}
    unmixed = cfg.data.augment.model_copy(update={"mix": "none"})
    return cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update=one_view),
            "data": cfg.data.model_copy(update={"augment": unmixed}),
        }
    )


def train_demo_teacher(
    cfg: Config,
    path: Path,
    device: torch.device,
    show_progress: bool = True,
    steps: int | None = None,
    teacher: int = 0,
    lr: float | None = None,
) -> float:
    """Supervised training of cfg's teacher at position `teacher` on the run's training split (same DALI stream),
    for its DEMO_TEACHERS recipe's steps and learning rate unless given; returns val top-1 %."""
    name = cfg.model.teacher_specs[teacher].name
    recipe = DEMO_TEACHERS.get(name, TeacherRecipe())
    steps = recipe.steps if steps is None else steps
    lr = recipe.lr if lr is None else lr
    console.info(f"demo: training the {name} teacher on {cfg.data.root} (first use only)")
    cfg = _one_view(cfg)
    torch.manual_seed(cfg.train.seed)
    # The run's own training split (checked files, its held-out part left out), and its evaluation split.
    splits = prepare_data(cfg.data)
    index = splits.train
    model = create_model(name, cfg.data.image_size, index.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    stream = make_train_stream(cfg.stream_settings(), index, device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    start = time.perf_counter()
    model.train()
    batches = iter(stream)
    out = console.current()  # a bar only on a terminal: a Slurm .out file gets a line at each quarter
    bar = tqdm(
        range(steps),
        desc="teacher",
        unit="step",
        file=out.stream,
        disable=not show_progress or out.mode != "tty",
    )
    for step in bar:
        batch = next(batches)
        with autocast(device, amp):
            loss = F.cross_entropy(model(batch.images), batch.labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        _show_loss(bar, step + 1, steps, loss, show_progress)
    stream.close()
    model.eval()
    accuracy = float("nan")
    if (val := splits.val) is not None:
        correct = 0
        with torch.no_grad():
            for batch in make_eval_batches(cfg.stream_settings(), val, device):
                correct += int((model(batch.images).argmax(1) == batch.labels).sum())
        accuracy = 100.0 * correct / val.num_samples
    save_safetensors_atomic(path, model.state_dict())
    console.info(
        f"demo: teacher val top-1 {accuracy:.1f}% after {time.perf_counter() - start:.0f} s, saved to {path}"
    )
    return accuracy
