"""Presets: YAML files that set a few keys of a recipe (e.g. function matching) over the three config files; this
module finds them by path or by name (configs/presets/<name>.yaml) and says which ones exist."""

from __future__ import annotations

from pathlib import Path

from dali_kd.config.files import CONFIG_DIR
from dali_kd.errors import UserError

PRESET_DIR = CONFIG_DIR / "presets"


def available_presets(preset_dir: Path = PRESET_DIR) -> list[str]:
    """The names `--preset NAME` accepts: the .yaml files in preset_dir, without the suffix."""
    return sorted(p.stem for p in preset_dir.glob("*.yaml")) if preset_dir.is_dir() else []


def find_preset(name_or_path: str | Path, preset_dir: Path = PRESET_DIR) -> Path:
    """A preset file: the path itself when it is a file, else (a bare name such as `function_matching`) the file
    of that name in preset_dir. A file that is in neither place is one UserError naming it; a name that is not
    found lists the names that are."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    # A bare name (no folder in it) may be a shipped preset; anything with a folder is a path the user meant.
    if path.parent == Path(".") and text not in ("", ".", ".."):
        shipped = preset_dir / (text if path.suffix in (".yaml", ".yml") else f"{text}.yaml")
        if shipped.is_file():
            return shipped
        names = ", ".join(available_presets(preset_dir)) or "none"
        raise UserError(
            f"--preset {text}: no such file, and no preset named '{path.stem}' in {preset_dir} "
            f"(available: {names})"
        )
    raise UserError(f"preset file not found: {path}")
