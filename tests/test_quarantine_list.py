"""The run's quarantine list: the scan's entries and the run's own, in quarantine.jsonl and across a resume."""

from __future__ import annotations

import json

from dali_kd.data import QuarantineList

SCAN = [{"split": "train", "path": "a/1.jpg", "reason": "truncated", "found": "scan"}]


class SetsAside:
    """A stream or evaluator that set these files aside (handed over once, as take_entries does)."""

    def __init__(self, *entries: dict[str, str]):
        self.entries = list(entries)

    def take_entries(self) -> list[dict[str, str]]:
        taken, self.entries = self.entries, []
        return taken


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_file_starts_with_the_scan_and_grows_with_what_the_run_sets_aside(tmp_path):
    stream = SetsAside({"path": "b/2.jpg", "reason": "decode error", "found": "runtime"})
    evaluator = SetsAside({"split": "val", "path": "v/3.jpg", "reason": "decode error", "found": "runtime"})
    quarantine = QuarantineList(SCAN)
    quarantine.watch(stream, evaluator)
    quarantine.start(tmp_path)
    assert lines(tmp_path / "quarantine.jsonl") == SCAN
    new = quarantine.gather()
    # A training stream's entries say their split; an evaluation's keep theirs.
    assert [(e["split"], e["path"]) for e in new] == [("train", "b/2.jpg"), ("val", "v/3.jpg")]
    assert lines(tmp_path / "quarantine.jsonl") == SCAN + new
    assert quarantine.gather() == [], "each entry is gathered once"
    assert len(quarantine) == 3
    assert quarantine.set_aside_files("train") == {"b/2.jpg"} and quarantine.set_aside_files("val") == {
        "v/3.jpg"
    }


def test_a_resumed_run_keeps_what_the_first_set_aside(tmp_path):
    first = QuarantineList(SCAN)
    first.watch(SetsAside({"path": "b/2.jpg", "reason": "decode error", "found": "runtime"}))
    first.gather()
    # What a checkpoint carries, under the progress key older checkpoints used too.
    progress = {"step": 7, **first.state_dict()}
    assert list(first.state_dict()) == ["runtime_quarantine"]
    resumed = QuarantineList(SCAN)
    resumed.load_state_dict(progress)
    resumed.start(tmp_path)
    assert [e["path"] for e in lines(tmp_path / "quarantine.jsonl")] == ["a/1.jpg", "b/2.jpg"]
    assert resumed.set_aside_files("train") == {"b/2.jpg"}


def test_a_list_not_started_writes_no_file(tmp_path):
    # Ranks other than 0 gather (a collective) but keep no file.
    quarantine = QuarantineList([])
    quarantine.watch(SetsAside({"path": "b/2.jpg", "reason": "decode error", "found": "runtime"}))
    assert len(quarantine.gather()) == 1
    assert list(tmp_path.iterdir()) == []
