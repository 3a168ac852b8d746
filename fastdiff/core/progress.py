"""Progress for long work: one diffusers bar over a whole job, the pipeline's own per-call bars
silenced meanwhile, so a calibration or an evaluation reads as one task with one ETA."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.utils.logging import tqdm

__all__ = ["all_bars_off", "pipeline_bar_off", "plural", "progress_bar", "times_sign"]


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A diffusers tqdm bar on stderr: it obeys ``diffusers.utils.logging.disable_progress_bar()``
    like the pipelines' own bars, and shows on rank 0 only (other ranks would interleave theirs)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    on_rank_zero = not distributed or torch.distributed.get_rank() == 0
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not (enabled and on_rank_zero))


@contextlib.contextmanager
def all_bars_off(off: bool = True) -> Iterator[None]:
    """Every diffusers bar off for the duration (diffusers' own global switch), for work whose
    bars a caller cannot reach by argument, e.g. a calibration run by ``Method.prepare``."""
    from diffusers.utils import logging as diffusers_logging

    was_enabled = diffusers_logging.is_progress_bar_enabled()
    if off:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()


def times_sign() -> str:
    """The multiplication sign where stderr can print it: a stream limited to ASCII would raise
    on it mid-run."""
    try:
        "×".encode(getattr(sys.stderr, "encoding", None) or "ascii")
    except (LookupError, UnicodeEncodeError):
        return "x"
    return "×"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@contextlib.contextmanager
def pipeline_bar_off(pipe: Any) -> Iterator[None]:
    """Silence ``pipe``'s per-call bar while an outer bar reports the whole job, then give the
    user back their configuration object itself (or none, if they never set one), error or not."""
    had_config = "_progress_bar_config" in vars(pipe)
    saved = vars(pipe).get("_progress_bar_config")
    options = dict(saved) if isinstance(saved, dict) else {}
    pipe.set_progress_bar_config(**{**options, "disable": True})
    try:
        yield
    finally:
        if had_config:
            pipe._progress_bar_config = saved
        else:
            vars(pipe).pop("_progress_bar_config", None)
