"""Round statistics for the round-trip benchmarks: medians with their spread, and a
refusal to print a figure the noise swamps.

Every benchmark takes many short rounds inside one process run (the guest times its
own loops), so a round disturbed by other load on the host is one outlier among many.
A figure is the median of its rounds, with the interquartile range as its spread; a
figure whose spread is larger than its signal is reported as noise, never as a number.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """Median of per-round values and the quartiles around it (same unit)."""

    median: float
    q1: float
    q3: float
    rounds: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Figure:
        if not samples:
            raise ValueError("a figure needs at least one round")
        values = sorted(samples)
        if len(values) < 4:
            return cls(statistics.median(values), values[0], values[-1], len(values))
        q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(q2, q1, q3, len(values))

    @property
    def spread(self) -> float:
        return self.q3 - self.q1

    def trustworthy(self, signal: float | None = None) -> bool:
        """Spread no larger than the signal (the figure itself unless given), and positive."""
        s = self.median if signal is None else signal
        return self.median > 0 and s > 0 and self.spread <= s

    def __truediv__(self, other: Figure) -> Figure:
        """Ratio of two independent figures; the spread covers the worst pairing of quartiles."""
        return Figure(self.median / other.median, self.q1 / other.q3, self.q3 / other.q1, min(self.rounds, other.rounds))


def ratios(a: Sequence[float], b: Sequence[float]) -> Figure:
    """Per-round ratios a[i] / b[i] of two series measured in the same rounds."""
    return Figure.of([x / y for x, y in zip(a, b, strict=True) if y > 0])


def show(fig: Figure, fmt: str = "{:.2f}", scale: float = 1.0, signal: float | None = None) -> str:
    """``median (q1..q3)``, or a plain statement that the figure is noise."""
    if not fig.trustworthy(signal):
        return f"too noisy to report (median {fmt.format(fig.median * scale)}, spread {fmt.format(fig.spread * scale)})"
    return f"{fmt.format(fig.median * scale)} ({fmt.format(fig.q1 * scale)}..{fmt.format(fig.q3 * scale)})"
