"""A mergeable latency sketch: log-spaced buckets with a bounded relative error (DDSketch's idea).

Why: percentiles across traces must come from all the traces' values, not from averaging
each trace's percentiles, yet shipping every latency of a 100 M-event fleet to one place
would make memory grow with the fleet. A value ``v >= 1`` ns falls in bucket
``ceil(log(v) / log(GAMMA))``; every value of bucket ``i`` is within ``ALPHA`` (relative)
of the bucket's representative ``2 GAMMA^i / (GAMMA + 1)``. Merging sketches is adding
bucket counts (exact, order-free), so the local and the Dask paths give the same numbers.
A percentile read from the merged sketch is the representative of the bucket holding the
value of that rank, so it is within ``ALPHA`` of the exact value of that rank (plus 1 ns
of rounding). Zero latencies have their own bucket (value 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import polars as pl

__all__ = ["ALPHA", "GAMMA", "bucket_expr", "quantile_rank", "quantiles"]

#: Relative error of a sketch percentile (0.5 %).
ALPHA = 0.005
GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
ZERO_BUCKET = -(2**31)


def bucket_expr(col: str) -> pl.Expr:
    """The bucket of each value of ``col`` (Int32; nulls stay null)."""
    c = pl.col(col)
    return (
        pl.when(c <= 0)
        .then(pl.lit(ZERO_BUCKET, pl.Int32))
        .otherwise((c.cast(pl.Float64).log() / _LOG_GAMMA).ceil().cast(pl.Int32))
        .alias("bucket")
    )


def representative(bucket: int) -> float:
    if bucket == ZERO_BUCKET:
        return 0.0
    return 2 * GAMMA**bucket / (GAMMA + 1)


def quantile_rank(q: float, n: int) -> int:
    """0-based rank of the ``q`` percentile among ``n`` sorted values: ``floor(q (n - 1) + 0.5)``."""
    return min(n - 1, max(0, math.floor(q * (n - 1) + 0.5)))


def quantiles(buckets: Sequence[int], counts: Sequence[int], qs: Sequence[float]) -> list[int | None]:
    """Percentiles ``qs`` of the merged distribution given as (bucket, count) pairs, in ns."""
    pairs = sorted((b, c) for b, c in zip(buckets, counts, strict=True) if c)
    n = sum(c for _, c in pairs)
    if n == 0:
        return [None for _ in qs]
    out: list[int | None] = []
    for q in qs:
        rank = quantile_rank(q, n)
        seen = 0
        for b, c in pairs:
            seen += c
            if seen > rank:
                out.append(round(representative(b)))
                break
    return out
