"""DALI graphs for dali_kd: readers, decode, the four augmentations and view replay.

This package imports nvidia.dali and numpy only — never torch and never dali_kd — so the graphs can be
reused, tested and benchmarked on their own.
"""

from pipelines.params import AugmentParams, EvalParams

__all__ = ["AugmentParams", "EvalParams"]
