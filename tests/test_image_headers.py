"""The header checks are total: any malformed header is a rejected file with a reason, never an exception (which
would kill `scan`, `shard` and `train`); BMP and TIFF files cut short are refused, whole ones are not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_kd.data.file_checks import scan
from dali_kd.data.image_headers import Reject, check_data
from tests.conftest import FIXTURES

MAX_PIXELS = 1 << 40
# Pillow warns about the damaged headers it reads (what these tests make): not this module's business.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
# Pillow's writers: format -> save() options (a raw and a compressed TIFF: strips of both kinds).
FORMATS = {
    "jpeg": ("JPEG", {"quality": 90}),
    "png": ("PNG", {}),
    "bmp": ("BMP", {}),
    "tiff": ("TIFF", {}),
    "tiff_lzw": ("TIFF", {"compression": "tiff_lzw"}),
    "webp": ("WEBP", {"quality": 80}),
    "gif": ("GIF", {}),
}


def encoded(kind: str, size: tuple[int, int] = (37, 23), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    fmt, options = FORMATS[kind]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **options)
    return out.getvalue()


def verdict(data: bytes) -> str | None:
    """The check's reason, None for a good file; any other exception fails the test that calls it."""
    try:
        check_data(data, MAX_PIXELS)
    except Reject as e:
        return str(e)
    return None


def variants(data: bytes, rng: np.random.Generator, count: int):
    """Cut short, bits flipped, a span overwritten with garbage, garbage after the first bytes, and the first bytes
    followed by one byte repeated (fill bytes, zero lengths)."""
    n = max(len(data), 1)
    for k in range(count):
        kind = k % 5
        if kind == 0:
            yield data[: int(rng.integers(0, n))]
        elif kind == 1:
            flipped = bytearray(data or b"\0")
            for pos in rng.integers(0, min(n, 256), size=int(rng.integers(1, 9))):
                flipped[pos] ^= 1 << int(rng.integers(0, 8))
            yield bytes(flipped)
        elif kind == 2:
            start = int(rng.integers(0, min(n, 128)))
            span = int(rng.integers(1, 64))
            yield data[:start] + rng.bytes(span) + data[start + span :]
        elif kind == 3:
            yield data[: int(rng.integers(1, 32))] + rng.bytes(int(rng.integers(0, 200)))
        else:
            start = int(rng.integers(1, min(n, 40) + 1))
            yield data[:start] + data[start - 1 : start] * int(rng.integers(1, 100))


# ---- the two headers that crashed the scan ---------------------------------------------------------------------
def png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


JPEG_OF_FILL_BYTES = b"\xff\xd8" + b"\xff" * 40
PNG_WITH_EMPTY_IHDR = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", b"") + png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (JPEG_OF_FILL_BYTES, r"truncated JPEG"),
        (b"\xff\xd8\xff\xc0\x00\x04\x08\x00", r"corrupt JPEG: a frame header of 4 bytes"),
        (PNG_WITH_EMPTY_IHDR, r"corrupt PNG \(an IHDR chunk of 0 bytes"),
    ],
)
def test_a_header_running_past_the_end_is_a_rejected_file(data, reason, tmp_path):
    with pytest.raises(Reject, match=reason):
        check_data(data, MAX_PIXELS)
    # The scan (which `shard` and `train` run first) sets it aside and keeps going.
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "bad.jpg").write_bytes(data)
    (tmp_path / "tree" / "a" / "good.jpg").write_bytes(encoded("jpeg"))
    result = scan(tmp_path / "tree", tmp_path / "out", workers=1)
    assert result.good == ["a/good.jpg"]
    assert [q["path"] for q in result.quarantined] == ["a/bad.jpg"]


@pytest.mark.parametrize(("kind", "reason"), [("bmp", "truncated BMP"), ("tiff", "truncated TIFF"),
                                              ("tiff_lzw", "truncated TIFF")])  # fmt: skip
def test_bmp_and_tiff_cut_short_are_refused(kind, reason):
    data = encoded(kind)
    assert verdict(data) is None, "the whole file is good"
    for keep in (0.95, 0.6):
        if kind != "tiff_lzw":  # (Pillow writes that one's header after its strips)
            # Pillow opens the cut file (it reads the header only); DALI could not decode it.
            with Image.open(io.BytesIO(data[: int(len(data) * keep)])) as img:
                assert img.size == (37, 23)
        assert reason in (verdict(data[: int(len(data) * keep)]) or "good")


def test_whole_images_of_every_kind_pass_or_are_refused_as_before():
    for kind in FORMATS:
        for seed, size in enumerate([(1, 1), (37, 23), (64, 3)]):
            result = verdict(encoded(kind, size, seed))
            assert result == ("GIF: DALI cannot decode GIF" if kind == "gif" else None), (kind, size, result)


# ---- fuzz: never an exception ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_damaged_files_never_raise_anything_but_reject(kind):
    data = encoded(kind)
    rng = np.random.default_rng(sum(kind.encode()))
    reasons = [verdict(variant) for variant in variants(data, rng, 400)]
    assert any(r is not None for r in reasons)


def odd_images() -> list[Path]:
    files = sorted(p for p in (FIXTURES / "odd-images").rglob("*") if p.is_file() and p.suffix != ".md")
    assert files, "tests/fixtures/odd-images is missing"
    return files


def test_real_broken_files_and_their_damaged_copies_never_raise():
    rng = np.random.default_rng(7)
    for path in odd_images():
        data = path.read_bytes()
        verdict(data)
        for variant in variants(data, rng, 40):
            verdict(variant)
