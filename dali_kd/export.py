"""`python -m dali_kd.export`: the command lives in dali_kd/commands/export.py; this name keeps the documented one.
load_with_heads: read back an export written with --format safetensors --heads."""

from dali_kd.commands.export import main
from dali_kd.commands.export_heads import load_with_heads

__all__ = ["load_with_heads", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
