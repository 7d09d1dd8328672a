"""The embedded demo's dataset: synthetic shape and texture classes, written as an ImageFolder tree of JPEGs.

Two class sets: `shapes` (the demo: ten classes that differ in kind) and `fine` (a harder set for benchmarks: five
pairs that differ in one detail each, such as a circle and an ellipse, drawn among random line clutter)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dali_kd.errors import UserError

# Each class is carried by shape or texture, never by colour: the training augmentations jitter hue, saturation,
# brightness and contrast, crop down to a quarter of the area and mirror. No class is the mirror image of another.
CLASS_NAMES = (
    "circle",
    "ring",
    "square",
    "triangle",
    "cross",
    "stripes_h",
    "stripes_d",
    "checkerboard",
    "dots",
    "grid",
)

# The harder set: each class has a near twin (aspect, corners, a second ring, a 45-degree turn), and the random
# resized crop's aspect jitter can make a circle look like an ellipse, so the labels need the finer cues.
FINE_CLASS_NAMES = (
    "circle",
    "ellipse",
    "square",
    "rectangle",
    "triangle",
    "hexagon",
    "ring",
    "double_ring",
    "plus",
    "x_cross",
)
CLASS_SETS = {"shapes": CLASS_NAMES, "fine": FINE_CLASS_NAMES}

MARKER_NAME = "COMPLETE"
_MARKER_TMP = f".{MARKER_NAME}.tmp"
SPLITS = ("train", "val")
JPEG_QUALITY = 90
# Part of the marker: bump it when the drawing changes, so old datasets on disk are regenerated.
FORMAT_VERSION = 1

_SPLIT_CODES = {"train": 0, "val": 1}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _params(
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    image_size: int,
    seed: int,
    classes: str = "shapes",
) -> dict:
    params = {
        "format_version": FORMAT_VERSION,
        "num_classes": int(num_classes),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "image_size": int(image_size),
        "seed": int(seed),
    }
    # Named only when not the demo's, so demo datasets already on disk keep matching their marker.
    return params if classes == "shapes" else {**params, "classes": classes}


def _class_names(params: dict) -> tuple[str, ...]:
    return CLASS_SETS[params.get("classes", "shapes")]


def _validate(params: dict) -> None:
    classes = params.get("classes", "shapes")
    if classes not in CLASS_SETS:
        raise ValueError(f"demo data: classes must be one of {', '.join(CLASS_SETS)}, got {classes!r}")
    if not 2 <= params["num_classes"] <= len(CLASS_SETS[classes]):
        raise ValueError(
            f"demo data: num_classes must be in [2, {len(CLASS_SETS[classes])}], got {params['num_classes']}"
        )
    for key in ("train_per_class", "val_per_class"):
        if params[key] < 1:
            raise ValueError(f"demo data: {key} must be >= 1, got {params[key]}")
    if params["image_size"] < 16:
        raise ValueError(f"demo data: image_size must be >= 16, got {params['image_size']}")
    if params["seed"] < 0:
        raise ValueError(f"demo data: seed must be >= 0, got {params['seed']}")


def _colour_pair(rng: np.random.Generator, min_gap: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    # A luminance gap keeps the shape visible in grey and after jitter; the hues themselves carry no label.
    while True:
        fg, bg = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
        if abs(float(fg @ _LUMA) - float(bg @ _LUMA)) >= min_gap:
            return fg, bg


def _soft(inside: np.ndarray) -> np.ndarray:
    """Coverage from a signed distance in pixels (positive inside): a one-pixel anti-aliased edge."""
    return np.clip(inside + 0.5, 0.0, 1.0)


def _periodic(coord: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Signed distance-like wave: positive on the bands, slope one pixel per pixel at the edges."""
    return period / (2 * math.pi) * np.sin(2 * math.pi * coord / period + phase)


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, inradius: float) -> np.ndarray:
    """Signed distance-like field of a regular polygon (positive inside), centred at u = v = 0."""
    edges = [inradius - (u * math.cos(a) + v * math.sin(a)) for a in np.arange(sides) * 2 * math.pi / sides]
    return np.minimum.reduce(edges)


def _ring(distance: np.ndarray, radius: float, half_width: float) -> np.ndarray:
    return half_width - np.abs(distance - radius)


def _cross(u: np.ndarray, v: np.ndarray, arm: float, half_width: float) -> np.ndarray:
    bar_h = np.minimum(half_width - np.abs(v), arm - np.abs(u))
    bar_v = np.minimum(half_width - np.abs(u), arm - np.abs(v))
    return np.maximum(bar_h, bar_v)


class _Canvas:
    """One image's pixel grid and the random placement every class draws first: the centre and two turns."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.s = float(size)
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        # Shapes sit near the middle so a crop of a quarter of the image still shows a good part of them.
        self.cy, self.cx = self.s / 2 + rng.uniform(-0.12, 0.12, size=2) * self.s
        # Textures may turn freely only where a turn cannot make them another class (stripes_h must stay level).
        self.small_turn = math.radians(rng.uniform(-10.0, 10.0))
        self.any_turn = rng.uniform(0.0, 2 * math.pi)

    def rotated(self, angle: float) -> tuple[np.ndarray, np.ndarray]:
        c, si = math.cos(angle), math.sin(angle)
        dx, dy = self.xx - self.cx, self.yy - self.cy
        return c * dx + si * dy, -si * dx + c * dy

    def distance(self) -> np.ndarray:
        """Each pixel's distance from the centre."""
        return np.hypot(self.xx - self.cx, self.yy - self.cy)


TEXTURES = ("stripes_h", "stripes_d", "checkerboard", "dots", "grid")


def _coverage(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """The foreground coverage in [0, 1], float32 [size, size], of one random instance of a class."""
    canvas = _Canvas(size, rng)
    if kind in TEXTURES:
        return _texture_coverage(kind, canvas, rng)
    return _shape_coverage(kind, canvas, rng)


def _shape_coverage(kind: str, canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    s, rotated = canvas.s, canvas.rotated
    if kind == "circle":
        radius = rng.uniform(0.22, 0.38) * s
        return _soft(radius - canvas.distance())
    if kind == "ring":
        radius = rng.uniform(0.24, 0.38) * s
        half_width = rng.uniform(0.035, 0.06) * s
        return _soft(_ring(canvas.distance(), radius, half_width))
    if kind == "square":
        u, v = rotated(canvas.any_turn)
        half_side = rng.uniform(0.18, 0.3) * s
        return _soft(half_side - np.maximum(np.abs(u), np.abs(v)))
    if kind == "triangle":
        u, v = rotated(canvas.any_turn)
        return _soft(_polygon(u, v, 3, rng.uniform(0.13, 0.2) * s))
    if kind in ("cross", "plus"):
        # Kept near upright: at 45 degrees a plus would become an x (the fine set's x_cross).
        u, v = rotated(math.radians(rng.uniform(-15.0, 15.0)))
        return _soft(_cross(u, v, rng.uniform(0.26, 0.4) * s, rng.uniform(0.06, 0.1) * s))
    # The fine set's twins: the same drawing as their partner class but for one detail.
    if kind == "x_cross":
        u, v = rotated(math.radians(45.0 + rng.uniform(-15.0, 15.0)))
        return _soft(_cross(u, v, rng.uniform(0.26, 0.4) * s, rng.uniform(0.06, 0.1) * s))
    if kind == "ellipse":
        u, v = rotated(canvas.any_turn)
        radius, aspect = rng.uniform(0.22, 0.38) * s, rng.uniform(0.5, 0.65)
        # Distance along the minor axis's scale: a close enough stand-in for the true distance at these aspects.
        return _soft(radius * aspect * (1.0 - np.hypot(u / radius, v / (radius * aspect))))
    if kind == "rectangle":
        u, v = rotated(canvas.any_turn)
        half_long = rng.uniform(0.2, 0.32) * s
        half_short = half_long * rng.uniform(0.45, 0.6)
        return _soft(np.minimum(half_long - np.abs(u), half_short - np.abs(v)))
    if kind == "hexagon":
        u, v = rotated(canvas.any_turn)
        return _soft(_polygon(u, v, 6, rng.uniform(0.18, 0.3) * s))
    if kind == "double_ring":
        distance = canvas.distance()
        outer = rng.uniform(0.3, 0.4) * s
        half_width = rng.uniform(0.025, 0.04) * s
        inner = outer * rng.uniform(0.5, 0.65)
        return _soft(np.maximum(_ring(distance, outer, half_width), _ring(distance, inner, half_width)))
    raise AssertionError(f"unknown demo class {kind!r}")


def _texture_coverage(kind: str, canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    s, rotated, small_turn = canvas.s, canvas.rotated, canvas.small_turn
    if kind == "stripes_h":
        _, v = rotated(small_turn)
        return _soft(_periodic(v, rng.uniform(0.12, 0.25) * s, rng.uniform(0, 2 * math.pi)))
    if kind == "stripes_d":
        # Both diagonals belong to this class, so a mirrored sample is still a sample of it.
        diagonal = math.radians(rng.choice([45.0, -45.0]))
        _, v = rotated(diagonal + small_turn)
        return _soft(_periodic(v, rng.uniform(0.12, 0.25) * s, rng.uniform(0, 2 * math.pi)))
    if kind == "checkerboard":
        u, v = rotated(small_turn)
        cell = rng.uniform(0.12, 0.22) * s
        wave_u = np.sin(math.pi * u / cell + rng.uniform(0, 2 * math.pi))
        wave_v = np.sin(math.pi * v / cell + rng.uniform(0, 2 * math.pi))
        return np.clip(0.5 + cell / 2 * wave_u * wave_v, 0.0, 1.0)
    if kind == "dots":
        u, v = rotated(canvas.any_turn)
        period = rng.uniform(0.16, 0.26) * s
        radius = rng.uniform(0.2, 0.3) * period
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        return _soft(radius - np.hypot(du, dv))
    if kind == "grid":
        u, v = rotated(small_turn)
        period = rng.uniform(0.16, 0.26) * s
        half_width = max(0.75, rng.uniform(0.05, 0.08) * period)
        line_u = half_width - np.abs(np.mod(u, period) - period / 2)
        line_v = half_width - np.abs(np.mod(v, period) - period / 2)
        return _soft(np.maximum(line_u, line_v))
    raise AssertionError(f"unknown demo class {kind!r}")


def _clutter(size: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage of 3 to 6 thin straight segments anywhere in the image: edges that belong to no class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    coverage = np.zeros((size, size), dtype=np.float32)
    for _ in range(int(rng.integers(3, 7))):
        start = rng.uniform(0, size, size=2)
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.45) * size
        direction = np.array([math.cos(angle), math.sin(angle)])
        # Distance to the segment: project onto it, clamp to its ends.
        t = np.clip((xx - start[0]) * direction[0] + (yy - start[1]) * direction[1], 0.0, length)
        distance = np.hypot(xx - start[0] - t * direction[0], yy - start[1] - t * direction[1])
        coverage = np.maximum(coverage, _soft(rng.uniform(0.6, 1.2) - distance))
    return coverage


def render_demo_image(kind: str, size: int, rng: np.random.Generator, clutter: bool = False) -> np.ndarray:
    """One random image of class `kind`: uint8 [size, size, 3]; `clutter` (the fine set) draws random segments
    over it in a third colour and narrows the luminance gap between shape and background."""
    fg, bg = _colour_pair(rng, min_gap=0.2 if clutter else 0.3)
    alpha = _coverage(kind, size, rng)[..., None]
    # A smooth lighting gradient and sensor-like noise keep the task from being solved by exact pixel values.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    gradient = rng.uniform(0.0, 0.3) * (math.cos(angle) * xx + math.sin(angle) * yy)
    image = bg * (1 - alpha) + fg * alpha + gradient[..., None]
    if clutter:
        lines = _clutter(size, rng)[..., None]
        image = image * (1 - lines) + rng.uniform(0.0, 1.0, size=3).astype(np.float32) * lines
    image += rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _write_split(folder: Path, split: str, count: int, params: dict) -> None:
    clutter = params.get("classes", "shapes") != "shapes"
    for label, kind in enumerate(_class_names(params)[: params["num_classes"]]):
        class_dir = folder / split / kind
        class_dir.mkdir(parents=True)
        for i in range(count):
            # One generator per image: an image does not change when the counts of other classes or splits do.
            rng = np.random.default_rng([params["seed"], _SPLIT_CODES[split], label, i])
            pixels = render_demo_image(kind, params["image_size"], rng, clutter)
            Image.fromarray(pixels).save(class_dir / f"{i:05d}.jpg", quality=JPEG_QUALITY)


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def demo_dataset_ready(
    root: str | os.PathLike,
    num_classes: int = 10,
    train_per_class: int = 120,
    val_per_class: int = 40,
    image_size: int = 96,
    seed: int = 0,
    classes: str = "shapes",
) -> bool:
    """True when root holds a complete demo dataset made with exactly these parameters."""
    return _ready(
        Path(root).expanduser(),
        _params(num_classes, train_per_class, val_per_class, image_size, seed, classes),
    )


def _ready(root: Path, params: dict) -> bool:
    return _read_marker(root) == params and all((root / split).is_dir() for split in SPLITS)


def _check_replaceable(root: Path) -> None:
    # Only a folder that looks like ours (or is empty) is ever removed, so a mistyped root cannot wipe user data.
    if not root.exists():
        return
    if not root.is_dir():
        raise UserError(f"demo data folder {root} exists and is not a folder")
    unexpected = sorted(p.name for p in root.iterdir() if p.name not in (*SPLITS, MARKER_NAME, _MARKER_TMP))
    if unexpected:
        raise UserError(
            f"demo data folder {root} holds files that are not demo data ({', '.join(unexpected[:5])}); "
            "choose an empty or new folder"
        )


def _discard(root: Path) -> None:
    if not root.exists():
        return
    # Renamed first so that an interruption leaves either the old tree or nothing at root, never half of it.
    trash = root.with_name(f".{root.name}.old-{os.getpid()}")
    os.replace(root, trash)
    shutil.rmtree(trash)


def make_demo_dataset(
    root: str | os.PathLike,
    num_classes: int = 10,
    train_per_class: int = 120,
    val_per_class: int = 40,
    image_size: int = 96,
    seed: int = 0,
    classes: str = "shapes",
) -> Path:
    """Write root/{train,val}/<class>/<i>.jpg and then root/COMPLETE; a no-op when that dataset is already there.

    The tree is built in a hidden sibling folder and renamed into place, and the marker is written last, so an
    interrupted run leaves no marker and the next call regenerates.
    """
    root = Path(root).expanduser()
    params = _params(num_classes, train_per_class, val_per_class, image_size, seed, classes)
    _validate(params)
    if _ready(root, params):
        return root
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir()
        _write_split(staging, "train", params["train_per_class"], params)
        _write_split(staging, "val", params["val_per_class"], params)
        _discard(root)
        os.replace(staging, root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    marker_tmp = root / _MARKER_TMP
    with open(marker_tmp, "w") as f:
        json.dump(params, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker_tmp, root / MARKER_NAME)
    return root
