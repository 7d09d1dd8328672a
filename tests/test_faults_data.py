"""Bad data folders, as a user meets them on the command line: symlink loops end (each real folder entered once,
each real file counted once, one line per link not followed), a file given as the data folder is one line and exit
2, and a JPEG too large for DALI's CPU decoder trains without its red error lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import write_tree
from tests.faults import ROOT, assert_one_line_error, run_module, tiny_args

NUM_FILES = 12  # the tree: 4 classes of 3 images


def plant(change: str, tree: Path, tmp_path: Path) -> Path:
    """Make one case's change to the tree; returns the path to hand the command as the data folder."""
    outside = write_tree(tmp_path / "elsewhere", num_classes=1, per_class=2, seed=5) / "class_0"
    if change == "back_to_parent":
        (tree / "class_0" / "back").symlink_to("..")
    elif change == "link_to_root":
        (tree / "class_1" / "all").symlink_to(tree)
    elif change == "two_loops":  # each walks into the other: os.walk(followlinks=True) never ends
        (tree / "class_0" / "back").symlink_to("..")
        (tree / "class_2" / "up").symlink_to("../../tree")
    elif change == "root_links_to_itself":
        (tree / "again").symlink_to(".")
    elif change == "outside_folder_twice":
        (tree / "class_1" / "outside").symlink_to(outside)
        (tree / "class_3" / "same").symlink_to(outside)
    elif change == "link_to_file":
        (tree / "class_0" / "link.jpg").symlink_to(tree / "class_2" / "0.jpg")
    elif change == "link_to_outside_file":
        (tree / "class_0" / "link.jpg").symlink_to(outside / "1.jpg")
    elif change == "huge_jpeg":
        # Just over DALI's CPU decoder limit (13400 * 13400 * 3 bytes >= 2**29): it falls back to OpenCV.
        Image.new("RGB", (13400, 13400), (200, 40, 90)).save(tree / "class_0" / "huge.jpg", quality=50)
    elif change == "root_is_a_file":
        return tree / "class_0" / "0.jpg"
    elif change == "root_missing":
        return tree / "nowhere"
    return tree


def run_index(root: Path, cwd: Path) -> subprocess.CompletedProcess:
    """ImageIndex.from_folder in a child process (a walk that never ends must not hang the suite)."""
    code = (
        "import sys; from dali_kd.data.dataset import ImageIndex; "
        "print(f'indexed {ImageIndex.from_folder(sys.argv[1]).num_samples} files')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, cwd=cwd, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def counted(command: str, result: subprocess.CompletedProcess, out: Path) -> int:
    """How many files the command listed for training."""
    if command == "scan":
        return len((out / "good.txt").read_text().splitlines())
    if command == "index":
        return int(re.search(r"indexed (\d+) files", result.stdout).group(1))
    return int(re.search(r"data: train split: 0 of (\d+) files set aside", result.stdout).group(1))


LOOP = r"links back to \S+/tree \(a symlink loop\): not followed"


@pytest.mark.parametrize(
    ("change", "command", "code", "num_files", "line"),
    [
        ("back_to_parent", "scan", 0, NUM_FILES, r"^data: \S+/tree/class_0/back " + LOOP),
        ("back_to_parent", "index", 0, NUM_FILES, r"^warning: data: \S+/tree/class_0/back " + LOOP),
        ("back_to_parent", "train", 0, NUM_FILES, r"^data: \S+/tree/class_0/back " + LOOP),
        ("link_to_root", "scan", 0, NUM_FILES, r"^data: \S+/tree/class_1/all " + LOOP),
        ("link_to_root", "index", 0, NUM_FILES, r"data: \S+/tree/class_1/all " + LOOP),
        ("two_loops", "scan", 0, NUM_FILES, r"^data: \S+/tree/class_2/up " + LOOP),
        ("root_links_to_itself", "scan", 0, NUM_FILES, r"^data: \S+/tree/again " + LOOP),
        ("outside_folder_twice", "scan", 0, NUM_FILES + 2, r"class_3/same leads to \S+/outside, which is listed"),
        ("outside_folder_twice", "index", 0, NUM_FILES + 2, r"class_3/same leads to \S+/outside, which is listed"),
        ("link_to_file", "scan", 0, NUM_FILES, r"class_0/link.jpg is class_2/0.jpg\): each listed once"),
        ("link_to_file", "index", 0, NUM_FILES, r"class_0/link.jpg is class_2/0.jpg\): each listed once"),
        ("link_to_outside_file", "scan", 0, NUM_FILES + 1, r"^scanned 13 files"),
        ("root_is_a_file", "scan", 2, None, r"^error: data folder is not a directory: \S+/tree/class_0/0\.jpg$"),
        ("root_is_a_file", "train", 2, None, r"^error: data folder is not a directory: \S+/tree/class_0/0\.jpg$"),
        ("root_missing", "scan", 2, None, r"^error: data folder not found: \S+/tree/nowhere$"),
        ("huge_jpeg", "train", 0, NUM_FILES + 1, r"^data: train split: 0 of 13 files set aside"),
    ],
)  # fmt: skip
def test_bad_data_folders(image_tree, tmp_path, change, command, code, num_files, line):
    tree = write_tree(tmp_path / "tree", num_classes=4, per_class=3)
    root = plant(change, tree, tmp_path)
    out = tmp_path / "out"
    if command == "scan":
        result = run_module("dali_kd.scan", [str(root), "--out", str(out)], tmp_path, timeout=60)
    elif command == "index":
        result = run_index(root, tmp_path)
    else:
        args = [*tiny_args(image_tree, out), f"data.root={root}"]
        if change == "huge_jpeg":
            # Admitted, so DALI must decode it; no k-NN evaluation (two more decodes of it, ~8 s).
            args += ["data.max_image_pixels=200000000", "data.val_root=null"]
        result = run_module("dali_kd.train", args, tmp_path, timeout=240)
    if code != 0:
        assert_one_line_error(result, code, line)
        return
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert re.search(line, output, re.MULTILINE), output[-3000:]
    assert counted(command, result, out) == num_files
    # Nothing else is said about the data: no DALI decoder line (the huge JPEG), no traceback.
    assert "Image too large" not in output and "Traceback" not in output, output[-3000:]


def test_the_stderr_filter_drops_only_the_decoders_too_large_lines(tmp_path):
    """The filter's own rules, byte for byte: the decoder's line goes (even written in pieces), every other line
    and a partial line (a progress bar) pass through unchanged."""
    code = """
import os, sys, time
from dali_kd.data.decoder_log import quiet_too_large_image_lines
assert quiet_too_large_image_lines() and quiet_too_large_image_lines()
line = b"\\x1b[0;31m[ERROR] \\x1b[0m[libjpeg_turbo_decoder] Could not decode jpeg code stream - Image too large: 53868"
os.write(2, b"before\\n" + line[:20])
time.sleep(0.2)
os.write(2, line[20:] + b"0000\\n[ERROR] \\x1b[0m[other_decoder] Image too large: 5\\n")
os.write(2, line.replace(b"53868", b"lots") + b"\\n")
sys.stderr.write("progress 50%\\r")
sys.stderr.flush()
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        b"before\n[ERROR] \x1b[0m[other_decoder] Image too large: 5\n"
        b"\x1b[0;31m[ERROR] \x1b[0m[libjpeg_turbo_decoder] Could not decode jpeg code stream - Image too large: lots\n"
        b"progress 50%\r"
    )
