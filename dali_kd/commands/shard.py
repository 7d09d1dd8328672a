"""`python -m dali_kd.shard SRC OUT`: an ImageFolder tree (or a file list) written as tar shards DALI reads.

Millions of small files cost a metadata lookup each on a cluster's shared filesystem; a few hundred 1 GB tars do not.
The scan runs first (broken files never enter a shard; they are listed in OUT/scan/train/quarantine.jsonl), and a
killed run keeps the shards it finished: rerun the same command to go on. The writing: dali_kd/data/shard_writer.py;
the layout: dali_kd/data/shards.py.

`python -m dali_kd.shard --index-only DIR` writes the DALI index of every tar in DIR (shards made elsewhere).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dali_kd.commands.cli import CommandLineParser, int_in_range
from dali_kd.data import shards as fmt
from dali_kd.data.decoder_log import admits_images_over_decoder_limit, quiet_too_large_image_lines
from dali_kd.data.file_checks import DEFAULT_MAX_PIXELS
from dali_kd.data.shard_writer import ShardOptions, ShardResult, make_shards, write_indexes
from dali_kd.errors import UserError

DEFAULT_SHARD_SIZE = "1GB"
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MiB' -> 2**29: a size needs its unit (B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", text)
    unit = UNITS.get(match.group(2).lower()) if match else None
    if match is None or not unit:
        raise UserError(f"--shard-size {text!r}: expected a size with its unit, such as 512MB, 1GB or 2GiB")
    size = int(float(match.group(1)) * unit)
    if size < 1:
        raise UserError(f"--shard-size {text!r}: must be at least 1 byte")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m dali_kd.shard", description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", type=Path, help="an ImageFolder tree: SRC/<class>/<image>")
    parser.add_argument(
        "out", nargs="?", type=Path, help="where the shards, their indexes and manifest.json go"
    )
    parser.add_argument(
        "--shard-size", default=DEFAULT_SHARD_SIZE, help="about this much per shard (default 1GB)"
    )
    parser.add_argument(
        "--seed",
        type=int_in_range(0, 2**32 - 1),
        default=0,
        help="the shuffle that spreads samples over shards (0 to 2**32-1, as train.seed)",
    )
    parser.add_argument(
        "--no-shuffle", action="store_true", help="shards in sample-id order (class by class)"
    )
    parser.add_argument("--scan", choices=("header", "full", "off"), default="header", help="as data.scan")
    parser.add_argument(
        "--max-image-pixels",
        type=int_in_range(1),
        default=DEFAULT_MAX_PIXELS,
        help="larger images are set aside",
    )
    parser.add_argument(
        "--file-list", help="shard only these files (one <class>/<image> per line), as data.file_list"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards OUT holds from other settings"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-shard lines")
    parser.add_argument(
        "--index-only", type=Path, metavar="DIR", help="only write the index of every tar in DIR"
    )
    return parser


def summary_line(result: ShardResult) -> str:
    """What the shards hold and where their manifest is, said once they are all written."""
    m = result.manifest
    return (
        f"{m['num_samples']} samples of {len(m['class_names'])} classes in {len(m['shards'])} shards "
        f"({sum(r['bytes'] for r in m['shards']) / 1e6:.1f} MB; {len(result.written)} written, {len(result.kept)} "
        f"kept from an earlier run); {result.quarantined} files set aside (scan/train/quarantine.jsonl)\n"
        f"manifest: {result.out / fmt.MANIFEST_NAME}"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.index_only:
            if args.src or args.out:
                raise UserError("--index-only DIR takes no SRC or OUT")
            for path in write_indexes(args.index_only):
                print(f"wrote {path}")
            return 0
        if not args.src or not args.out:
            raise UserError("expected SRC and OUT (python -m dali_kd.shard SRC OUT), or --index-only DIR")
        if args.scan == "full" and admits_images_over_decoder_limit(args.max_image_pixels):
            quiet_too_large_image_lines()  # DALI decodes such images, but prints a red error line for each
        options = ShardOptions(
            shard_size=parse_size(args.shard_size), seed=args.seed, shuffle=not args.no_shuffle, scan=args.scan,
            max_pixels=args.max_image_pixels, file_list=args.file_list,
        )  # fmt: skip
        result = make_shards(
            args.src, args.out, options, overwrite=args.overwrite, show_progress=not args.no_progress
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: the finished shards in {args.out} are kept; rerun the same command to go on",
            file=sys.stderr,
        )
        return 130
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
