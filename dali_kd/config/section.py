"""What every config section shares: unknown keys and non-finite floats refused, the marker for the keys a resumed
run may change (`free_on_resume`: how the run is observed, not what it computes), and the value types of ranges and
colours."""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

FloatRange = tuple[float, float]
RGB = tuple[float, float, float]


def free_on_resume(default: Any, **kwargs: Any) -> Any:
    """A Field that a resumed run may change freely: it changes how the run is observed, not what it does."""
    return Field(default, json_schema_extra={"resume": "free"}, **kwargs)


class Section(BaseModel):
    # extra="forbid": a typo is an error, never a silently ignored key. allow_inf_nan=False: no float setting
    # (rates, weights, probabilities, ranges, normalisation) means anything at .inf or .nan.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds: `Section`, or the `Section` of an optional one (`Section | None`); None for
    a leaf value (a list of sections, model.teachers, is a leaf: its entries take the keys of model.teacher)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
