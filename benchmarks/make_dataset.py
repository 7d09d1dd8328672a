"""Make an ImageNet-like JPEG tree for benchmarks: N images in class folders, ImageNet-like sizes, quality ~90.

Content looks like a photograph to a JPEG codec — smooth gradients, hard-edged shapes and fine texture — rather
than noise (which decodes at a very different speed). Deterministic in --seed.

    python benchmarks/make_dataset.py OUT_DIR --num-images 1000 --num-classes 10 [--size 500x375 --detail 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (width, height) ratios seen most in ImageNet: landscape 4:3 dominates, then portrait, 3:2 and square.
ASPECTS = ((4, 3), (3, 4), (3, 2), (2, 3), (1, 1), (16, 9))
ASPECT_WEIGHTS = (0.5, 0.15, 0.12, 0.05, 0.1, 0.08)


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """Long side 500 px most of the time (as in ImageNet), otherwise 300-800 px."""
    w_ratio, h_ratio = ASPECTS[rng.choice(len(ASPECTS), p=ASPECT_WEIGHTS)]
    long_side = 500 if rng.random() < 0.7 else int(rng.integers(300, 801))
    if w_ratio >= h_ratio:
        return long_side, max(16, round(long_side * h_ratio / w_ratio))
    return max(16, round(long_side * w_ratio / h_ratio)), long_side


def render(width: int, height: int, rng: np.random.Generator, detail: float = 1.0) -> Image.Image:
    """detail scales the fine texture and grain (more bytes per pixel at the same quality)."""
    # Smooth background: a bilinear blend of four random corner colours.
    corners = rng.uniform(0, 255, size=(2, 2, 3)).astype(np.float32)
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    top = corners[0, 0] * (1 - xs) + corners[0, 1] * xs
    bottom = corners[1, 0] * (1 - xs) + corners[1, 1] * xs
    pixels = top * (1 - ys) + bottom * ys
    # Texture at several scales, mostly in brightness (as in photographs), with a little colour.
    for scale, amplitude in ((3, 12.0 * detail), (12, 18.0), (48, 30.0)):
        shape = (max(2, height // scale), max(2, width // scale))
        small = rng.normal(0, amplitude, size=(*shape, 1)) + rng.normal(0, amplitude / 4, size=(*shape, 3))
        noise = Image.fromarray(np.clip(small + 128, 0, 255).astype(np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        pixels = pixels + np.asarray(noise, dtype=np.float32) - 128
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    # Hard edges: a few filled shapes in random colours.
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=colour)
        else:
            points = [
                (int(rng.integers(0, width)), int(rng.integers(0, height)))
                for _ in range(int(rng.integers(3, 6)))
            ]
            draw.polygon(points, fill=colour)
    # Camera-like softness, then fine detail and sensor grain (mostly brightness): together they bring the bytes
    # per pixel at quality 90 near ImageNet's (~110 KB for ~400x350 px), which is what sets the decode cost.
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    grain = rng.normal(0, 12 * detail, size=(height, width, 1)) + rng.normal(
        0, 3 * detail, size=(height, width, 3)
    )
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def _write_one(job: tuple) -> None:
    tmp, i, num_classes, seed, quality, size, detail = job
    rng = np.random.default_rng([seed, i])
    drawn = image_size(rng)  # drawn even for a fixed size: the same stream of content either way
    image = render(*(size or drawn), rng, detail)
    image.save(tmp / f"n{i % num_classes:08d}" / f"img_{i:07d}.JPEG", quality=quality)


def make_dataset(
    out: Path,
    num_images: int,
    num_classes: int = 10,
    seed: int = 0,
    quality: int = 90,
    jobs: int | None = None,
    size: tuple[int, int] | None = None,
    detail: float = 1.0,
) -> Path:
    """Write out/<class>/<i>.JPEG with `jobs` processes (default: all cores); skip the work if a complete tree
    with these parameters is already there. Image i depends only on (seed, i), so jobs does not change a byte.

    size: every image this (width, height) instead of ImageNet's spread of sizes; detail: the fine texture and
    grain scaled (500x375 at quality 90 with detail 2 is ~110 KB a file, ImageNet's mean)."""
    out = Path(out)
    params = {
        "num_images": num_images,
        "num_classes": num_classes,
        "seed": seed,
        "quality": quality,
        "version": 1,
    }
    if size is not None or detail != 1.0:  # a default tree keeps the marker it always had
        params.update(size=list(size) if size else None, detail=detail)
    marker = out / "DATASET.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(min(num_classes, num_images)):
        (tmp / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    work = [(tmp, i, num_classes, seed, quality, size, detail) for i in range(num_images)]
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1 and num_images > 32:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_write_one, work, chunksize=16))
    else:
        for job in work:
            _write_one(job)
    (tmp / "DATASET.json").write_text(json.dumps(params))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--size", help="WxH: every image this size (default: ImageNet's spread of sizes)")
    parser.add_argument(
        "--detail", type=float, default=1.0, help="fine texture and grain scale (bytes per pixel)"
    )
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    make_dataset(
        args.out, args.num_images, args.num_classes, args.seed, args.quality, args.jobs, size, args.detail
    )
    sizes = [Image.open(p).size for p in sorted(args.out.rglob("*.JPEG"))[:200]]
    kb = np.mean([p.stat().st_size for p in sorted(args.out.rglob("*.JPEG"))[:200]]) / 1024
    size = np.mean(sizes, axis=0).round().astype(int).tolist()
    print(f"{args.out}: {args.num_images} images; mean size {size} px, mean file {kb:.0f} KB")


if __name__ == "__main__":
    main()
