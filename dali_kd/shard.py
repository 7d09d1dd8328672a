"""`python -m dali_kd.shard`: the command lives in dali_kd/commands/shard.py; this name keeps the documented one."""

from dali_kd.commands.shard import main

if __name__ == "__main__":
    raise SystemExit(main())
