"""`python -m dali_kd.shard`: shards DALI's webdataset reader reads back (ids, labels, bytes), training's sample ids,
no broken file inside, deterministic bytes, a killed run resumed, refusals and errors as one line, and index files
for shards made elsewhere (a corrupt one named in one line)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dali_kd.commands.shard import main, parse_size
from dali_kd.data import shards as fmt
from dali_kd.data.prepare import prepare_data
from dali_kd.data.shard_writer import ShardOptions, make_shards, write_indexes
from dali_kd.errors import UserError
from tests.conftest import FIXTURES, write_tree
from tests.faults import ROOT, assert_one_line_error

SHARD_SIZE = 40_000  # about six images of the test tree per shard


def read_with_dali(
    tar_paths: list[Path], index_paths: list[Path], num_samples: int
) -> dict[int, tuple[int, bytes]]:
    """One pass of fn.readers.webdataset (CPU) over the shards: sample id (from the key) -> (label, image bytes)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=num_samples, num_threads=1, device_id=None)
    def pipe():
        images, labels = fn.readers.webdataset(
            paths=[str(p) for p in tar_paths], index_paths=[str(p) for p in index_paths],
            ext=[fmt.READER_IMAGE_EXT, fmt.LABEL_EXT], missing_component_behavior="error",
        )  # fmt: skip
        return images, labels

    p = pipe()
    p.build()
    images, labels = p.run()
    seen: dict[int, tuple[int, bytes]] = {}
    for i in range(num_samples):
        member = images[i].source_info().rsplit(":", 1)[1]  # "<tar>:<offset>:<member name>"
        sample_id = int(fmt.split_name(member)[0])
        assert sample_id not in seen, f"sample {sample_id} read twice in one pass"
        seen[sample_id] = (int(np.array(labels[i]).tobytes().decode()), np.array(images[i]).tobytes())
    return seen


def shard_files(out: Path) -> dict[str, bytes]:
    """The shard folder's files, less the resume state (it holds source mtimes, by design outside the shards)."""
    return {
        p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")
    }


def samples_by_shard(out: Path) -> list[list[tuple[int, int]]]:
    """Per shard, its (sample id, label) in tar order, from the index files."""
    manifest = fmt.read_manifest(out)
    rows = [json.loads(line) for line in (out / fmt.SAMPLES_NAME).read_text().splitlines()]
    found = []
    for record in manifest["shards"]:
        lines = (out / record["index"]).read_text().splitlines()[1:]
        ids = [int(line.split()[3].split(".")[0]) for line in lines]
        found.append([(i, rows[i][4]) for i in ids])
    return found


def test_dali_reads_every_sample_once_with_the_id_label_and_bytes_training_uses(tiny_config, tmp_path):
    cfg = tiny_config()
    index = prepare_data(cfg.data).train  # the ids a run over the folder gives
    out = tmp_path / "shards"
    result = make_shards(cfg.data.root, out, ShardOptions(SHARD_SIZE), show_progress=False)
    manifest = fmt.read_manifest(out)
    assert manifest["class_names"] == list(index.class_names)
    assert manifest["num_samples"] == index.num_samples == sum(r["num_samples"] for r in manifest["shards"])
    assert len(manifest["shards"]) > 3 and result.written == [r["name"] for r in manifest["shards"]]
    for record in manifest["shards"]:
        tar = out / record["name"]
        assert tar.stat().st_size == record["bytes"]
        assert hashlib.sha256(tar.read_bytes()).hexdigest() == record["sha256"]
    seen = read_with_dali(
        [out / r["name"] for r in manifest["shards"]], [out / r["index"] for r in manifest["shards"]],
        index.num_samples,
    )  # fmt: skip
    assert sorted(seen) == list(range(index.num_samples))
    for sample_id, (label, data) in seen.items():
        assert label == index.labels[sample_id]
        assert data == Path(index.files[sample_id]).read_bytes()
    # samples.jsonl: line i is sample i, and its offset and size give the image's bytes by one pread.
    lines = (out / fmt.SAMPLES_NAME).read_text().splitlines()
    for sample_id, line in enumerate(lines):
        row_id, shard, offset, size, label, path = json.loads(line)
        assert (row_id, label, str(Path(cfg.data.root) / path)) == (
            sample_id, index.labels[sample_id], index.files[sample_id],
        )  # fmt: skip
        fd = os.open(out / manifest["shards"][shard]["name"], os.O_RDONLY)
        try:
            assert os.pread(fd, size, offset) == seen[sample_id][1]
        finally:
            os.close(fd)


def test_samples_are_shuffled_across_shards_by_default_and_in_id_order_without(image_tree, tmp_path):
    src = image_tree / "train"
    make_shards(src, tmp_path / "shuffled", ShardOptions(SHARD_SIZE), show_progress=False)
    make_shards(src, tmp_path / "ordered", ShardOptions(SHARD_SIZE, shuffle=False), show_progress=False)
    shuffled = samples_by_shard(tmp_path / "shuffled")
    ordered = samples_by_shard(tmp_path / "ordered")
    assert all(len({label for _, label in shard}) > 1 for shard in shuffled), shuffled
    assert [i for shard in ordered for i, _ in shard] == list(range(48))
    assert sorted(i for shard in shuffled for i, _ in shard) == list(range(48))
    make_shards(src, tmp_path / "seed1", ShardOptions(SHARD_SIZE, seed=1), show_progress=False)
    assert samples_by_shard(tmp_path / "seed1") != shuffled  # the seed decides the spread


def test_sharding_a_folder_twice_gives_byte_identical_shards(tmp_path):
    src = write_tree(tmp_path / "src", num_classes=4, per_class=12)
    make_shards(src, tmp_path / "a", ShardOptions(SHARD_SIZE), show_progress=False)
    for path in src.rglob("*.jpg"):  # other file times: nothing of them may enter a shard's bytes
        os.utime(path, (1_000_000_000, 1_000_000_000))
    make_shards(src, tmp_path / "b", ShardOptions(SHARD_SIZE), show_progress=False)
    first, second = shard_files(tmp_path / "a"), shard_files(tmp_path / "b")
    assert len(first) > 5 and first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_broken_files_never_enter_a_shard_and_are_in_the_quarantine(tmp_path):
    src = write_tree(tmp_path / "src", num_classes=2, per_class=6)
    good = (src / "class_0" / "0.jpg").read_bytes()
    (src / "class_0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "class_1" / "page.jpg").write_text("<html>not found</html>")
    out = tmp_path / "shards"
    result = make_shards(src, out, ShardOptions(SHARD_SIZE), show_progress=False)
    paths = [json.loads(line)[5] for line in (out / fmt.SAMPLES_NAME).read_text().splitlines()]
    assert len(paths) == 12 and "class_0/truncated.jpg" not in paths and "class_1/page.jpg" not in paths
    quarantine = [
        json.loads(line) for line in (out / "scan" / "train" / "quarantine.jsonl").read_text().splitlines()
    ]
    assert {q["path"] for q in quarantine} == {"class_0/truncated.jpg", "class_1/page.jpg"}
    assert result.manifest["quarantine"]["num_files"] == 2
    assert fmt.read_manifest(out)["num_samples"] == 12


def test_real_broken_files_stay_out_of_shards(tmp_path):
    src = write_tree(tmp_path / "src", num_classes=2, per_class=2)
    odd = sorted(p for p in (FIXTURES / "odd-images").rglob("*") if p.is_file() and p.suffix != ".md")
    for n, path in enumerate(odd):
        shutil.copy(path, src / f"class_{n % 2}" / f"{n:02d}-{path.name}")
    result = make_shards(src, tmp_path / "shards", ShardOptions(SHARD_SIZE), show_progress=False)
    quarantined = {
        q["path"] for q in map(json.loads, (tmp_path / "shards/scan/train/quarantine.jsonl").open())
    }
    sharded = [json.loads(line)[5] for line in (tmp_path / "shards" / fmt.SAMPLES_NAME).open()]
    assert quarantined and not quarantined & set(sharded)
    assert result.quarantined == len(quarantined)


def test_a_killed_run_keeps_its_finished_shards_and_a_rerun_finishes_the_same_bytes(image_tree, tmp_path):
    src, out = image_tree / "train", tmp_path / "shards"

    def kill_after_three(name: str) -> None:
        if name == fmt.shard_name(2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_shards(
            src, out, ShardOptions(SHARD_SIZE), show_progress=False, on_shard_written=kill_after_three
        )
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == [fmt.shard_name(i) for i in range(3)] and not (out / fmt.MANIFEST_NAME).exists()
    stats = {name: (out / name).stat() for name in tars}
    damaged = out / fmt.shard_name(1)  # a finished shard whose bytes changed since: written again
    data = bytearray(damaged.read_bytes())
    data[2000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / ".shard-000003.tar.abcd.tmp").write_bytes(b"half a shard")

    result = make_shards(src, out, ShardOptions(SHARD_SIZE), show_progress=False)
    assert result.kept == [fmt.shard_name(0), fmt.shard_name(2)]
    assert fmt.shard_name(1) in result.written and fmt.shard_name(0) not in result.written
    for name in result.kept:
        assert (out / name).stat().st_ino == stats[name].st_ino
        assert (out / name).stat().st_mtime_ns == stats[name].st_mtime_ns
    assert not list(out.glob("*.tmp"))
    make_shards(src, tmp_path / "fresh", ShardOptions(SHARD_SIZE), show_progress=False)
    assert shard_files(out) == shard_files(tmp_path / "fresh")


def test_a_changed_source_file_rewrites_only_the_shard_that_holds_it(tmp_path):
    src = write_tree(tmp_path / "src", num_classes=4, per_class=12)
    out = tmp_path / "shards"
    make_shards(src, out, ShardOptions(SHARD_SIZE), show_progress=False)
    changed = src / "class_2" / "3.jpg"
    # Another image of the same size: the bytes change, the plan's file sizes do not.
    data = bytearray(changed.read_bytes())
    data[-100] ^= 0x01
    changed.write_bytes(bytes(data))
    rerun = make_shards(src, out, ShardOptions(SHARD_SIZE), show_progress=False)
    row = next(json.loads(line) for line in (out / fmt.SAMPLES_NAME).open() if '"class_2/3.jpg"' in line)
    assert rerun.written == [fmt.shard_name(row[1])] and len(rerun.kept) > 3
    make_shards(src, tmp_path / "fresh", ShardOptions(SHARD_SIZE), show_progress=False)
    assert shard_files(out) == shard_files(tmp_path / "fresh")


def test_a_rerun_with_other_settings_is_refused_unless_overwrite(image_tree, tmp_path, capsys):
    src, out = image_tree / "train", tmp_path / "shards"
    assert main([str(src), str(out), "--shard-size", "40KB", "--no-progress"]) == 0
    capsys.readouterr()
    assert main([str(src), str(out), "--shard-size", "40KB", "--seed", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings (seed: 0 -> 1)" in err and "--overwrite" in err
    assert fmt.read_manifest(out)["settings"]["seed"] == 0  # untouched
    assert (
        main([str(src), str(out), "--shard-size", "40KB", "--seed", "1", "--overwrite", "--no-progress"]) == 0
    )
    assert fmt.read_manifest(out)["settings"]["seed"] == 1
    assert (
        main([str(src), str(out), "--shard-size", "2MB", "--seed", "1", "--overwrite", "--no-progress"]) == 0
    )
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.idx", "shard-000000.tar"]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["{tmp}/missing", "{tmp}/out"], r"SRC .*missing: not found"),
        (["{src}", "{src}/class_0/out"], r"OUT .* is inside SRC"),
        (["{src}", "{tmp}/file/out"], r"OUT .*/file/out: cannot write there"),
        (["{src}", "{tmp}/out", "--shard-size", "100"], r"--shard-size '100': expected a size with its unit"),
        (["{src}", "{tmp}/other"], r"holds files that are not shards \(e.g. notes.txt\)"),
        (["{src}"], r"expected SRC and OUT"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(image_tree, tmp_path, args, pattern):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("someone's notes")
    args = [a.format(tmp=tmp_path, src=image_tree / "train") for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "dali_kd.shard", *args, "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert_one_line_error(result, 2, pattern)
    assert not (image_tree / "train" / "class_0" / "out").exists()


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def test_a_full_disk_is_one_line_and_keeps_the_finished_shards(tmp_path):
    src = write_tree(tmp_path / "src", num_classes=2, per_class=12)
    noise = np.random.default_rng(0).integers(0, 255, size=(300, 300, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(noise).save(
        src / "class_1" / "big.jpg", quality=95
    )  # ~100 KB: its shard outgrows the limit
    out = tmp_path / "shards"
    command = [
        sys.executable,
        "-m",
        "dali_kd.shard",
        str(src),
        str(out),
        "--shard-size",
        "40KB",
        "--no-progress",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, preexec_fn=_limit_file_size(64 << 10)
    )
    assert_one_line_error(result, 2, r"cannot write .*shard-\d{6}\.tar: file too large; \d+ finished shard")
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert not list(out.glob("*.tmp")) and not (out / fmt.MANIFEST_NAME).exists()
    rerun = make_shards(src, out, ShardOptions(SHARD_SIZE), show_progress=False)
    assert rerun.kept == finished
    assert fmt.read_manifest(out)["num_samples"] == 25


def wds2idx_text(tar: Path, tmp_path: Path) -> str:
    """The index DALI's own wds2idx writes for tar (the tool that ships with DALI, run in this process)."""
    from wds2idx import IndexCreator

    idx = tmp_path / f"wds2idx-{tar.stem}.idx"
    with IndexCreator(str(tar), str(idx), verbose=False) as creator:
        creator.create_index()
    return idx.read_text()


def test_index_only_writes_the_index_dali_reads_for_shards_made_elsewhere(image_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    make_shards(image_tree / "train", out, ShardOptions(SHARD_SIZE), show_progress=False)
    made = {p.name: p.read_text() for p in out.glob("*.idx")}
    for p in out.glob("*.idx"):
        p.unlink()
    assert main(["--index-only", str(out)]) == 0
    assert {p.name: p.read_text() for p in out.glob("*.idx")} == made
    assert made == {p.name: wds2idx_text(p.with_suffix(".tar"), tmp_path) for p in out.glob("*.idx")}

    # A shard written by another tool: tarfile's own format, real mtimes, a directory entry, keys that are names.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    jpgs = sorted((image_tree / "train" / "class_1").glob("*.jpg"))[:3]
    with tarfile.open(elsewhere / "part-0.tar", "w") as tar:
        tar.add(image_tree / "train" / "class_1", arcname="dir", recursive=False)
        for n, jpg in enumerate(jpgs):
            tar.add(jpg, arcname=f"dir/img{n}.jpg")
            info = tarfile.TarInfo(f"dir/img{n}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    write_indexes(elsewhere)
    assert (elsewhere / "part-0.idx").read_text() == wds2idx_text(elsewhere / "part-0.tar", tmp_path)
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        images, labels = fn.readers.webdataset(
            paths=[str(elsewhere / "part-0.tar")], index_paths=[str(elsewhere / "part-0.idx")],
            ext=[fmt.READER_IMAGE_EXT, fmt.LABEL_EXT],
        )  # fmt: skip
        return images, labels

    p = pipe()
    p.build()
    images, labels = p.run()
    assert [np.array(images[i]).tobytes() for i in range(3)] == [j.read_bytes() for j in jpgs]
    assert [np.array(labels[i]).tobytes() for i in range(3)] == [b"1"] * 3


def _corrupt(kind: str, folder: Path, good: bytes) -> None:
    tar = folder / "shard-000000.tar"
    if kind == "cut inside a member":
        tar.write_bytes(good[:2000])
    elif kind == "cut inside a header":
        tar.write_bytes(good[: 1536 + 4 * 512 + 100])
    elif kind == "cut between members":
        # Only the data of whole members, no end-of-archive blocks: tarfile alone would read it as complete.
        members = fmt.read_members(tar)
        tar.write_bytes(good[: members[3].offset + fmt.padded(members[3].size)])
    elif kind == "not a tar":
        tar.write_bytes(b"\x89PNG\r\n" + b"\x07" * 3000)
    elif kind == "no labels":
        with tarfile.open(tar, "w") as t:
            info = tarfile.TarInfo("000000001.jpg")
            info.size = 4
            t.addfile(info, io.BytesIO(b"\xff\xd8\xff\xd9"))
    elif kind == "empty":
        tar.write_bytes(b"\0" * 1024)


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("cut inside a member", r"truncated tar"),
        ("cut inside a header", r"truncated"),
        ("cut between members", r"truncated tar \(no end-of-archive marker"),
        ("not a tar", r"not a readable tar"),
        ("no labels", r"sample 000000001 has no \.cls member"),
        ("empty", r"holds no samples"),
    ],
)
def test_index_only_on_a_corrupt_shard_is_one_line_naming_it(image_tree, tmp_path, kind, pattern):
    out = tmp_path / "shards"
    make_shards(image_tree / "train", out, ShardOptions(SHARD_SIZE), show_progress=False)
    _corrupt(kind, out, (out / "shard-000000.tar").read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "dali_kd.shard", "--index-only", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    line = assert_one_line_error(result, 2, pattern)
    assert "shard-000000.tar" in line


def test_sizes_need_their_unit():
    assert parse_size("2MB") == 2_000_000
    assert parse_size("1GB") == 10**9
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("512kb") == 512_000
    for bad in ("100", "1 parsec", "MB", "-1GB", "0B"):
        with pytest.raises(UserError, match="--shard-size"):
            parse_size(bad)


def test_a_file_list_shards_only_its_files_with_the_ids_training_gives(tiny_config, tmp_path):
    listed = [f"class_{c}/{i}.jpg" for c in (3, 0, 2, 1) for i in (5, 1)]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    cfg = tiny_config(f"data.file_list={tmp_path / 'list.txt'}")
    index = prepare_data(cfg.data).train
    out = tmp_path / "shards"
    make_shards(
        cfg.data.root,
        out,
        ShardOptions(SHARD_SIZE, file_list=str(tmp_path / "list.txt")),
        show_progress=False,
    )
    rows = [json.loads(line) for line in (out / fmt.SAMPLES_NAME).read_text().splitlines()]
    assert [str(Path(cfg.data.root) / r[5]) for r in rows] == list(index.files)
    assert [r[4] for r in rows] == list(index.labels) and len(rows) == 8
