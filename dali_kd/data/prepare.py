"""From the data config to the indexes training uses: scan each split (cached), set the bad files aside."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dali_kd.config import DataConfig
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.decoder_log import admits_images_over_decoder_limit, quiet_too_large_image_lines
from dali_kd.data.file_checks import candidate_files, scan
from dali_kd.data.file_tree import IMAGE_EXTENSIONS
from dali_kd.data.holdout import split_off
from dali_kd.errors import UserError

NO_EVALUATION = "data: no evaluation (data.val_root is null and data.holdout_fraction is 0)"


@dataclass
class DataSplits:
    train: ImageIndex
    val: ImageIndex | None
    # One {"split", "path", "reason", "found"} per file set aside, for the run directory's quarantine.jsonl.
    quarantine: list[dict[str, str]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def _split(
    data: DataConfig,
    split: str,
    root: Path,
    file_list: str | None,
    class_names: tuple[str, ...],
    is_main: bool,
    barrier: Callable[[], None],
    required: tuple[str, ...] | None,
) -> tuple[ImageIndex, list[dict[str, str]], list[str]]:
    where = f"data.{'root' if split == 'train' else 'val_root'} {root}"
    quarantine: list[dict[str, str]] = []
    messages: list[str] = []
    if data.scan == "off":
        # Unchecked files: only names DALI decodes as images may reach its reader (not the GIFs and audio files
        # that the scan checks because the reader would list them).
        listing = candidate_files(root)
        paths = [p for p in listing.files if p.lower().endswith(IMAGE_EXTENSIONS)]
        messages += listing.notes
    else:
        out = Path(data.scan_dir).expanduser() / split if data.scan_dir else None
        # Rank 0 scans; the others then read the same verdicts from its cache.
        if is_main:
            result = scan(root, out, full=data.scan == "full", max_pixels=data.max_image_pixels)
        barrier()
        if not is_main:
            result = scan(root, out, full=data.scan == "full", max_pixels=data.max_image_pixels)
        paths = result.good
        quarantine = [{"split": split, **q, "found": "scan"} for q in result.quarantined]
        total = len(result.good) + len(result.quarantined)
        messages += result.notes
        messages.append(
            f"data: {split} split: {len(result.quarantined)} of {total} files set aside "
            f"({result.checked} checked, {result.cached} from the scan cache in {result.out_dir})"
        )
    if file_list:
        listed = ImageIndex.read_file_list(Path(file_list).expanduser(), root)
        usable = set(paths)
        bad = {q["path"] for q in quarantine}
        missing = [p for p in listed if p not in usable and p not in bad]
        if missing:
            raise UserError(
                f"data.file_list: {len(missing)} listed files are not under {root} (e.g. {missing[0]})"
            )
        paths = [p for p in listed if p in usable]
        quarantine = [q for q in quarantine if q["path"] in set(listed)]
    if not paths:
        raise UserError(f"{where}: no usable images (see the scan's quarantine)")
    return ImageIndex.from_paths(root, paths, class_names, where, required), quarantine, messages


def prepare_shards(data: DataConfig) -> DataSplits:
    """data.format shards: the manifests' samples (scanned when the shards were made, so no scan here); every shard
    is checked at start (size and index), see dali_kd.data.shard_index."""
    from dali_kd.data.shard_index import index_from_shards

    train = index_from_shards(data.root, f"data.root {data.root}")
    val = None
    if data.val_root:
        val = index_from_shards(data.val_root, f"data.val_root {data.val_root}", train.class_names)
    messages = [
        f"data: {split} split: {index.num_samples} samples in {len(index.shards.tar_paths)} shard(s) of "
        f"{index.root}"
        for split, index in (("train", train), ("val", val))
        if index is not None and index.shards is not None
    ]
    if val is None:
        messages.append(NO_EVALUATION)
    return DataSplits(train, val, [], messages)


def prepare_data(
    data: DataConfig, is_main: bool = True, barrier: Callable[[], None] = lambda: None
) -> DataSplits:
    """The indexes of the data section's splits: each file scanned (rank 0 scans, the others read its cache after
    `barrier`), the bad ones set aside as quarantine entries; shards are read from their manifest."""
    if data.format == "shards":
        return prepare_shards(data)
    if admits_images_over_decoder_limit(None if data.scan == "off" else data.max_image_pixels):
        quiet_too_large_image_lines()  # DALI decodes such images, but prints a red error line for each
    root = Path(data.root).expanduser()
    classes = ImageIndex.class_folders(root)
    train, train_bad, train_msg = _split(data, "train", root, data.file_list, classes, is_main, barrier, None)
    val: ImageIndex | None = None
    val_bad: list[dict[str, str]] = []
    val_msg: list[str] = []
    if data.val_root:
        val_root = Path(data.val_root).expanduser()
        val_classes = ImageIndex.class_folders(val_root)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise UserError(
                f"data.val_root {val_root}: class folders not in the training split: {', '.join(unknown[:5])}"
            )
        val, val_bad, val_msg = _split(data, "val", val_root, None, classes, is_main, barrier, val_classes)
    elif data.holdout_fraction > 0:
        train, val, line = split_off(train, data.holdout_fraction, (q["path"] for q in train_bad))
        val_msg = [line]
    else:
        val_msg = [NO_EVALUATION]
    return DataSplits(train, val, train_bad + val_bad, train_msg + val_msg)
