"""`python -m dali_kd.tune`: the command lives in dali_kd/commands/tune.py; this name keeps the documented one."""

from dali_kd.commands.tune import main

if __name__ == "__main__":
    raise SystemExit(main())
