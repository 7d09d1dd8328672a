"""Loading a config: three YAML files, presets over them, then KEY=VALUE overrides, validated; the first problem
becomes one `UserError` line naming where it was set and the dotted key(s), with a did-you-mean for typos."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dali_kd.config.files import CONFIG_DIR, DEMO_CONFIG_DIR, SECTION_FILES
from dali_kd.config.own_data import own_data_changes
from dali_kd.config.presets import find_preset
from dali_kd.config.schema import Config, ConfigConflict
from dali_kd.config.section import section_type
from dali_kd.errors import UserError

OWN_DATA_DOC = "docs/data.md, Your own images"


def _did_you_mean(model: type[BaseModel] | None, key: str) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The schema class that holds the key at `path` (to suggest its real field names)."""
    model: Any = Config
    for part in path[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        section = None if field is None else section_type(field.annotation)
        if section is None:
            return None
        model = section
    return model


def _source(key: str, sources: dict[str, str]) -> str:
    """Where a dotted key was set: the command line, or the file of its section (the longest known prefix wins)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if (where := sources.get(".".join(parts[:end]))) is not None:
            return where
    return "config"


def _shown(value: Any) -> str:
    """A wrong value as the error line quotes it, a long one cut short so that the line stays one line."""
    said = repr(value)
    return said if len(said) <= 120 else f"{said[:100]}… ({len(said):,} characters)"


def _describe(error: Mapping[str, Any], sources: dict[str, str]) -> str:
    loc = tuple(error["loc"])
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ConfigConflict):
        # A rule over several keys: the message names them all; say where each was set.
        places = dict.fromkeys(_source(k, sources) for k in cause.keys)
        return f"{' and '.join(places)}: {cause}" if places else str(cause)
    if not loc:
        return error["msg"].removeprefix("Value error, ")
    key = ".".join(str(p) for p in loc)
    where = _source(key, sources)
    if error["type"] == "extra_forbidden":
        # An override under an unknown key (train.optimzer.lr=1) made that key: it comes from the command line.
        if any(k.startswith(f"{key}.") and v == "command line" for k, v in sources.items()):
            where = "command line"
        what = f"unknown key{_did_you_mean(_model_at(loc), str(loc[-1]))}"
    elif error["type"] == "missing":
        what = "required key is missing"
    else:
        msg = error["msg"].removeprefix("Value error, ")
        what = f"{msg} (got {_shown(error['input'])})" if not isinstance(error["input"], dict) else msg
    return f"{where}: {key}: {what}"


class DuplicateKey(yaml.MarkedYAMLError):
    """A key given twice in one mapping (plain YAML keeps the last one without a word)."""


class TooLarge(yaml.MarkedYAMLError):
    """YAML nested too deep, or whose aliases expand past what any config holds (a "billion laughs")."""


# A config is a few levels deep and a few hundred values; these leave room for any real one and refuse, in well
# under a second, what would exhaust Python's stack or expand aliases into billions of values.
MAX_DEPTH = 64
MAX_VALUES = 100_000


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Count the values a document holds with every alias expanded, without expanding them (each anchored node's
    count is kept), so that a few hundred bytes of nested aliases cannot become billions of values later."""
    counts: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes being counted: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_counted = stack.pop()
        if children_counted:
            counts[id(node)] = 1 + sum(counts[id(child)] for child in _children(node))
            open_nodes.discard(id(node))
            if counts[id(node)] > MAX_VALUES:
                raise TooLarge(
                    problem=f"its aliases expand to more than {MAX_VALUES:,} values (a config holds a few hundred)",
                    problem_mark=node.start_mark,
                )
        elif id(node) in open_nodes:
            raise TooLarge(
                problem="an alias inside its own anchor: a value that holds itself",
                problem_mark=node.start_mark,
            )
        elif id(node) not in counts:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice, nesting deeper than MAX_DEPTH and aliases
    that expand past MAX_VALUES values (both checked while composing, before anything is built)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise TooLarge(
                    problem=f"nested more than {MAX_DEPTH} levels deep (a config is a few)",
                    problem_mark=self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self) -> yaml.Node:
        root = super().compose_document()
        _check_expansion(root)
        return root

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a merged key is what merging is for
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if seen is not None:
                raise DuplicateKey(
                    problem=f"key '{key}' appears twice (first on line {seen + 1})",
                    problem_mark=key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain values only


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.batch_size=64` → (['train', 'batch_size'], 64); the value is read as YAML (null, true, [1, 2])."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(
            f"command line: '{item}': expected KEY=VALUE with a dotted key such as train.batch_size=64"
        )
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except (DuplicateKey, TooLarge) as e:
        raise UserError(f"command line: '{item}': {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"command line: '{item}': value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def _parse_file(path: Path) -> Any:
    """A YAML file's contents (anything, None for an empty file); unreadable, not UTF-8 or not YAML: a UserError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); a config file is YAML saved as UTF-8"
        ) from None
    try:
        data = _load_yaml(text)
    except (DuplicateKey, TooLarge) as e:
        raise UserError(f"{path}: line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{at} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    data = _parse_file(path)
    if data is None:
        # An empty file would silently mean "all defaults" (and a missing data.root further on): say so here.
        raise UserError(
            f"{path}: no settings in the file (empty or only comments); a config file holds its section's keys "
            f"(examples: {CONFIG_DIR})"
        )
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def read_preset(path: Path) -> dict[str, dict[str, Any]]:
    """A preset file: top-level sections among data/train/model, each a mapping of the keys it sets (nested as in
    the section files); anything else is one UserError naming the file."""
    data = _parse_file(path)
    if data is None:
        raise UserError(
            f"{path}: no settings in the preset (empty or only comments); a preset holds sections data:, train: "
            "or model: with the keys it sets, e.g. data: {augment: {mix: mixup}}"
        )
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (data:, train:, model:) at the top level")
    for section, keys in data.items():
        if section not in SECTION_FILES:
            close = difflib.get_close_matches(str(section), list(SECTION_FILES), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(
                f"{path}: unknown section '{section}' ({hint}a preset holds data:, train: and/or model:)"
            )
        if not isinstance(keys, dict) or not keys:
            raise UserError(
                f"{path}: {section}: expected a mapping of the {section} keys the preset sets (got {keys!r})"
            )
    return data


def _apply_preset(node: dict[str, Any], keys: dict[str, Any], prefix: str, where: str, sources: dict) -> None:
    """Deep-merge a preset's keys into the raw config: a mapping merges into the section below it, a value
    replaces; every key it sets (and every section it makes) is recorded as set by `where`, so an error in it
    names the preset."""
    for key, value in keys.items():
        dotted = f"{prefix}.{key}"
        if isinstance(value, dict):
            child = node.get(key)
            if not isinstance(child, dict):
                # A section the preset made (or a value it turned into one) is the preset's: an unknown
                # section's error names the preset, not the file.
                child = node[key] = {}
                sources[dotted] = where
            _apply_preset(child, value, dotted, where, sources)
        else:
            node[key] = value
            sources[dotted] = where


def load_config(
    data_config: Path | None = None,
    train_config: Path | None = None,
    model_config: Path | None = None,
    overrides: Sequence[str] = (),
    config_dir: Path = DEMO_CONFIG_DIR,
    presets: Sequence[str | Path] = (),
) -> Config:
    """Read the three files (a missing flag takes the file of that name in config_dir), then each preset in order
    (a path, or a name in configs/presets), then the overrides, which win; validate. With a data.root other than
    the demo's, the demo's val folder and teacher give way (dali_kd.config.own_data)."""
    paths = {
        "data": Path(data_config) if data_config else config_dir / SECTION_FILES["data"],
        "train": Path(train_config) if train_config else config_dir / SECTION_FILES["train"],
        "model": Path(model_config) if model_config else config_dir / SECTION_FILES["model"],
    }
    raw: dict[str, Any] = {section: read_yaml(path) for section, path in paths.items()}
    sources: dict[str, str] = {section: str(path) for section, path in paths.items()}
    for preset in presets:
        path = find_preset(preset)
        for section, preset_keys in read_preset(path).items():
            _apply_preset(raw[section], preset_keys, section, str(path), sources)
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] not in raw:
            raise UserError(
                f"command line: {'.'.join(keys)}: unknown section '{keys[0]}' (expected data., train. or model.)"
            )
        _set_key(raw, keys, value, "command line")
        sources[".".join(keys)] = "command line"
    return _with_own_data(_validate(raw, sources), raw, sources, paths["model"])


def _set_key(raw: dict[str, Any], keys: list[str], value: Any, where: str) -> None:
    """Set raw[k0][k1]... = value, making missing sections; a whole number steps into a list's entry (the second
    teacher's checkpoint: model.teachers.1.checkpoint)."""
    node: Any = raw
    for depth, part in enumerate(keys):
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise UserError(
                    f"{where}: {'.'.join(keys)}: {'.'.join(keys[: depth + 1])}: the list "
                    f"{'.'.join(keys[:depth])} has entries 0 to {len(node) - 1}"
                )
            child = node[int(part)]
        else:
            child = node.get(part)
        if depth == len(keys) - 1:
            break
        if child is None:
            child = {}
            if isinstance(node, list):
                node[int(part)] = child
            else:
                node[part] = child
        elif not isinstance(child, dict | list):
            raise UserError(f"{where}: {'.'.join(keys)}: {'.'.join(keys[: depth + 1])} is not a section")
        node = child
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def _with_own_data(cfg: Config, raw: dict[str, Any], sources: dict[str, str], model_file: Path) -> Config:
    """cfg, or (a data.root other than the demo's) cfg without the demo's val folder and teacher."""
    explicit = {key for key in sources if "." in key}  # set on the command line or by a preset
    changes = own_data_changes(cfg, explicit, explicit | set(_dotted_keys(raw)), model_file)
    if not changes:
        return cfg
    for key, value in changes.items():
        where = f"for a data.root other than the demo's ({OWN_DATA_DOC})"
        _set_key(raw, key.split("."), value, where)
        sources[key] = where
    return _validate(raw, sources)


def _dotted_keys(node: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _validate(raw: dict[str, Any], sources: dict[str, str]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        # A typo also makes the real key "missing": report the typo, which explains both.
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise UserError(_describe(errors[0], sources)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (tuples written as lists), as written into the run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def load_config_file(path: Path) -> Config:
    """A resolved config as a run directory keeps it (config.yaml: the three sections in one file), validated by
    the same rules as load_config."""
    raw = read_yaml(path)
    return _validate(raw, {section: str(path) for section in raw})
