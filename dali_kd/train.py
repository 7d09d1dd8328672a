"""`python -m dali_kd.train`: the command lives in dali_kd/commands/train.py; this name keeps the documented one."""

if __name__ == "__main__":
    # Before anything else is imported, a stop signal is recorded rather than fatal; main() acts on it once the
    # imports are done. The program's own handler: main() passes a stop signal back to it, and the process exits
    # with main()'s code.
    try:
        from dali_kd.runs.preemption import RUN_SIGNALS, StopSignal

        _SIGNALS_DURING_IMPORTS = StopSignal(RUN_SIGNALS)
    except KeyboardInterrupt:  # Ctrl-C in the few milliseconds before that handler is in place
        import sys

        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None

from dali_kd.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
