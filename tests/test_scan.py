"""Bad files never kill a run: the scan's checks (real fixtures and generated cases), training over a tree full of
broken files on both backends, recovery from a file broken after the scan, and decode agreement on odd files."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dali_kd.commands.scan import main as scan_main
from dali_kd.cpu_budget import usable_cpus
from dali_kd.data.file_checks import check_file, scan, scan_workers
from dali_kd.training.trainer import Trainer
from tests.conftest import FIXTURES, write_tree
from tests.faults import warning_said

ODD = FIXTURES / "odd-images"

# The real fixtures DALI 2.4 cannot take (see fixtures/odd-images/SOURCES.md), with the start of the reason.
BROKEN_FIXTURES = {
    "pillow/apng_mode_16bit.png": "animated PNG",
    "pillow/apng_mode_grayscale_alpha.png": "animated PNG",
    "pillow/broken.png": "truncated PNG",
    "pillow/broken_data_stream.png": "corrupt PNG",
    "pillow/corrupt_exif.jpg": "empty file",
    "pillow/decompression_bomb.gif": "GIF",
    "pillow/hopper.gif": "GIF",
    "pillow/junk_jpeg_header.jpg": "corrupt JPEG",
    "pillow/truncated_app14.jpg": "corrupt JPEG",
    "pillow/truncated_end_chunk.png": "truncated PNG",
    "pillow/truncated_image.png": "truncated PNG",
    "pillow/truncated_jpeg.jpg": "truncated JPEG",
    "pillow/ultrahdr.jpg": "truncated JPEG",
}


def jpeg_bytes(size=(64, 48), seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def png_with_chunk(kind: bytes, payload: bytes) -> bytes:
    """A valid PNG with an extra chunk inserted after IHDR (e.g. acTL: animated)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(out, "PNG")
    data = out.getvalue()
    ihdr_end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def jpeg_with_sof(marker: int, width: int, height: int) -> bytes:
    """A valid baseline JPEG whose frame header is rewritten (another coding process, or claimed dimensions)."""
    data = bytearray(jpeg_bytes())
    pos = data.index(b"\xff\xc0")
    data[pos + 1] = marker
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def scan_data_start(data: bytes) -> int:
    """Where a baseline JPEG's entropy-coded data starts: just after its (last: a thumbnail has one too)
    start-of-scan header."""
    sos = data.rindex(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]


def jpeg_with_thumbnail() -> bytes:
    """A valid JPEG whose headers hold an EXIF-style thumbnail: a whole small JPEG, end-of-image marker included."""
    data = jpeg_bytes()
    thumbnail = jpeg_bytes(size=(8, 8), seed=1)
    payload = b"Exif\x00\x00" + thumbnail
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


NO_EOI = "truncated JPEG (no end-of-image marker)"
GENERATED = {
    "empty.jpg": (b"", "empty file"),
    "error_page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not an image: HTML"),
    "truncated.jpg": (jpeg_bytes()[:600], "truncated JPEG (a header segment runs past the end"),
    # Cut after the headers: only the end-of-image check can tell (the headers are all there).
    "cut_in_scan.jpg": (jpeg_bytes()[: (scan_data_start(jpeg_bytes()) + len(jpeg_bytes())) // 2], NO_EOI),
    "cut_before_eoi.jpg": (jpeg_bytes()[:-2], NO_EOI),
    "thumbnail_cut.jpg": (jpeg_with_thumbnail()[: scan_data_start(jpeg_with_thumbnail()) + 300], NO_EOI),
    "lossless.jpg": (jpeg_with_sof(0xC3, 64, 48), "lossless JPEG"),
    "bomb.jpg": (jpeg_with_sof(0xC0, 60000, 60000), "too large: 60000x60000"),
    "animated.png": (png_with_chunk(b"acTL", struct.pack(">II", 2, 0)), "animated PNG"),
    "sound.wav": (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(32), "audio file"),
    "clip.flac": (b"fLaC" + bytes(64), "audio file"),
    "random.jpeg": (bytes(np.random.default_rng(3).integers(0, 255, 500, dtype=np.uint8)), "not an image"),
}


def odd_but_valid(root: Path) -> dict[str, bytes]:
    """Valid files that DALI decodes: CMYK, grey, progressive, PNG named .JPEG, EXIF orientations, 16-bit, alpha."""
    rng = np.random.default_rng(7)
    # Smooth content: what differs between two JPEG decoders is their rounding, not the picture.
    yy, xx = np.mgrid[0:48, 0:64]
    base = np.stack([xx * 3, yy * 4, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    files: dict[str, bytes] = {}

    def save(name, img, fmt, **kw):
        out = io.BytesIO()
        img.save(out, fmt, **kw)
        files[name] = out.getvalue()

    save("cmyk.jpg", Image.fromarray(base).convert("CMYK"), "JPEG", quality=95)
    save("grey.jpg", Image.fromarray(base).convert("L"), "JPEG", quality=95)
    save("progressive.jpg", Image.fromarray(base), "JPEG", quality=95, progressive=True, subsampling=0)
    save("png_named.JPEG", Image.fromarray(base), "PNG")
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"orient{orientation}.jpg", Image.fromarray(base), "JPEG", quality=95, subsampling=0, exif=exif)
    deep = (base[..., 0].astype(np.uint16) * 257 + rng.integers(0, 200, base.shape[:2])).astype(np.uint16)
    save("grey16.png", Image.fromarray(deep), "PNG")
    save(
        "rgba.png", Image.fromarray(np.dstack([base, np.full(base.shape[:2], 128, np.uint8)]), "RGBA"), "PNG"
    )
    save("la.png", Image.fromarray(base[..., 0]).convert("LA"), "PNG")
    save("palette.png", Image.fromarray(base).convert("P"), "PNG")
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


# ---- the scan's per-file checks --------------------------------------------------------------------------------
def test_scan_reason_for_every_real_fixture(tmp_path):
    root = tmp_path / "tree"
    for sub in ("pillow", "dali_extra"):
        shutil.copytree(ODD / sub, root / sub)
    result = scan(root, tmp_path / "scan")
    reasons = {q["path"]: q["reason"] for q in result.quarantined}
    assert set(reasons) == set(BROKEN_FIXTURES), reasons
    for path, reason in BROKEN_FIXTURES.items():
        assert reasons[path].startswith(reason), (path, reasons[path])
    # Everything else decodes with DALI: CMYK, EXIF-rotated, misnamed, fuzzed, 16-bit, palette, MPO...
    assert (
        "dali_extra/single_missnamed_jpeg_0_png.jpeg" in result.good
        and "pillow/pil_sample_cmyk.jpg" in result.good
    )


def test_scan_reasons_for_generated_cases(tmp_path):
    root = tmp_path / "tree"
    (root / "cls").mkdir(parents=True)
    for name, (data, _) in GENERATED.items():
        (root / "cls" / name).write_bytes(data)
    (root / "cls" / "good.jpg").write_bytes(jpeg_bytes())
    (root / "cls" / "thumbnail.jpg").write_bytes(jpeg_with_thumbnail())
    (root / "cls" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "cls" / "notes.txt").write_text("not an image, not a candidate")
    (root / "cls" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    odd_but_valid(root / "cls")
    result = scan(root, tmp_path / "scan", max_pixels=50_000_000)
    reasons = {q["path"]: q["reason"] for q in result.quarantined}
    for name, (_, reason) in GENERATED.items():
        assert reasons.get(f"cls/{name}", "").startswith(reason), (name, reasons.get(f"cls/{name}"))
    assert reasons["cls/dangling.jpg"] == "dangling symlink"
    assert (
        "cls/good.jpg" in result.good
        and "cls/thumbnail.jpg" in result.good
        and "cls/png_named.JPEG" in result.good
        and "cls/cmyk.jpg" in result.good
    )
    assert not any(p.endswith(("notes.txt", ".DS_Store")) for p in result.good + list(reasons)), "ignored"
    good_list = (tmp_path / "scan" / "good.txt").read_text().splitlines()
    assert good_list == result.good
    lines = [json.loads(line) for line in (tmp_path / "scan" / "quarantine.jsonl").read_text().splitlines()]
    assert {line["path"] for line in lines} == set(reasons)


def test_rescan_uses_the_cache_and_rechecks_changed_files(tmp_path):
    root = write_tree(tmp_path / "tree", num_classes=2, per_class=5)
    first = scan(root, tmp_path / "scan")
    assert first.checked == 10 and first.cached == 0
    again = scan(root, tmp_path / "scan")
    assert again.checked == 0 and again.cached == 10 and again.good == first.good
    victim = root / "class_1" / "2.jpg"
    victim.write_bytes(b"<html>oops</html>")
    third = scan(root, tmp_path / "scan")
    assert third.checked == 1 and [q["path"] for q in third.quarantined] == ["class_1/2.jpg"]


def tree_only_a_decode_can_fault(root: Path) -> Path:
    """root/cls: a good JPEG, and a PNG whose structure and CRCs are fine but whose compressed data is not (the
    header check passes it; only a decode can tell)."""
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "good.jpg").write_bytes(jpeg_bytes())
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(out, "PNG")
    data = bytearray(out.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 6] = b"\xff\xff\xff\xff"
    end = start + struct.unpack(">I", data[start - 8 : start - 4])[0]
    data[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(data[start - 4 : end])))
    (root / "cls" / "bad_stream.png").write_bytes(bytes(data))
    return root


def test_full_scan_decodes_with_dali(tmp_path):
    root = tree_only_a_decode_can_fault(tmp_path / "tree")
    header = scan(root, tmp_path / "header")
    assert header.quarantined == []
    full = scan(root, tmp_path / "full", full=True)
    assert [q["path"] for q in full.quarantined] == ["cls/bad_stream.png"]
    assert full.quarantined[0]["reason"].startswith("DALI cannot decode it")


def test_a_full_scan_after_a_header_scan_into_the_same_folder_decodes_every_file(tmp_path):
    root = tree_only_a_decode_can_fault(tmp_path / "tree")
    assert scan(root, tmp_path / "scan").quarantined == []
    full = scan(root, tmp_path / "scan", full=True)
    assert full.checked == 2 and full.cached == 0, "a header check is no decode: every file is decoded"
    assert [q["path"] for q in full.quarantined] == ["cls/bad_stream.png"]
    again = scan(root, tmp_path / "scan")
    assert again.cached == 2 and [q["path"] for q in again.quarantined] == ["cls/bad_stream.png"], (
        "a header scan after a full one keeps the full results"
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--max-pixels", "-5"], "argument --max-pixels: must be at least 1, got -5"),
        (["--max-pixels", "0"], "argument --max-pixels: must be at least 1, got 0"),
        (["--workers", "-1"], "argument --workers: must be at least 1, got -1"),
        (["--full", "--workers", "0"], "argument --workers: must be at least 1, got 0"),
    ],
)
def test_scan_numbers_out_of_range_are_one_line_exit_2(tmp_path, capsys, args, says):
    root = write_tree(tmp_path / "tree", num_classes=2, per_class=2)
    with pytest.raises(SystemExit) as info:
        scan_main([str(root), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists(), "nothing scanned"


def test_a_scan_never_runs_more_workers_than_the_machine_can_use(tmp_path, capsys):
    cpus = usable_cpus()
    assert (
        scan_workers(48, full=True) == scan_workers(10**9, full=True) == scan_workers(None, full=True) == cpus
    )
    assert scan_workers(1, full=True) == 1 and scan_workers(10**9, full=False) == min(32, 4 * cpus)
    root = write_tree(tmp_path / "tree", num_classes=2, per_class=2)
    assert scan_main([str(root), "--out", str(tmp_path / "out"), "--full", "--workers", "1000000000"]) == 0
    err = capsys.readouterr().err
    assert f"--workers 1000000000 is more than this machine can use; running {cpus}" in err, err


def test_scan_cli(tmp_path):
    root = write_tree(tmp_path / "tree", num_classes=2, per_class=3)
    (root / "class_0" / "bad.jpg").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "dali_kd.scan", str(root), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "6 good, 1 quarantined; 7 checked, 0 from cache" in result.stdout and "empty file" in result.stdout
    assert len((tmp_path / "out" / "good.txt").read_text().splitlines()) == 6
    missing = subprocess.run(
        [sys.executable, "-m", "dali_kd.scan", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "data folder not found" in missing.stderr


def test_pixel_cap_is_configurable(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_with_sof(0xC0, 3000, 2000))
    check_file(path, max_pixels=6_000_000)
    with pytest.raises(Exception, match="too large: 3000x2000"):
        check_file(path, max_pixels=5_999_999)


# ---- training over broken files ----------------------------------------------------------------------------------
def mixed_tree(root: Path) -> set[str]:
    """Good images in two classes, odd-but-valid ones, and broken ones (real fixtures where present)."""
    write_tree(root, num_classes=2, per_class=10)
    broken = set()
    for name, (data, _) in GENERATED.items():
        if name.endswith((".jpg", ".jpeg", ".png", ".wav", ".flac")):
            (root / "class_0" / name).write_bytes(data)
            broken.add(f"class_0/{name}")
    odd_but_valid(root / "class_1")
    for rel in BROKEN_FIXTURES:
        target = root / "class_1" / Path(rel).name
        shutil.copy(ODD / rel, target)
        broken.add(f"class_1/{target.name}")
    return broken


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_training_over_broken_files_quarantines_exactly_them(tiny_config, tmp_path, backend):
    root = tmp_path / "mixed"
    broken = mixed_tree(root)
    cfg = tiny_config(
        f"data.root={root}", "data.val_root=null", f"data.backend={backend}", "model.teacher.num_classes=2",
        "train.epochs=2", "train.max_steps_per_epoch=4", f"data.scan_dir={tmp_path / 'scan'}",
    )  # fmt: skip
    summary = Trainer(cfg, torch.device("cpu"), show_progress=False).fit(tmp_path / "run")
    assert summary["steps"] == 8
    entries = [json.loads(line) for line in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    assert {e["path"] for e in entries} == broken
    assert all(e["found"] == "scan" and e["split"] == "train" for e in entries)
    assert summary["quarantined_files"] == len(broken)


MULTI_CROP = ("train.use_local_crops=true", "data.local_crop_size=16", "data.num_local_crops=2")


@pytest.mark.parametrize(
    ("backend", "damage", "extra"),
    [
        ("dali", "html", ()),
        ("dali", "truncate", ()),
        ("torchvision", "html", ()),
        ("dali", "html", MULTI_CROP),  # the multi-crop graph (whole-image decode) recovers the same way
        ("dali", "truncate", MULTI_CROP),
    ],
)
def test_a_file_broken_after_the_scan_is_set_aside_and_the_run_completes(
    tiny_config, tmp_path, backend, damage, extra
):
    root = write_tree(tmp_path / "tree", num_classes=2, per_class=8)
    cfg = tiny_config(
        f"data.root={root}", "data.val_root=null", f"data.backend={backend}", "model.teacher.num_classes=2",
        "train.epochs=3", "train.max_steps_per_epoch=2", f"data.scan_dir={tmp_path / 'scan'}", *extra,
    )  # fmt: skip
    trainer = Trainer(cfg, torch.device("cpu"), show_progress=False)
    victim = root / "class_1" / "3.jpg"
    data = victim.read_bytes()
    victim.write_bytes(b"<html>gone</html>" if damage == "html" else data[: len(data) // 3])
    with warning_said("set aside .*3.jpg"):
        summary = trainer.fit(tmp_path / "run")
    assert summary["steps"] == 6, "every step ran, with the same batch size"
    entries = [json.loads(line) for line in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    assert [(e["path"], e["found"]) for e in entries] == [(str(victim), "runtime")]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)


# ---- the backends agree on odd but valid files -------------------------------------------------------------------
def dali_decode(path: Path) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        encoded, _ = fn.readers.file(files=[str(path)])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (images,) = pipe.run()
    return np.array(images.as_tensor())[0]


def test_backends_decode_odd_but_valid_files_alike(tmp_path):
    from dali_kd.data.pil_views import decode_rgb

    names = odd_but_valid(tmp_path)
    for rel in ("pillow/pil_sample_cmyk.jpg", "pillow/hopper_orientation_6.jpg", "pillow/p_16.png",
                "pillow/pil123rgba.png", "pillow/l_trns.png", "dali_extra/single_missnamed_jpeg_0_png.jpeg"):  # fmt: skip
        shutil.copy(ODD / rel, tmp_path / Path(rel).name)
        names[Path(rel).name] = b""
    for name in names:
        dali = dali_decode(tmp_path / name).astype(int)
        pil = np.asarray(decode_rgb(str(tmp_path / name))).astype(int)
        assert dali.shape == pil.shape, (name, dali.shape, pil.shape)
        assert np.abs(dali - pil).max() <= 2, (name, np.abs(dali - pil).max())
    # The orientation really was applied (not just agreed on): orientation 6 turns 64x48 into 48x64.
    assert dali_decode(tmp_path / "orient6.jpg").shape[:2] == (64, 48)


# ---- other bad inputs: one line, exit 2 --------------------------------------------------------------------------
def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dali_kd.train", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("empty_dir", "no class sub-folders"),
        ("class_without_images", "class folder(s) without usable images: class_1"),
        ("batch_too_big", "train.batch_size=64 is larger than each process's share of the data"),
        ("output_not_writable", "is not a directory, so"),
        ("missing_checkpoint", "checkpoint not found"),
    ],
)
def test_bad_inputs_are_one_line_exit_2(tmp_path, case, expected):
    root = write_tree(tmp_path / "tree", num_classes=2, per_class=6)
    args = [
        "--data_config", str(Path(__file__).parents[1] / "configs" / "demo" / "data_config.yaml"), "--device", "cpu",
        f"data.root={root}", "data.val_root=null", "model.teacher.checkpoint=null", "model.teacher.num_classes=2",
        "model.teacher.name=test_resnet", "model.student.name=test_vit", "data.image_size=32",
        f"train.output_dir={tmp_path / 'runs'}", "train.batch_size=4", "train.compile_student=false",
        f"data.scan_dir={tmp_path / 'scan'}",
    ]  # fmt: skip
    if case == "empty_dir":
        empty = tmp_path / "empty"
        empty.mkdir()
        args.append(f"data.root={empty}")
    elif case == "class_without_images":
        for f in (root / "class_1").iterdir():
            f.write_bytes(b"")
    elif case == "batch_too_big":
        args.append("train.batch_size=64")
    elif case == "output_not_writable":
        (tmp_path / "file").write_text("x")
        args.append(f"train.output_dir={tmp_path / 'file' / 'runs'}")
    elif case == "missing_checkpoint":
        args.append(f"model.teacher.checkpoint={tmp_path / 'nope.safetensors'}")
    result = cli(args, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


def test_full_disk_while_checkpointing_keeps_the_previous_one(tmp_path):
    root = write_tree(tmp_path / "tree", num_classes=2, per_class=8)
    driver = tmp_path / "full_disk.py"
    driver.write_text(
        "import errno, sys, torch\n"
        "import dali_kd.runs.checkpoint as ckpt\n"
        "from dali_kd.commands import train\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if isinstance(obj, dict) and obj.get('step') == 4:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(obj, f, *a, **k)\n"
        "ckpt.torch.save = save\n"
        "sys.exit(train.main(sys.argv[1:]))\n"
    )
    args = [
        "--data_config", str(Path(__file__).parents[1] / "configs" / "demo" / "data_config.yaml"), "--device", "cpu",
        "--no-progress", f"data.root={root}", "data.val_root=null", "model.teacher.checkpoint=null",
        "model.teacher.num_classes=2", "model.teacher.name=test_resnet", "model.student.name=test_vit",
        "data.image_size=32", f"train.output_dir={tmp_path / 'runs'}", "train.batch_size=4", "train.run_name=r",
        "train.compile_student=false", "train.save_every_n_steps=2", "train.epochs=2", "train.max_steps_per_epoch=4",
        f"data.scan_dir={tmp_path / 'scan'}",
    ]  # fmt: skip
    result = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "no space left on device" in last.lower() and "earlier checkpoints are untouched" in last
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "r" / "checkpoints").glob("step_*.pt"))
    assert checkpoints == ["step_000000002.pt"]
    from dali_kd.runs.checkpoint import load

    assert load(tmp_path / "runs" / "r" / "checkpoints" / "step_000000002.pt")["step"] == 2


def test_scan_off_hands_the_reader_image_files_only(tiny_config, tmp_path):
    """With data.scan: off nothing is checked, so GIFs and audio files (DALI's reader lists them) stay out."""
    from dali_kd.data.prepare import prepare_data

    root = write_tree(tmp_path / "tree", num_classes=2, per_class=3)
    for name in ("class_0/anim.gif", "class_1/sound.wav", "class_1/track.flac", "class_0/clip.ogg"):
        (root / name).write_bytes(b"GIF89a" if name.endswith(".gif") else b"RIFF\x00\x00\x00\x00WAVE")
    cfg = tiny_config("data.scan=off", f"data.root={root}", "data.val_root=null")
    splits = prepare_data(cfg.data)
    assert sorted(splits.train.files) == [
        str(root / f"class_{c}" / f"{i}.jpg") for c in (0, 1) for i in range(3)
    ]
    assert splits.quarantine == []


def test_no_two_classes_share_a_name():
    """The scan's per-file result is a FileCheck; `Verdict` is the run's bound verdict (telemetry) only."""
    import importlib
    import inspect
    import pkgutil

    import dali_kd
    from dali_kd.data.file_checks import FileCheck

    homes: dict[str, set[str]] = {}
    for module_info in pkgutil.walk_packages(dali_kd.__path__, "dali_kd."):
        module = importlib.import_module(module_info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                homes.setdefault(name, set()).add(module.__name__)
    assert homes["Verdict"] == {"dali_kd.telemetry.verdict"} and homes["FileCheck"] == {FileCheck.__module__}
    assert not {name: where for name, where in homes.items() if len(where) > 1}
