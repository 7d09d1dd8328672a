"""`python -m dali_kd.train`: parse flags, load the three configs, prepare the demo if asked, train, report."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from dali_kd.config import CONFIG_DIR, DEMO_CONFIG_DIR, Config, load_config
from dali_kd.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other user error
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m dali_kd.train",
        description="Distil a frozen teacher into a student with DALI input pipelines. With no config flags it "
        f"runs the embedded demo ({DEMO_CONFIG_DIR}); real-use configs to edit are in {CONFIG_DIR}.",
    )
    parser.add_argument("--data_config", type=Path, help="data YAML (default: the demo's)")
    parser.add_argument("--train_config", type=Path, help="train YAML (default: the demo's)")
    parser.add_argument("--model_config", type=Path, help="model YAML (default: the demo's)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="overrides train.device")
    parser.add_argument("--max_steps_per_epoch", type=int, help="overrides train.max_steps_per_epoch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="any dotted config key, e.g. train.batch_size=64"
    )
    return parser


def make_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or f"{cfg.model.student.name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.train.output_dir).expanduser() / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"train.output_dir: cannot create run directory {run_dir}: {e.strerror}") from None
    return run_dir


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.max_steps_per_epoch is not None:
        overrides.append(f"train.max_steps_per_epoch={args.max_steps_per_epoch}")
    demo = not (args.data_config or args.train_config or args.model_config)
    cfg = load_config(args.data_config, args.train_config, args.model_config, overrides)

    # Imported after the config is valid: a typo is reported in a fraction of a second, before torch loads.
    from dali_kd.models import check_model_name
    from dali_kd.trainer import Trainer, check_supported, resolve_device

    check_supported(cfg)
    check_model_name(cfg.model.teacher.name, "teacher")
    check_model_name(cfg.model.student.name, "student")
    device = resolve_device(cfg.train.device)
    if demo:
        from dali_kd.demo import prepare_demo

        prepare_demo(cfg, device, show_progress=not args.no_progress)
    # Everything that can be wrong with the data, models or checkpoints fails here, before a run directory exists.
    trainer = Trainer(cfg, device, show_progress=not args.no_progress)
    run_dir = make_run_dir(cfg)
    print(f"run directory: {run_dir}", flush=True)
    print(
        f"{cfg.model.teacher.name} → {cfg.model.student.name} on {device}, backend {cfg.data.backend}, "
        f"batch {cfg.train.batch_size}, {cfg.train.epochs} epochs × ≤{cfg.train.max_steps_per_epoch} steps",
        flush=True,
    )
    summary = trainer.fit(run_dir)
    knn = summary["student_knn_top1"]
    teacher = summary["teacher_knn_top1"]
    if knn is not None:
        print(f"student k-NN top-1 {knn:.1f}% (teacher {teacher:.1f}%, chance {summary['chance_top1']:.1f}%)")
    print(f"{summary['steps']} steps in {summary['wall_s']:.0f} s; run directory: {run_dir}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
