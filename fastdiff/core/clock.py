"""Where a pipeline call is: step index, timestep and step count.

The step advances when the pipeline calls ``scheduler.step`` — the one event every denoising
loop has exactly once per iteration — so two denoiser calls in one iteration (unbatched
guidance) share a step, and repeated timesteps (second-order schedulers) do not confuse it.
Looking the timestep up in ``scheduler.timesteps`` would break on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StepClock:
    """Mutable position inside the current pipeline call; inactive between calls."""

    active: bool = False
    call_index: int = -1
    step: int = 0
    num_steps: int | None = None
    timestep: Any = None
    denoiser_calls: int = 0  # in this call
    calls_in_step: int = 0  # denoiser calls already made in the current step (unbatched guidance: 2)

    def begin_call(self) -> None:
        self.active = True
        self.call_index += 1
        self.step = 0
        self.num_steps = None
        self.timestep = None
        self.denoiser_calls = 0
        self.calls_in_step = 0

    def end_call(self) -> None:
        self.active = False
        self.step = 0
        self.num_steps = None
        self.timestep = None

    def advance(self) -> None:
        if self.active:
            self.step += 1
            self.calls_in_step = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def first_step(scheduler: Any, timestep: Any = None) -> int:
    """Where in ``scheduler.timesteps`` this call's loop starts.

    img2img-style pipelines start part-way through: schedulers that know it say so
    (``begin_index``); for the others the first denoiser call's timestep is found in the list
    (only the first occurrence matters, so repeated timesteps later do not confuse it).
    """
    begin = getattr(scheduler, "_begin_index", None)
    if begin:
        return int(begin)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or timestep is None:
        return 0
    try:
        first = float(timestep.reshape(-1)[0]) if hasattr(timestep, "reshape") else float(timestep)
        values = [float(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
    except (TypeError, ValueError):
        return 0
    return next((i for i, value in enumerate(values) if value == first), 0)


def steps_announced(scheduler: Any, timestep: Any = None) -> int | None:
    """How many loop iterations the scheduler was set up for in this call (from its first step)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    return max(len(timesteps) - first_step(scheduler, timestep), 1)
