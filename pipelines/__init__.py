"""DALI graphs for dali_kd: readers, decode, the four augmentations and view replay.

This package imports nvidia.dali and numpy only — never torch and never dali_kd — so the graphs can be
reused, tested and benchmarked on their own.
"""

from pipelines.params import AugmentParams, EvalParams

__all__ = ["PIPELINE_VERSION", "AugmentParams", "EvalParams"]

# Bumped whenever the graphs render a view differently: caches of teacher outputs per view depend on it.
PIPELINE_VERSION = 1
