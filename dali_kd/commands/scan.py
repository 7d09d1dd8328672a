"""`python -m dali_kd.scan ROOT`: check every image file of an ImageFolder tree before DALI meets it.

A DALI pipeline that meets an undecodable file dies for good, so a training run needs the bad files set aside first.
The default check reads each file's header and structure (format from content, not extension); `--full` also
decodes every file with DALI's own CPU decoder. Results are cached by path, size and mtime.

Writes OUT/good.txt (one <class>/<file> per line: the list training uses) and OUT/quarantine.jsonl
(one {"path", "reason"} per rejected file).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dali_kd.commands.cli import CommandLineParser, int_in_range
from dali_kd.data.decoder_log import admits_images_over_decoder_limit, quiet_too_large_image_lines
from dali_kd.data.file_checks import DEFAULT_MAX_PIXELS, scan, scan_workers
from dali_kd.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = CommandLineParser(prog="python -m dali_kd.scan", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="an ImageFolder tree: ROOT/<class>/<image>")
    parser.add_argument(
        "--out", type=Path, help="where good.txt and quarantine.jsonl go (default: the user cache)"
    )
    parser.add_argument("--full", action="store_true", help="also decode every file with DALI's CPU decoder")
    parser.add_argument(
        "--max-pixels", type=int_in_range(1), default=DEFAULT_MAX_PIXELS, help="reject larger images"
    )
    parser.add_argument(
        "--workers",
        type=int_in_range(1),
        help="parallel checks (default and most: the usable CPUs for --full, four per CPU for headers)",
    )
    args = parser.parse_args(argv)
    workers = scan_workers(args.workers, args.full)
    if args.workers is not None and workers < args.workers:
        print(
            f"scan: --workers {args.workers} is more than this machine can use; running {workers}",
            file=sys.stderr,
        )
    if args.full and admits_images_over_decoder_limit(args.max_pixels):
        quiet_too_large_image_lines()  # DALI decodes such images, but prints a red error line for each
    try:
        result = scan(args.root, args.out, full=args.full, max_pixels=args.max_pixels, workers=workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"good list: {result.good_list}\nquarantine: {result.quarantine_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
