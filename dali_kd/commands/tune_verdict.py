"""What `python -m dali_kd.tune` concludes from its timings, and how far their noise lets it: the candidates, the
noise, which settings the timings tell apart, the table.

The noise is the largest spread between the repeats of any one setting (max - min over median), at least 1%. Two
settings are told apart only where their medians differ by more than the noise and their repeats do not overlap;
otherwise the verdict is "within noise: can't tell X from Y", never a winner.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

MIN_NOISE_PCT = 1.0


@dataclass
class Candidate:
    """One setting to time: its overrides over the user's config (none: the defaults); note: why it is not run."""

    name: str
    overrides: list[str]
    note: str | None = None
    ms: list[float] = field(default_factory=list)

    @property
    def ms_per_step(self) -> float | None:
        return statistics.median(self.ms) if self.ms else None

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: how much the same setting varied."""
        return (max(self.ms) - min(self.ms)) / statistics.median(self.ms) if len(self.ms) > 1 else 0.0


def noise_pct(candidates: list[Candidate]) -> float:
    spreads = [c.spread for c in candidates if len(c.ms) > 1]
    return max([100 * s for s in spreads] + [MIN_NOISE_PCT])


def change_pct(reference: Candidate, other: Candidate) -> float:
    """other's ms/step against reference's, in percent (negative: other is faster)."""
    ref, ms = reference.ms_per_step, other.ms_per_step
    assert ref is not None and ms is not None  # both timed
    return 100 * (ms - ref) / ref


def told_apart(reference: Candidate, other: Candidate, noise: float) -> bool:
    """Whether the timings tell the two settings apart: medians further apart than the noise, and no repeat of
    one inside the range of the other's."""
    overlap = min(other.ms) <= max(reference.ms) and min(reference.ms) <= max(other.ms)
    return abs(change_pct(reference, other)) > noise and not overlap


def verdict(reference: Candidate, other: Candidate, noise: float) -> str:
    """One line: other against reference, or that the noise cannot tell them apart."""
    change = change_pct(reference, other)
    if not told_apart(reference, other, noise):
        return f"within noise: can't tell {other.name} from {reference.name} ({change:+.1f}%, noise {noise:.1f}%)"
    word = "faster" if change < 0 else "slower"
    return f"{other.name}: {abs(change):.1f}% {word} than {reference.name} (beyond the {noise:.1f}% noise)"


def _faster_by_key(candidates: list[Candidate], noise: float) -> dict[str, list[Candidate]]:
    """Per key, the single-override candidates told apart from the defaults (candidates[0]) as faster, fastest
    first."""
    base = candidates[0]
    faster: dict[str, list[Candidate]] = {}
    for c in candidates[1:]:
        if c.ms_per_step is None or len(c.overrides) != 1:
            continue
        if change_pct(base, c) < 0 and told_apart(base, c, noise):
            faster.setdefault(c.overrides[0].partition("=")[0], []).append(c)
    return {key: sorted(found, key=lambda c: c.ms_per_step or 0.0) for key, found in faster.items()}


def fastest_overrides(candidates: list[Candidate], noise: float) -> list[str]:
    """Per key, the fastest value told apart from the defaults (candidates[0]) as faster."""
    return [found[0].overrides[0] for found in _faster_by_key(candidates, noise).values()]


def verdict_lines(candidates: list[Candidate], noise: float) -> list[str]:
    """Each timed option against the defaults (candidates[0]); where two values of one key both beat the defaults
    but not each other, that too: the faster one is then chosen without being told apart."""
    base = candidates[0]
    lines = [verdict(base, c, noise) for c in candidates[1:] if c.ms_per_step is not None]
    for found in _faster_by_key(candidates, noise).values():
        lines += [
            verdict(found[0], other, noise) for other in found[1:] if not told_apart(found[0], other, noise)
        ]
    return lines


def table(candidates: list[Candidate], batch_size: int) -> str:
    base = candidates[0].ms_per_step
    lines = ["| option | ms/step | Δ vs defaults | img/s | repeats (ms) |", "|---|---|---|---|---|"]
    for c in candidates:
        ms = c.ms_per_step
        if ms is None:
            lines.append(f"| {c.name} | — | — | — | {(c.note or '').replace('|', '/')} |")
            continue
        delta = "—" if c is candidates[0] or not base else f"{100 * (ms - base) / base:+.1f}%"
        lines.append(
            f"| {c.name} | {ms:.2f} | {delta} | {1000 * batch_size / ms:.1f} | "
            f"{', '.join(f'{m:.2f}' for m in c.ms)} |"
        )
    return "\n".join(lines)
