"""The config files that ship with the package: the folder of the three section files, the demo's, and each
section's file name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# The config files ship inside the package (dali_kd/configs links to the repository's configs/ folder, and a wheel
# carries copies), so a plain `pip install` finds them as an editable install does.
CONFIG_DIR = Path(str(resources.files("dali_kd").joinpath("configs"))).resolve()
DEMO_CONFIG_DIR = CONFIG_DIR / "demo"
SECTION_FILES = {"data": "data_config.yaml", "train": "train_config_kd.yaml", "model": "model_config_kd.yaml"}
