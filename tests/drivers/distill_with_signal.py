"""Runs `dali_kd.distill` in this process and sends this process SIGTERM before step 2 (through a callback), as
`timeout` or a job scheduler would during a script's run; this program's own SIGTERM disposition is `handler` (a
Python handler that says it ran) or `default` (SIG_DFL: the process ends by the signal).

    python tests/drivers/distill_with_signal.py handler|default -- <KEY=VALUE overrides>

Exit 3: distill raised Preempted (after the program's handler ran); 0: distill returned.
"""

from __future__ import annotations

import os
import signal
import sys

import dali_kd


class TermBeforeStep2(dali_kd.Callback):
    def on_step(self, trainer, batch):
        if trainer.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    disposition, overrides = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    if disposition == "handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: print("the program's handler ran", flush=True))
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    config = dali_kd.load_config(overrides=overrides)
    try:
        dali_kd.distill(config, progress="lines", callbacks=[TermBeforeStep2()])
    except dali_kd.Preempted as e:
        print(f"distill raised Preempted: {e}", flush=True)
        return 3
    print("distill returned", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
