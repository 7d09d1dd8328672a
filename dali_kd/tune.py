"""`python -m dali_kd.tune`: the command lives in dali_kd/commands/tune.py; this name keeps the documented one."""

if __name__ == "__main__":
    # As for train: a stop signal is recorded from the first line on, main() acts on it once the imports are done.
    try:
        from dali_kd.runs.preemption import RUN_SIGNALS, StopSignal

        _SIGNALS_DURING_IMPORTS = StopSignal(RUN_SIGNALS)
    except KeyboardInterrupt:  # Ctrl-C in the few milliseconds before that handler is in place
        import sys

        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None

from dali_kd.commands.tune import main

if __name__ == "__main__":
    raise SystemExit(main())
