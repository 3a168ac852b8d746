"""From per-block change profiles to per-block compute/reuse schedules.

Pure functions on numbers, so the rule can be checked by hand: a block computes at step 0;
afterwards it keeps reusing its last computed output while the change it would have seen,
summed step by step since that computation, stays at or below the threshold δ; the step at
which the sum exceeds δ computes again and the sum restarts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..core.plan import Decision


def schedule_row(change: Sequence[float], threshold: float) -> tuple[Decision, ...]:
    """``change[t]``: the block's relative change from step t-1 to t (``change[0]`` is ignored)."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    row = [Decision.COMPUTE]
    accumulated = 0.0
    for value in change[1:]:
        accumulated += float(value)
        if accumulated > threshold:
            row.append(Decision.COMPUTE)
            accumulated = 0.0
        else:
            row.append(Decision.REUSE)
    return tuple(row)


def schedule_from_changes(changes: Mapping[str, Sequence[float]], threshold: float) -> dict[str, tuple[Decision, ...]]:
    return {module: schedule_row(change, threshold) for module, change in changes.items()}


def kept_fraction(rows: Mapping[str, Sequence[Decision]], weights: Mapping[str, float] | None = None) -> float:
    """Share of block evaluations that compute (weighted, e.g. by each block's FLOPs)."""
    total = kept = 0.0
    for module, row in rows.items():
        w = 1.0 if weights is None else float(weights.get(module, 0.0))
        total += w * len(row)
        kept += w * sum(d is Decision.COMPUTE for d in row)
    return kept / total if total else 1.0


def threshold_for_budget(changes: Mapping[str, Sequence[float]], budget: float,
                         weights: Mapping[str, float] | None = None) -> float:
    """The smallest δ whose schedule keeps at most ``budget`` of the block evaluations.

    The kept share only falls as δ grows, so bisection finds it; a budget below what computing
    only step 0 costs cannot be met and is refused.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    if not changes:
        raise ValueError("budget: no block change profile to choose a threshold from")
    steps = len(next(iter(changes.values())))
    high = max(sum(float(v) for v in change[1:]) for change in changes.values()) + 1.0
    floor = kept_fraction(schedule_from_changes(changes, high), weights)
    if budget < floor - 1e-12:
        raise ValueError(
            f"budget={budget} is below {floor:.4f}, the share kept when every block computes only at step 0 "
            f"of {steps}; allowed: [{floor:.4f}, 1]"
        )
    low = 0.0
    for _ in range(100):
        mid = (low + high) / 2
        if mid <= 0:
            break
        if kept_fraction(schedule_from_changes(changes, mid), weights) <= budget:
            high = mid
        else:
            low = mid
    return high
