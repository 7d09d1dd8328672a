"""`python -m dali_kd.report`: the command lives in dali_kd/commands/report.py; this name keeps the documented one."""

from dali_kd.commands.report import main

if __name__ == "__main__":
    raise SystemExit(main())
