"""`python -m dali_kd.fetch`: put pretrained weights into the local cache on a machine with network (a login
node), so that training on a machine without (a compute node, HF_HUB_OFFLINE=1) finds them there.

    python -m dali_kd.fetch vit_base_patch16_224.augreg2_in21k_ft_in1k hf-hub:timm/convnext_base.fb_in22k_ft_in1k
    python -m dali_kd.fetch --model_config configs/model_config_kd.yaml   # every model with pretrained: true
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dali_kd.commands.cli import CommandLineParser
from dali_kd.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m dali_kd.fetch",
        description="Download pretrained timm weights into the Hugging Face hub cache (HF_HOME) or the torch hub "
        "cache (TORCH_HOME), or say where they are cached already. Run it where there is network; train with "
        "the same HF_HOME and HF_HUB_OFFLINE=1 where there is none.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="timm names (with a tag) or hf-hub:OWNER/REPO"
    )
    parser.add_argument(
        "--model_config", type=Path, help="model YAML: fetch its teacher and student when pretrained: true"
    )
    return parser


def names_to_fetch(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(name, where the name was written, where pretrained was asked) for the command line's names, then the
    model config's pretrained models: what messages name."""
    wanted = [(name, "command line", "command line") for name in args.names]
    if args.model_config is not None:
        from dali_kd.config import load_config

        cfg = load_config(model_config=args.model_config)
        for role in ("teacher", "student"):
            spec = getattr(cfg.model, role)
            if spec.pretrained and spec.checkpoint:
                print(
                    f"model.{role}: {spec.name} loads model.{role}.checkpoint, not pretrained weights: skipped"
                )
            elif spec.pretrained:
                where = f"{args.model_config}: model.{role}"
                wanted.append((spec.name, f"{where}.name", f"{where}.pretrained"))
    if not wanted:
        raise UserError(
            "nothing to fetch: give timm names, or --model_config with a model that has pretrained: true"
        )
    return wanted


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from dali_kd.models import check_model_name
        from dali_kd.models.hub import find_pretrained, hf_hub_cache

        for name, name_key, pretrained_key in names_to_fetch(args):
            check_model_name(name, "", key=name_key)
            weights = find_pretrained(name, pretrained_key)  # HF_HUB_OFFLINE=1: only says what is cached
            how = "downloaded to" if weights.downloaded else "already cached in"
            print(f"{name}: {how} {weights.location}", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"hub cache: {hf_hub_cache()}; where there is no network, train with the same HF_HOME (or HF_HUB_CACHE) "
        "and HF_HUB_OFFLINE=1",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
