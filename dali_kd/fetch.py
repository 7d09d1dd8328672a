"""`python -m dali_kd.fetch`: the command lives in dali_kd/commands/fetch.py; this name keeps the documented one."""

from dali_kd.commands.fetch import main

if __name__ == "__main__":
    raise SystemExit(main())
