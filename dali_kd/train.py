"""`python -m dali_kd.train`: the command lives in dali_kd/commands/train.py; this name keeps the documented one."""

if __name__ == "__main__":
    # Before anything else is imported, a stop signal is recorded rather than fatal; main() acts on it once the
    # imports are done. The program's own handler: main() passes a stop signal back to it, and the process exits
    # with main()'s code.
    from dali_kd.runs.preemption import StopSignal

    _SIGNALS_DURING_IMPORTS = StopSignal()

from dali_kd.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
