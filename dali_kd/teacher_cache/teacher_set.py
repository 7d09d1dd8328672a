"""The teachers a teacher cache was built for, as its header names them, and which of them another run's set changes.

One teacher's cache names it as today's caches do (header keys teacher, teacher_input and num_classes); a cache of
several names each under "teachers": its key, its id (model name and weights hash), its own input where that differs
from the views' (size, normalisation) and its classes. A cache is refused when the set differs; the message names
the teacher that was added, removed or changed.
"""

from __future__ import annotations

from typing import Any

# The header keys that say which teacher one teacher's cache was built for.
ONE_TEACHER_KEYS = ("teacher", "teacher_input", "num_classes")


def teacher_entries(header: dict[str, Any]) -> list[dict[str, Any]]:
    """Each teacher the header names, as {key, teacher, input?, num_classes} (one teacher's: key None)."""
    if isinstance(header.get("teachers"), list):
        return [entry if isinstance(entry, dict) else {} for entry in header["teachers"]]
    entry: dict[str, Any] = {
        "key": None,
        "teacher": header.get("teacher"),
        "num_classes": header.get("num_classes"),
    }
    if "teacher_input" in header:
        entry["input"] = header["teacher_input"]
    return [entry]


def _label(entry: dict[str, Any]) -> str:
    teacher = entry.get("teacher")
    name = teacher.get("name") if isinstance(teacher, dict) else teacher
    key = entry.get("key")
    return f"teacher {key} ({name})" if key else f"teacher {name}"


def _content(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "key"}


def _what_differs(old: dict[str, Any], new: dict[str, Any]) -> str:
    old_id, new_id = old.get("teacher") or {}, new.get("teacher") or {}
    if isinstance(old_id, dict) and isinstance(new_id, dict) and old_id.get("name") != new_id.get("name"):
        return f"was {old_id.get('name')}"
    if old_id != new_id:
        return "its weights differ"
    if old.get("input") != new.get("input"):
        return "its input size or normalisation differs"
    return "its classes differ"


def teacher_set_change(existing: dict[str, Any], header: dict[str, Any]) -> str | None:
    """What makes the cache's teachers (`existing`, its header) another set than this run's (`header`), naming the
    first teacher added, removed or changed; None where the sets agree or both are one teacher (whose change the
    header's key names, as it always has)."""
    if "teachers" not in existing and "teachers" not in header:
        return None
    old, new = teacher_entries(existing), teacher_entries(header)
    if old == new:
        return None
    old_by_key = {e.get("key"): e for e in old}
    old_contents = [_content(e) for e in old]
    for entry in new:
        before = old_by_key.get(entry.get("key"))
        if before is not None and entry.get("key") is not None and _content(before) != _content(entry):
            return f"{_label(entry)} changed: {_what_differs(before, entry)}"
    for entry in new:
        if entry.get("key") not in old_by_key and _content(entry) not in old_contents:
            return f"{_label(entry)} is not in it"
    new_contents = [_content(e) for e in new]
    new_keys = {e.get("key") for e in new}
    for entry in old:
        if entry.get("key") not in new_keys and _content(entry) not in new_contents:
            return f"it holds {_label(entry)}, which this run does not have"
    return f"it holds the teachers {', '.join(_label(e) for e in old)} in another order or under other keys"
