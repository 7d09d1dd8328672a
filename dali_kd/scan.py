"""`python -m dali_kd.scan`: the command lives in dali_kd/commands/scan.py; this name keeps the documented one."""

from dali_kd.commands.scan import main

if __name__ == "__main__":
    raise SystemExit(main())
