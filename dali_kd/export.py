"""`python -m dali_kd.export`: the command lives in dali_kd/commands/export.py; this name keeps the documented one."""

from dali_kd.commands.export import main

if __name__ == "__main__":
    raise SystemExit(main())
