"""Keeps DALI's decoder from printing red "Image too large" lines for images it then decodes fine.

nvImageCodec's libjpeg-turbo decoder (DALI's CPU JPEG decoder, and the GPU decoders' CPU fallback) refuses a JPEG
whose decoded size height * width * components reaches 2**29 bytes (~179 megapixels in RGB), logs
"[ERROR] [libjpeg_turbo_decoder] Could not decode jpeg code stream - Image too large: N" on stderr, and hands the
image to the next decoder (OpenCV), which decodes it. So a run whose `data.max_image_pixels` admits such images
trains correctly while printing a red error line each time one is decoded.

DALI offers no switch: the limit is a constant in nvImageCodec, no decoder argument raises it, and
DALI_NVIMGCODEC_LOG_LEVEL is clamped to at least 1 (errors), which still prints this line. So the line is filtered
where this project controls it: the process's stderr (fd 2, which DALI's C++ code writes to) is routed through a
small helper process that drops exactly these lines and passes everything else through at once, partial lines
(progress bars) included. A helper process rather than a thread, so that nothing written just before the run dies
(a crash report, a fatal signal) is lost: the helper forwards until the last writer has closed the pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys

# nvImageCodec's libjpeg-turbo decoder fails at height * width * components >= 2**29 bytes; a CMYK JPEG has 4
# components, so no image below this many pixels can meet the limit.
MIN_PIXELS_OVER_DECODER_LIMIT = (1 << 29) // 4

_HELPER = r"""
import os, re, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)  # ends at end of input, after the run has said its last word
ansi = re.compile(rb"\x1b\[[0-9;]*m")
line_end = re.compile(rb"\x1b(\[[0-9;]*)?$")
head = b"[ERROR] [libjpeg_turbo_decoder] Could not decode jpeg code stream - Image too large: "
dropped = re.compile(re.escape(head) + rb"\d+\r?")
def plain(data):
    return line_end.sub(b"", ansi.sub(b"", data))
def may_become_dropped(partial):
    text = plain(partial)
    return head.startswith(text) or (text.startswith(head) and text[len(head):].isdigit())
def write(data):
    global broken
    while data and not broken:
        try:
            data = data[os.write(1, data):]
        except OSError:
            broken = True  # nobody reads our stderr any more: keep draining, so the run never blocks
broken, pending = False, b""
while True:
    try:
        chunk = os.read(0, 1 << 16)
    except OSError:
        chunk = b""
    if not chunk:
        break
    *lines, pending = (pending + chunk).split(b"\n")
    out = b"".join(line + b"\n" for line in lines if not dropped.fullmatch(plain(line)))
    if pending and not may_become_dropped(pending):
        out, pending = out + pending, b""
    write(out)
write(pending)
"""

_helper: subprocess.Popen | None = None


def admits_images_over_decoder_limit(max_image_pixels: int | None) -> bool:
    """Whether a run may decode images DALI's CPU JPEG decoder refuses (None: the pixel cap is not applied)."""
    return max_image_pixels is None or max_image_pixels >= MIN_PIXELS_OVER_DECODER_LIMIT


def quiet_too_large_image_lines() -> bool:
    """Route this process's stderr through the filter (once per process); False if the helper could not start
    (stderr is then left as it was)."""
    global _helper
    if _helper is not None:
        return True
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    try:
        original = os.dup(2)
    except OSError:  # no stderr at all: nothing to filter
        os.close(read_end)
        os.close(write_end)
        return False
    try:
        _helper = subprocess.Popen(
            [sys.executable, "-S", "-c", _HELPER],
            stdin=read_end,
            stdout=original,
            stderr=original,
            close_fds=True,
            # Its own session: Ctrl-C or a signal to the run's process group must not end it before the run's
            # last lines have passed through.
            start_new_session=True,
        )
    except OSError:
        os.close(write_end)
        return False
    finally:
        os.close(read_end)
        os.close(original)
    os.dup2(write_end, 2)
    os.close(write_end)
    return True
