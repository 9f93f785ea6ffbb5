"""Summaries of repeated measurements, and the order runs are taken in.

Every figure the suite reports is the median of several runs with its spread
(the quartiles, and the extremes). Runs of the compared subjects are
interleaved, round by round and in a rotating order, so that drift on a shared
machine (another job starting, the CPU clocking down) hits all of them alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def summary(values: Sequence[float]) -> dict[str, Any]:
    """median, quartiles, extremes and the runs themselves (JSON-ready)."""
    if not values:
        raise ValueError("no runs to summarise")
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3,
            "min": ordered[0], "max": ordered[-1], "runs": list(values)}


def percentiles(values: Sequence[float]) -> dict[str, Any]:
    """p50, p90, p99 (interpolated between the values around each) and the extremes, and
    the values themselves (JSON-ready)."""
    if not values:
        raise ValueError("no values to take percentiles of")
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) >= 2 else [ordered[0]] * 99
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "min": ordered[0], "max": ordered[-1],
            "count": len(ordered), "runs": [round(v, 2) for v in values]}


def interleaved(rounds: int, subjects: Sequence[T]) -> list[tuple[int, T]]:
    """(round, subject) in the order to measure: each round takes every subject
    once, starting one further along than the round before."""
    order: list[tuple[int, T]] = []
    count = len(subjects)
    for r in range(rounds):
        order += [(r, subjects[(r + i) % count]) for i in range(count)]
    return order


def ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
    """The ratio of two summaries' medians (0 when the denominator is 0)."""
    below = float(denominator["median"])
    return float(numerator["median"]) / below if below else 0.0
