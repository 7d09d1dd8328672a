"""The torchvision backend: the original trainer's PIL + torchvision CPU path, yielding the same Batch as DALI."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from itertools import count

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode

from dali_kd.data.batch import Batch, ViewRecord
from dali_kd.data.dataset import ImageIndex
from dali_kd.errors import TrainingStopped
from pipelines.params import IDENTITY_JITTER, AugmentParams, EvalParams, MultiCropParams

# torchvision's RandomResizedCrop draws this many windows before it falls back to a centre crop.
CROP_ATTEMPTS = 10

# A stream key is (position in this shard's stream, sample id); the view is a function of the position.
StreamKey = tuple[int, int]


def shard_sample_ids(num_samples: int, shard_id: int, num_shards: int) -> np.ndarray:
    """Shard r of n owns sample ids [r*N//n, (r+1)*N//n): DALI's reader splits a file list the same way."""
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(
            f"shard_id must be in [0, num_shards), got shard_id={shard_id}, num_shards={num_shards}"
        )
    begin, end = shard_id * num_samples // num_shards, (shard_id + 1) * num_samples // num_shards
    if end <= begin:
        raise ValueError(
            f"shard {shard_id} of {num_shards} is empty: the dataset has only {num_samples} samples"
        )
    return np.arange(begin, end, dtype=np.int64)


def pass_order(shard_ids: np.ndarray, seed: int, pass_index: int) -> np.ndarray:
    """The order of one pass over a shard: a permutation seeded by (seed, pass), different every pass."""
    return np.random.default_rng([seed, pass_index]).permutation(shard_ids)


def view_rng(seed: int, shard_id: int, position: int) -> np.random.Generator:
    """The generator of one sample's view; keyed by stream position so worker count and timing cannot change it."""
    return np.random.default_rng([seed, shard_id, position])


def stream_keys(shard_ids: np.ndarray, seed: int, start: int = 0) -> Iterator[StreamKey]:
    """The endless (position, sample id) stream from position `start`: pass 0's order, then pass 1's, and so on."""
    first_pass, offset = divmod(start, len(shard_ids))
    position = start
    for pass_index in count(first_pass):
        for sample_id in pass_order(shard_ids, seed, pass_index)[offset:].tolist():
            yield position, sample_id
            position += 1
        offset = 0


def decode_rgb(path: str) -> Image.Image:
    """Decode as DALI does: EXIF orientation applied, 16-bit scaled (not clipped) to 8 bits, alpha dropped."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
            # Pillow's convert() clips values above 255, turning most 16-bit greys white. Mode "I" is how older
            # Pillow versions open 16-bit grey PNGs, so it is read as 16-bit too.
            deep = np.asarray(img).astype(np.int64).clip(0, 65535)
            img = Image.fromarray(((deep * 255 + 32767) // 65535).astype(np.uint8), mode="L")
        elif img.mode == "P":
            # A palette with transparency warns when converted straight to RGB; via RGBA it drops alpha cleanly.
            img = img.convert("RGBA")
        return img.convert("RGB")


def sample_crop(
    height: int, width: int, params: AugmentParams, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy generator: (top, left, height, width) in pixels."""
    area = height * width
    log_ratio = (math.log(params.crop_ratio[0]), math.log(params.crop_ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(params.crop_scale[0], params.crop_scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(params.crop_ratio):
        w = width
        h = int(round(w / min(params.crop_ratio)))
    elif in_ratio > max(params.crop_ratio):
        h = height
        w = int(round(h * max(params.crop_ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_jitter(params: AugmentParams, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(brightness, contrast, saturation, hue) as torchvision's ColorJitter draws them, or the identity."""
    # All draws are made whether or not the jitter applies, so each sample uses a fixed number of draws.
    apply = rng.uniform() < params.jitter_prob
    strengths = (params.brightness, params.contrast, params.saturation)
    b, c, s = (rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength) for strength in strengths)
    hue = rng.uniform(-params.hue, params.hue)
    if not apply:
        return IDENTITY_JITTER
    # Rounded to float32 here because the view record stores float32: replaying it must use the same numbers.
    b, c, s, hue = np.array([b, c, s, hue], dtype=np.float32).tolist()
    return b, c, s, hue


def _pixel_box(
    anchor: Sequence[float], shape: Sequence[float], height: int, width: int
) -> tuple[int, int, int, int]:
    h = min(max(1, round(float(shape[0]) * height)), height)
    w = min(max(1, round(float(shape[1]) * width)), width)
    top = min(max(0, round(float(anchor[0]) * height)), height - h)
    left = min(max(0, round(float(anchor[1]) * width)), width - w)
    return top, left, h, w


def _render(
    img: Image.Image,
    anchor: Sequence[float],
    shape: Sequence[float],
    flip: bool,
    jitter: Sequence[float],
    params: AugmentParams,
) -> torch.Tensor:
    top, left, h, w = _pixel_box(anchor, shape, img.height, img.width)
    size = [params.image_size, params.image_size]
    # On a PIL image this is crop-then-resize with PIL's bilinear filter, which antialiases when shrinking.
    out = TF.resized_crop(img, top, left, h, w, size, InterpolationMode.BILINEAR, antialias=True)
    if flip:
        out = TF.hflip(out)
    brightness, contrast, saturation, hue = (float(f) for f in jitter)
    # Identity factors are skipped rather than applied: PIL's hue round trip through HSV is not lossless.
    if brightness != 1.0:
        out = TF.adjust_brightness(out, brightness)
    if contrast != 1.0:
        out = TF.adjust_contrast(out, contrast)
    if saturation != 1.0:
        out = TF.adjust_saturation(out, saturation)
    if hue != 0.0:
        out = TF.adjust_hue(out, hue)
    return TF.normalize(TF.to_tensor(out), params.mean, params.std)


def render_view_pil(
    path: str,
    anchor: Sequence[float],
    shape: Sequence[float],
    flip: bool,
    jitter: Sequence[float],
    params: AugmentParams,
) -> torch.Tensor:
    """Render a recorded view again: float32 [3, S, S], normalised.

    anchor (top, left) and shape (height, width) are relative to the decoded image, as in ViewRecord; they are
    rounded to whole pixels, which reproduces this backend's own records exactly.
    """
    return _render(decode_rgb(path), anchor, shape, flip, jitter, params)


def draw_view(
    img: Image.Image, params: AugmentParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, bool, tuple[float, float, float, float]]:
    """One random view of img as a record: relative anchor and shape (float32), flip, jitter."""
    top, left, h, w = sample_crop(img.height, img.width, params, rng)
    flip = bool(rng.uniform() < params.flip_prob)
    jitter = sample_jitter(params, rng)
    # The record is what gets rendered, so replaying the float32 record cannot land on another pixel box.
    anchor = np.array([top / img.height, left / img.width], dtype=np.float32)
    shape = np.array([h / img.height, w / img.width], dtype=np.float32)
    return anchor, shape, flip, jitter


class _TrainViews(Dataset):
    """Maps a stream key to (images, local images, label, sample id, crop anchor, crop shape, flip, jitter, failed).

    One view per sample with AugmentParams; with MultiCropParams the image is decoded once and cut into the global
    crops ([G,3,S,S]) and local crops ([N,3,s,s], else None), with a record per crop (globals first).
    """

    def __init__(self, index: ImageIndex, params: AugmentParams | MultiCropParams, seed: int, shard_id: int):
        self.files = index.files
        self.labels = index.labels
        self.params = params
        self.seed = seed
        self.shard_id = shard_id

    def _decode_or_replace(self, sample_id: int) -> tuple[Image.Image, int, list[tuple[str, str]]]:
        """Decode the sample; if it fails, the next same-class image that decodes stands in (and is reported)."""
        failed: list[tuple[str, str]] = []
        n = len(self.files)
        for step in range(n):
            candidate = (sample_id + step) % n
            if step and self.labels[candidate] != self.labels[sample_id]:
                continue
            try:
                return decode_rgb(self.files[candidate]), candidate, failed
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                failed.append((self.files[candidate], f"{type(e).__name__}: {str(e)[:150]}"))
        raise RuntimeError(f"no image of class {self.labels[sample_id]} decodes")

    def __getitem__(self, key: StreamKey) -> tuple:
        position, requested = key
        img, sample_id, failed = self._decode_or_replace(requested)
        rng = view_rng(self.seed, self.shard_id, position)
        params = self.params
        kinds = (
            [params]
            if isinstance(params, AugmentParams)
            else [params.view_params(i) for i in range(params.num_views)]
        )
        views = [draw_view(img, kind, rng) for kind in kinds]
        crops = [
            _render(img, a.tolist(), s.tolist(), f, j, kind)
            for (a, s, f, j), kind in zip(views, kinds, strict=True)
        ]
        anchors, shapes, flips, jitters = (list(field) for field in zip(*views, strict=True))
        if isinstance(params, AugmentParams):
            return (
                crops[0],
                None,
                self.labels[sample_id],
                sample_id,
                anchors[0],
                shapes[0],
                flips[0],
                jitters[0],
                failed,
            )
        g = params.num_global
        local_crops = torch.stack(crops[g:]) if params.num_local else None
        return (
            torch.stack(crops[:g]), local_crops, self.labels[sample_id], sample_id,
            np.stack(anchors), np.stack(shapes), flips, jitters, failed,
        )  # fmt: skip


class _StreamBatches(Sampler[list[StreamKey]]):
    """Consecutive chunks of the endless stream, so a batch may hold the end of one pass and the start of the next."""

    def __init__(self, shard_ids: np.ndarray, seed: int, batch_size: int, start: int = 0):
        self.shard_ids = shard_ids
        self.seed = seed
        self.batch_size = batch_size
        self.start = start

    def __iter__(self) -> Iterator[list[StreamKey]]:
        keys = stream_keys(self.shard_ids, self.seed, self.start)
        while True:
            yield [next(keys) for _ in range(self.batch_size)]


def _collate_train(samples: list[tuple]) -> tuple:
    # A tuple of tensors (not a Batch) so that the DataLoader's pin_memory thread can pin every field; the last
    # item lists the (path, reason) of files that failed to decode in this batch.
    images, local_images, labels, ids, anchors, shapes, flips, jitters, failed = zip(*samples, strict=True)
    return (
        torch.stack(images),
        None if local_images[0] is None else torch.stack(local_images),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(ids, dtype=torch.int64),
        torch.from_numpy(np.stack(anchors)),
        torch.from_numpy(np.stack(shapes)),
        torch.tensor(flips, dtype=torch.int64),
        torch.tensor(jitters, dtype=torch.float32),
        [item for sample in failed for item in sample],
    )


class TorchvisionTrainStream:
    """An endless stream of full training batches from PIL + torchvision in a DataLoader.

    Each iter() starts the stream again at `start_position` (keep one iterator alive at a time: persistent workers
    are shared by all of them); the output does not depend on num_workers. `state_dict()` is the position of the
    next sample the consumer will get, so a new stream built with it continues exactly there.
    """

    def __init__(
        self,
        index: ImageIndex,
        params: AugmentParams | MultiCropParams,
        batch_size: int,
        seed: int,
        num_workers: int = 4,
        persistent_workers: bool = False,
        shard_id: int = 0,
        num_shards: int = 1,
        pin_memory: bool = False,
        start_position: int = 0,
        max_runtime_quarantine: int = 100,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.shard_ids = shard_sample_ids(index.num_samples, shard_id, num_shards)
        self.num_samples = len(self.shard_ids)
        self.batch_size = batch_size
        self._loader: DataLoader | None = DataLoader(
            _TrainViews(index, params, seed, shard_id),
            batch_sampler=_StreamBatches(self.shard_ids, seed, batch_size, start_position),
            num_workers=num_workers,
            collate_fn=_collate_train,
            pin_memory=pin_memory,
            # DataLoader rejects persistent workers without workers; the flag then simply has no meaning.
            persistent_workers=persistent_workers and num_workers > 0,
            # Its own generator: starting an iterator must not draw from torch's global RNG, which a resumed
            # run restores exactly (views are seeded by stream position anyway).
            generator=torch.Generator().manual_seed(seed),
        )
        self._active: Iterator | None = None
        self.start_position = start_position
        self.position = start_position
        self.max_runtime_quarantine = max_runtime_quarantine
        self.quarantine_entries: list[dict[str, str]] = []
        self._bad: set[str] = set()

    def state_dict(self) -> dict:
        return {"backend": "torchvision", "position": self.position}

    def _set_aside(self, path: str, reason: str) -> None:
        """A file failed to decode in a worker (which read a same-class image instead): record it, once."""
        if path in self._bad:
            return
        self._bad.add(path)
        if len(self._bad) > self.max_runtime_quarantine:
            raise TrainingStopped(
                f"more than data.max_runtime_quarantine={self.max_runtime_quarantine} files failed to decode during "
                f"the run (last: {path}); run `python -m dali_kd.scan --full` on the data"
            )
        warnings.warn(
            f"set aside {path}: it failed to decode ({reason}); continuing without it", stacklevel=3
        )
        self.quarantine_entries.append(
            {"path": path, "reason": f"decode failed during training: {reason}", "found": "runtime"}
        )

    def take_entries(self) -> list[dict[str, str]]:
        entries, self.quarantine_entries = self.quarantine_entries, []
        return entries

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is None:
            raise RuntimeError("TorchvisionTrainStream is closed")
        self._active = iter(self._loader)
        self.position = self.start_position
        for images, local_images, labels, ids, anchors, shapes, flips, jitters, failed in self._active:
            self.position += len(ids)
            for path, reason in failed:
                self._set_aside(path, reason)
            yield Batch(
                images=images,
                local_images=local_images,
                labels=labels,
                sample_ids=ids,
                view=ViewRecord(crop_anchor=anchors, crop_shape=shapes, flip=flips, jitter=jitters),
            )

    def close(self) -> None:
        """Stop the worker processes now rather than when the garbage collector finds them."""
        shutdown = getattr(self._active, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._active = None
        self._loader = None

    def __enter__(self) -> TorchvisionTrainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EvalImages(Dataset):
    def __init__(self, index: ImageIndex, params: EvalParams):
        self.files = index.files
        self.labels = index.labels
        self.params = params

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, sample_id: int) -> tuple[torch.Tensor, int, int]:
        img = decode_rgb(self.files[sample_id])
        img = TF.resize(img, self.params.resize_size, InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [self.params.image_size, self.params.image_size])
        image = TF.normalize(TF.to_tensor(img), self.params.mean, self.params.std)
        return image, self.labels[sample_id], sample_id


def torchvision_eval_batches(
    index: ImageIndex, params: EvalParams, batch_size: int, num_workers: int = 0
) -> Iterator[Batch]:
    """Every sample once, in index order; the last batch may be partial and Batch.view is None."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loader = DataLoader(
        _EvalImages(index, params), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    for images, labels, ids in loader:
        yield Batch(images=images, labels=labels.to(torch.int64), sample_ids=ids.to(torch.int64))
