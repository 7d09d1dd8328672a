"""Image header checks from content: is this file whole enough for DALI to decode, and how large is it.

Every checker is total: each read is bounded by the file's length, so a malformed or cut-short header is a Reject
with a reason, never an exception of its own (a struct.error here would kill a scan, a shard or a run).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
UNSUPPORTED_SOF = {0xC3: "lossless JPEG", 0xC7: "lossless JPEG", 0xCB: "lossless JPEG", 0xCF: "lossless JPEG",
                   0xC5: "hierarchical JPEG", 0xC6: "hierarchical JPEG", 0xCD: "hierarchical JPEG",
                   0xCE: "hierarchical JPEG"}  # fmt: skip


class Reject(Exception):
    """A file training must not see; the message is the reason written to the quarantine."""


def read_at(data: bytes, fmt: str, pos: int, what: str) -> tuple:
    """struct.unpack_from with the file's end as a Reject: `what` names the format and the field being read."""
    if pos < 0 or pos + struct.calcsize(fmt) > len(data):
        raise Reject(f"truncated {what} (its header runs past the end of the file)")
    return struct.unpack_from(fmt, data, pos)


def sniff(head: bytes) -> str:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE" or head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3":
        return "audio"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jpeg2000"
    if len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"123456":
        return "pnm"
    stripped = head.lstrip()[:15].lower()
    if stripped.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"{")):
        return "text"
    return "unknown"


# ---- JPEG and PNG: walked here, segment by segment -------------------------------------------------------------
def check_jpeg(data: bytes) -> tuple[int, int]:
    """Walk the marker segments up to the scan; dimensions from the frame header; an end-of-image marker at the end."""
    pos, size, dims, length = 2, len(data), None, 0
    while True:
        if pos + 4 > size:
            raise Reject("truncated JPEG (ends inside its headers)")
        if data[pos] != 0xFF:
            raise Reject(f"corrupt JPEG: invalid marker at byte {pos}")
        while data[pos] == 0xFF and pos + 1 < size:  # fill bytes
            pos += 1
        marker = data[pos]
        pos += 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if marker == 0xFF:  # nothing but fill bytes up to the end
            raise Reject("truncated JPEG (ends inside its headers)")
        if marker in (0xD8, 0xD9, 0x00):
            raise Reject(f"corrupt JPEG: unexpected marker 0x{marker:02X} at byte {pos - 1}")
        (length,) = read_at(data, ">H", pos, "JPEG")
        if length < 2 or pos + length > size:
            raise Reject("truncated JPEG (a header segment runs past the end of the file)")
        if marker in SOF_MARKERS:
            if marker in UNSUPPORTED_SOF:
                raise Reject(f"{UNSUPPORTED_SOF[marker]}: DALI cannot decode it")
            if length < 8:
                raise Reject(f"corrupt JPEG: a frame header of {length} bytes (at least 8)")
            height, width = read_at(data, ">HH", pos + 3, "JPEG")
            dims = (width, height)
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            break
        pos += length
    if dims is None:
        raise Reject("corrupt JPEG: no frame header before the image data")
    # Cameras may append data after the image (MPO, gain maps), so look near the end, not at the last two bytes;
    # but only after the scan starts: an EXIF thumbnail in the headers ends with an end-of-image marker of its own.
    if data.find(b"\xff\xd9", max(pos + length, size - 4096)) < 0:
        raise Reject("truncated JPEG (no end-of-image marker)")
    return dims


def _chunk_name(kind: bytes) -> str:
    return repr(kind.decode("ascii")) if kind.isalpha() else f"0x{kind.hex()}"


def check_png(data: bytes) -> tuple[int, int]:
    """Walk every chunk with its CRC up to IEND; refuse animated PNG (DALI decodes it as a blank image)."""
    pos, size, dims = 8, len(data), None
    while True:
        if pos + 8 > size:
            raise Reject("truncated PNG (no IEND chunk)")
        length, kind = read_at(data, ">I4s", pos, "PNG")
        end = pos + 12 + length
        if end > size:
            raise Reject(f"truncated PNG (chunk {_chunk_name(kind)} runs past the end of the file)")
        (crc,) = read_at(data, ">I", end - 4, "PNG")
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise Reject(f"corrupt PNG (bad CRC in chunk {_chunk_name(kind)})")
        if kind == b"IHDR":
            if length != 13:
                raise Reject(f"corrupt PNG (an IHDR chunk of {length} bytes, not 13)")
            dims = read_at(data, ">II", pos + 8, "PNG")
        elif kind == b"acTL":
            raise Reject("animated PNG: DALI decodes it as a blank image")
        elif kind == b"IEND":
            break
        pos = end
    if dims is None:
        raise Reject("corrupt PNG (no IHDR chunk)")
    return dims


# ---- BMP and TIFF: Pillow reads only their headers, so check here that the pixel data is there ----------------
# Compressed pixel data (RLE8, RLE4, JPEG, PNG): its size is the header's biSizeImage, not width x height.
BMP_COMPRESSED = (1, 2, 4, 5)


def check_bmp_length(data: bytes) -> None:
    """The pixel data the header describes (its offset plus the image's bytes) must lie inside the file."""
    (offset,) = read_at(data, "<I", 10, "BMP")
    (header_size,) = read_at(data, "<I", 14, "BMP")
    if header_size == 12:  # BITMAPCOREHEADER: 16-bit sizes, never compressed
        width, height, _, bpp = read_at(data, "<HHHH", 18, "BMP")
        compression, image_size = 0, 0
    else:
        width, height, _, bpp, compression, image_size = read_at(data, "<iiHHII", 18, "BMP")
    rows = (abs(width) * bpp + 31) // 32 * 4 * abs(height)  # uncompressed rows are padded to 4 bytes
    needed = image_size if compression in BMP_COMPRESSED else rows
    if offset + needed > len(data):
        raise Reject(
            f"truncated BMP ({len(data)} bytes; its header puts {needed} bytes of pixels at byte {offset})"
        )


# TIFF tag -> what it holds: the offsets of the strips (or tiles) and their lengths in bytes.
TIFF_PARTS = {273: "strip", 324: "tile"}
TIFF_LENGTHS = {279: "strip", 325: "tile"}
TIFF_TYPE_SIZES = {3: ("H", 2), 4: ("I", 4)}  # SHORT, LONG: the types offsets and byte counts come in


def _tiff_values(data: bytes, order: str, entry: int) -> list[int]:
    """The SHORT or LONG values of one IFD entry, inline or at their offset (bounded like every read here)."""
    _, kind, count, inline = read_at(data, order + "HHI4s", entry, "TIFF")
    if kind not in TIFF_TYPE_SIZES:
        raise Reject(f"corrupt TIFF (strip offsets or byte counts of type {kind})")
    code, width = TIFF_TYPE_SIZES[kind]
    if count * width <= 4:
        return list(struct.unpack_from(f"{order}{count}{code}", inline))
    (at,) = read_at(data, order + "I", entry + 8, "TIFF")
    if count > len(data):
        raise Reject(f"corrupt TIFF ({count} strips in a file of {len(data)} bytes)")
    return list(read_at(data, f"{order}{count}{code}", at, "TIFF"))


def check_tiff_length(data: bytes) -> None:
    """Every strip (or tile) of the first image, at its offset and of its byte count, must lie inside the file."""
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = read_at(data, order + "I", 4, "TIFF")
    (count,) = read_at(data, order + "H", ifd, "TIFF")
    read_at(data, f"{order}{12 * count}s", ifd + 2, "TIFF")  # every entry inside the file
    offsets, lengths = {}, {}
    for k in range(count):
        entry = ifd + 2 + 12 * k
        (tag,) = read_at(data, order + "H", entry, "TIFF")
        if tag in TIFF_PARTS:
            offsets[TIFF_PARTS[tag]] = _tiff_values(data, order, entry)
        elif tag in TIFF_LENGTHS:
            lengths[TIFF_LENGTHS[tag]] = _tiff_values(data, order, entry)
    for part, starts in offsets.items():
        sizes = lengths.get(part)
        if sizes is None or len(sizes) != len(starts):
            raise Reject(
                f"corrupt TIFF ({len(starts)} {part} offsets, {len(sizes or [])} {part} byte counts)"
            )
        end = max((start + size for start, size in zip(starts, sizes, strict=True)), default=0)
        if end > len(data):
            raise Reject(f"truncated TIFF ({len(data)} bytes; its {part}s run to byte {end})")


def check_other(source: Path | BinaryIO) -> tuple[int, int]:
    """BMP, TIFF, WebP, JPEG 2000, PNM: Pillow reads the dimensions from the header without decoding."""
    from PIL import Image

    try:
        with Image.open(source) as img:
            return img.size
    except Exception as e:  # noqa: BLE001 - anything Pillow cannot even open is not trainable
        raise Reject(f"unreadable image header ({type(e).__name__})") from None


def check_data(data: bytes, max_pixels: int, path: Path | None = None) -> None:
    """Raise Reject with the reason if training must not see these bytes (path: the file they were read from)."""
    if not data:
        raise Reject("empty file (0 bytes)")
    kind = sniff(data[:32])
    if kind == "audio":
        raise Reject("audio file, not an image")
    if kind == "gif":
        raise Reject("GIF: DALI cannot decode GIF")
    if kind == "text":
        raise Reject("not an image: HTML/XML/JSON text")
    if kind == "unknown":
        raise Reject("not an image: unrecognised content")
    if kind == "jpeg":
        width, height = check_jpeg(data)
    elif kind == "png":
        width, height = check_png(data)
    else:
        if kind == "bmp":
            check_bmp_length(data)
        elif kind == "tiff":
            check_tiff_length(data)
        width, height = check_other(path if path is not None else io.BytesIO(data))
    if width <= 0 or height <= 0:
        raise Reject(f"invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise Reject(f"too large: {width}x{height} pixels is over the cap of {max_pixels}")
