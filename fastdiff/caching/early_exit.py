"""Early exiting: fewer denoiser blocks at the timesteps that need less of the network.

Near pure noise the network's job is coarse, so its deepest blocks can be dropped there; near
the data every block matters. The schedule gives, per timestep bucket (equal slices of the
training timesteps, lowest noise first), how much of the depth is kept; the plan turns it into
SKIP decisions step by step from the call's own timesteps — read from the scheduler, so on flow
matching (SD3, Flux, Wan) a step's level is its sigma, whatever scale the pipeline hands the
denoiser its timestep in (Flux: t / 1000). Transformers keep their first ``k`` blocks of the
whole sequence (Flux: dual-stream, then single-stream) and then the final layer; UNets drop
their innermost piece (see :mod:`.exit_ladder`).

Schedules:

* ``"auto"`` (the default) — ``"demo"`` on transformers, ``"calibrated"`` on UNets. The demo
  schedule was made for DiT, where every block is a residual refinement of the same tokens; a
  UNet's droppable pieces change their input a lot (77 % to 250 % relative L1 on the digits UNet),
  and dropping them by DiT's schedule costs much of the image (on digits FID-digits 1.60 → 4.92,
  prompt adherence 98.9 % → 87.4 %). On a UNet the default is therefore measured on the pipeline,
  and keeps full depth wherever no exit stays within ``tolerance``.
* ``"demo"`` — the authors' demonstration schedule for DiT-XL/2 (28 blocks): 28, 28, 24, 24,
  20, 20, 16, 16, 12, 12 blocks over the ten timestep deciles, applied as fractions of depth.
* ``"linear"`` — full depth at the lowest-noise bucket down to ``min_depth`` at the noisiest.
* ``"calibrated"`` — measured: at each step, how far the hidden state leaving each droppable
  piece is from the one entering it (the error the exit would make, to first order); the
  shallowest exit within ``tolerance`` is taken. ``EarlyExit.calibrate(pipe, prompts)`` runs it.
* a sequence — per bucket, fractions of depth (floats) or kept units (integers).

The paper fine-tunes the network to its schedule; :func:`finetune` does that here (optional).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..core.method import Method
from ..core.plan import Decision
from ..anatomy import Anatomy, anatomy_of
from ..core.rules import ReuseRule
from ..core.timeline import announced_levels, noise_levels
from .blocks import fingerprint
from .exit_finetune import finetune
from .exit_ladder import ExitLadder, exit_ladder, exiting

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = ["DEMO_BLOCKS", "EarlyExit", "EarlyExitCalibration", "exiting", "finetune"]

DEMO_BLOCKS = (28, 28, 24, 24, 20, 20, 16, 16, 12, 12)  # of DiT-XL/2's 28, per timestep decile
NAMED = ("auto", "demo", "linear", "calibrated")


def parse_schedule(value: Any) -> str | tuple[float | int, ...]:
    """A schedule name, or per-bucket values: a sequence or text such as ``"1/1/0.8/0.6"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in NAMED:
            return text
        parts = [p for p in text.replace(" ", "/").replace(",", "/").split("/") if p]
        try:
            return tuple(float(p) if any(c in p for c in ".e") else int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"EarlyExit: schedule must be one of {NAMED} or per-bucket depths like '28/28/24/24' or "
                f"'1/1/0.8/0.6', got {value!r}"
            ) from None
    if isinstance(value, Sequence):
        return tuple(value)
    raise ValueError(f"EarlyExit: schedule must be one of {NAMED} or a sequence of depths, got {value!r}")


@dataclass
class EarlyExitCalibration:
    """What a calibration measured: per kept depth, the relative change across the dropped piece
    at each step, and the depths per bucket it chose."""

    denoiser: str
    fingerprint: str
    num_steps: int
    noise_levels: list[float]
    change: dict[int, list[float]]
    tolerance: float
    depths: list[int]


@dataclass
class EarlyExit(Method):
    """Drop the deepest blocks at the noisier timesteps.

    Args:
        schedule: ``"auto"`` (``"demo"`` on transformers, ``"calibrated"`` on UNets), ``"demo"``,
            ``"linear"``, ``"calibrated"`` or per-bucket depths (fractions of
            depth as floats, or kept units as integers), lowest noise first. Depth may not grow
            with noise: a bucket never keeps more than a less noisy one.
        min_depth: ``"linear"``: the fraction of depth kept in the noisiest bucket.
        buckets: ``"linear"``/``"calibrated"``: how many equal timestep buckets.
        tolerance: ``"calibrated"``: the relative change a dropped piece may have had.
        calibration: set by :meth:`calibrate` (or :meth:`prepare`).
    """

    spec_name = "earlyexit"
    spec_keys = ("schedule",)

    schedule: Any = "auto"  # the parameter; the engine reads the plan through timed_schedule
    min_depth: float = 0.5
    buckets: int = 10
    tolerance: float = 0.05
    calibration: EarlyExitCalibration | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.schedule = parse_schedule(self.schedule)
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int) or self.buckets < 1:
            raise ValueError(f"EarlyExit: buckets must be an integer >= 1, got {self.buckets!r}")
        if not 0.0 < self.min_depth <= 1.0:
            raise ValueError(f"EarlyExit: min_depth must be in (0, 1], got {self.min_depth!r}")
        if not self.tolerance >= 0.0:
            raise ValueError(f"EarlyExit: tolerance must be >= 0, got {self.tolerance!r}")
        if isinstance(self.schedule, tuple):
            values = self.schedule
            if not values:
                raise ValueError("EarlyExit: schedule is empty; give one depth per timestep bucket")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"EarlyExit: schedule values must be numbers, got {v!r}")
                if isinstance(v, float) and not 0.0 < v <= 1.0:
                    raise ValueError(f"EarlyExit: fractions of depth must be in (0, 1], got {v!r}")
                if isinstance(v, int) and v < 0:
                    raise ValueError(f"EarlyExit: kept depths must be >= 0, got {v!r}")
            if any(later > earlier for earlier, later in zip(values, values[1:])):
                raise ValueError(
                    f"EarlyExit: schedule must not keep more depth at a noisier bucket (it lists the "
                    f"lowest noise first and may only stay or fall), got {list(values)}"
                )

    def spec(self) -> str:
        text = super().spec()
        if isinstance(self.schedule, tuple):
            text = text.replace(f"schedule={self.schedule}", "schedule=" + "/".join(str(v) for v in self.schedule))
        return text

    # -- depth per bucket -----------------------------------------------------------------
    def depths(self, denoiser: torch.nn.Module, ladder: ExitLadder | None = None) -> list[int]:
        """Kept units per timestep bucket (lowest noise first) on this denoiser."""
        ladder = ladder or exit_ladder(denoiser)
        schedule = self.resolved_schedule(denoiser)
        if schedule == "demo":
            return [ladder.at_least(k / DEMO_BLOCKS[0]) for k in DEMO_BLOCKS]
        if schedule == "linear":
            steps = max(self.buckets - 1, 1)
            return [ladder.at_least(1.0 - (1.0 - self.min_depth) * b / steps) for b in range(self.buckets)]
        if schedule == "calibrated":
            calibration = self.calibration
            if calibration is None and self.schedule == "auto":
                raise ValueError(
                    f"EarlyExit on a UNet ({type(denoiser).__name__}) has no fixed default schedule: DiT's demo "
                    "schedule drops UNet pieces that change their input far too much (on the digits UNet it cost "
                    "11 points of prompt adherence). Measure one with EarlyExit.calibrate(pipe, prompts, steps=...), "
                    "or give schedule='demo', 'linear' or per-bucket depths explicitly"
                )
            if calibration is None:
                raise ValueError(
                    "EarlyExit(schedule='calibrated') needs a calibration: use "
                    "EarlyExit.calibrate(pipe, prompts, steps=...) or give per-bucket depths"
                )
            if calibration.fingerprint != fingerprint(denoiser):
                raise ValueError(
                    f"EarlyExit: the calibration was made on another {calibration.denoiser} architecture; "
                    "calibrate on this pipeline"
                )
            return list(calibration.depths)
        depths = []
        for value in schedule:
            if isinstance(value, float):
                depths.append(ladder.at_least(value))
                continue
            if value > ladder.depth:
                raise ValueError(
                    f"EarlyExit: schedule keeps {value} units but this {type(denoiser).__name__} is only "
                    f"{ladder.depth} deep; allowed exits: {ladder.allowed}"
                )
            if value not in ladder.allowed:
                raise ValueError(
                    f"EarlyExit: {value} is not an exit of this {type(denoiser).__name__} (a UNet can only drop "
                    f"pieces whose input and output shapes agree); allowed: {ladder.allowed}"
                )
            depths.append(value)
        return depths

    def resolved_schedule(self, denoiser: torch.nn.Module) -> str | tuple[float | int, ...]:
        """``"auto"`` made concrete for this denoiser; any other schedule as given."""
        if self.schedule != "auto":
            return self.schedule
        return "calibrated" if anatomy_of(denoiser, "EarlyExit").is_unet else "demo"

    def _ladder_and_depths(self, denoiser: torch.nn.Module) -> tuple[ExitLadder, list[int]]:
        ladder = exit_ladder(denoiser)
        return ladder, self.depths(denoiser, ladder)

    # -- the Method contract ----------------------------------------------------------------
    def modules(self, denoiser: torch.nn.Module) -> list[str]:
        ladder, depths = self._ladder_and_depths(denoiser)
        shallowest = min(depths)
        return list(ladder.skipped.get(shallowest, []))

    def claims_before_prepare(self, denoiser: torch.nn.Module) -> list[str] | None:
        if self.calibration is None and self.resolved_schedule(denoiser) == "calibrated":
            return None  # the calibration decides how deep it may exit
        return self.modules(denoiser)

    def timed_schedule(self, denoiser: torch.nn.Module, noise_levels: Sequence[float]) -> Mapping[str, Sequence[Decision]]:
        ladder, depths = self._ladder_and_depths(denoiser)
        claimed = ladder.skipped.get(min(depths), [])
        rows: dict[str, list[Decision]] = {p: [] for p in claimed}
        for level in noise_levels:
            dropped = set(ladder.skipped.get(depths[bucket_of(level, len(depths))], []))
            for path in claimed:
                rows[path].append(Decision.SKIP if path in dropped else Decision.COMPUTE)
        return rows

    def reuse_rule(self, denoiser: torch.nn.Module, path: str) -> ReuseRule:
        return exit_ladder(denoiser).rules[path]

    def prepare(self, pipe: DiffusionPipeline, *, steps: int, prompts: Sequence[str], **call_kwargs: Any) -> Method:
        from ..core.accelerator import find_denoiser

        if self.calibration is not None:
            return self
        schedule = self.resolved_schedule(find_denoiser(pipe)[1])
        if schedule != "calibrated":
            return dataclasses.replace(self, schedule=schedule)
        return EarlyExit.calibrate(pipe, prompts, steps=steps, tolerance=self.tolerance, buckets=self.buckets,
                                   **call_kwargs)

    # -- calibration --------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, pipe: DiffusionPipeline, prompts: Sequence[str] | str, *, steps: int = 50,
                  tolerance: float = 0.05, buckets: int = 10, seed: int = 0, show_progress: bool = True,
                  **call_kwargs: Any) -> EarlyExit:
        """Measure ``pipe`` on ``prompts`` and return an ``EarlyExit`` with the calibrated schedule.

        Each prompt runs vanilla once (seed ``seed + i``); at every step the shallowest exit whose
        dropped piece changed its input by at most ``tolerance`` (relative L1) — and every deeper
        exit too — is noted. Per bucket the deepest such exit wins, and depth is made to fall
        monotonically with noise (a bucket keeps at least what any noisier one keeps).
        ``show_progress``: one bar over the whole calibration on stderr, the pipeline's own
        per-call bars off meanwhile (its configuration is restored afterwards).
        """
        from ..core.accelerator import find_denoiser
        from .block_calibration import StepProgress, _observe, _Probe, _prompt_calls, calibration_bar

        cls(buckets=buckets, tolerance=tolerance)  # validates the numbers first
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts: calibration needs at least one prompt")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: must be an integer >= 1, got {steps!r}")
        _, denoiser = find_denoiser(pipe)
        ladder = exit_ladder(denoiser)
        probe = _Probe()
        watch = _PieceWatch(probe, ladder, anatomy_of(denoiser, "EarlyExit"))
        probe.paths = watch.paths
        probe.rules = {path: _PieceRule(watch, path) for path in watch.paths}
        calls = _prompt_calls(pipe, prompts, steps, seed, call_kwargs)
        with calibration_bar("earlyexit", len(calls), steps, 1, show_progress) as bar:
            accelerator = _observe(pipe, probe, calls, count_flops=False, progress=StepProgress(bar, steps))
        first_call = [s.timestep or 0.0 for s in accelerator.ledger.steps if s.call == accelerator.ledger.steps[0].call]
        # the scheduler's own timesteps, not what the denoiser was given: Flux passes t / 1000
        levels = list(announced_levels(pipe.scheduler, len(first_call))
                      or noise_levels(first_call, pipe.scheduler) or ())[:steps]
        change = {kept: watch.profile(kept, len(levels)) for kept in ladder.skipped}
        per_step = [_exit_within(ladder, change, s, tolerance) for s in range(len(levels))]
        depths = _bucket_depths(per_step, levels, buckets, ladder.depth)
        calibration = EarlyExitCalibration(
            denoiser=type(denoiser).__name__, fingerprint=fingerprint(denoiser), num_steps=steps,
            noise_levels=levels, change=change, tolerance=tolerance, depths=depths,
        )
        return cls(schedule="calibrated", buckets=buckets, tolerance=tolerance, calibration=calibration)


def bucket_of(level: float, buckets: int) -> int:
    """The timestep bucket (0 = lowest noise) of a noise level in [0, 1]."""
    return min(max(int(math.floor(level * buckets + 1e-9)), 0), buckets - 1)


def _exit_within(ladder: ExitLadder, change: Mapping[int, Sequence[float]], step: int, tolerance: float) -> int:
    """The shallowest exit such that it and every deeper-kept exit stay within ``tolerance``."""
    kept = ladder.depth
    for candidate in sorted(ladder.skipped, reverse=True):
        if change[candidate][step] > tolerance:
            break
        kept = candidate
    return kept


def _bucket_depths(per_step: Sequence[int], levels: Sequence[float], buckets: int, depth: int) -> list[int]:
    chosen: list[int | None] = [None] * buckets
    for kept, level in zip(per_step, levels):
        b = bucket_of(level, buckets)
        chosen[b] = kept if chosen[b] is None else max(chosen[b], kept)
    filled: list[int] = []
    for b in range(buckets):  # a bucket no step visited borrows its less noisy neighbour's depth
        filled.append(chosen[b] if chosen[b] is not None else (filled[-1] if filled else depth))
    for b in range(buckets - 2, -1, -1):
        filled[b] = max(filled[b], filled[b + 1])
    return filled


class _PieceWatch:
    """Per denoiser call, the hidden state entering each droppable piece; at the piece's exit, the
    relative L1 distance between what left and what entered, per step."""

    def __init__(self, probe: Any, ladder: ExitLadder, anatomy: Anatomy) -> None:
        self.probe = probe
        self.ladder = ladder
        self.anatomy = anatomy
        self.opens: dict[str, list[int]] = defaultdict(list)
        self.closes: dict[str, list[int]] = defaultdict(list)
        for kept in ladder.skipped:
            self.opens[ladder.entries[kept]].append(kept)
            self.closes[ladder.exits[kept]].append(kept)
        self.paths = [p for p in dict.fromkeys([*self.opens, *self.closes])]
        self.entered: dict[tuple[int, int], torch.Tensor] = {}
        self.sums: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))

    def observe(self, path: str, args: tuple, kwargs: dict, output: Any, step: int) -> None:
        ordinal = self.probe.clock.calls_in_step
        io = self.anatomy.io(path)
        entering = io.image_in(args, kwargs)
        for kept in self.opens.get(path, []):
            if isinstance(entering, torch.Tensor):
                self.entered[(kept, ordinal)] = entering.detach()
        leaving = io.image_of(output)
        for kept in self.closes.get(path, []):
            before = self.entered.pop((kept, ordinal), None)
            if leaving is None or before is None or before.shape != leaving.shape:
                continue
            batch = before.shape[0]
            diff = (leaving - before).abs().double().reshape(batch, -1).sum(1)
            norm = before.abs().double().reshape(batch, -1).sum(1).clamp_min(1e-12)
            self.sums[kept][step] += float((diff / norm).mean())
            self.counts[kept][step] += 1

    def profile(self, kept: int, steps: int) -> list[float]:
        sums, counts = self.sums[kept], self.counts[kept]
        return [sums[s] / counts[s] if counts[s] else 0.0 for s in range(steps)]


class _PieceRule(ReuseRule):
    observes = True

    def __init__(self, watch: _PieceWatch, path: str) -> None:
        self.watch = watch
        self.path = path

    def keep(self, args: tuple, kwargs: dict, output: Any, step: int) -> Any:
        self.watch.observe(self.path, args, kwargs, output, step)
        return output

    def reset(self) -> None:
        self.watch.entered.clear()
