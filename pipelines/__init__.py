"""DALI graphs for dali_kd: readers, decode, the four augmentations and view replay.

It lives at the top of the checkout and ships as `dali_kd.pipelines` (dali_kd/pipelines links here). It imports
nvidia.dali and numpy only — never torch and no other part of dali_kd — so the graphs can be reused, tested and
benchmarked on their own (tests/test_package_boundaries.py holds it to that).
"""

from dali_kd.pipelines.params import AugmentParams, EvalParams

__all__ = ["PIPELINE_VERSION", "AugmentParams", "EvalParams"]

# Bumped whenever the graphs render a view differently: caches of teacher outputs per view depend on it.
PIPELINE_VERSION = 1
