"""The training loop and what it is made of: the parts built in resume order (build.py), the loop (trainer.py), the
distillation step's forward and losses (task.py, losses.py), the optimiser and schedule (optim.py), the student's
moving average (ema.py), the NaN guard (nonfinite.py), the run's counters (run_state.py), when and what to
checkpoint (checkpointer.py), the run directory's other files (run_files.py) and the hooks (callbacks.py)."""
