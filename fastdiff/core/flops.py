"""The one FLOP counter every count in fastdiff uses: the Ledger's, the benchmark's, the harness's.

torch's FlopCounterMode counts every matmul, convolution and attention by its shape. Its
per-module breakdown is switched off: only totals are read, and the breakdown's module tracker
hooks every module's forward and walks the module tree by name, which loops forever on the
cyclic module graphs some caches build (cache-dit).
"""

from __future__ import annotations

from typing import Any

from torch.utils.flop_counter import FlopCounterMode


class _NoModuleBreakdown:
    """Stands in for FlopCounterMode's module tracker: every count goes to the total only."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModuleBreakdown:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def total_flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False, depth=0)
    counter.mod_tracker = _NoModuleBreakdown()  # type: ignore[assignment]
    return counter
