"""Measuring a pipeline's blocks for Block Caching, on the core engine.

The calibration is itself a fastdiff method: it claims every block, computes everything (so
the run is exactly vanilla), and watches each computed output through its reuse rule. One
pass records how much each block changes from step to step; with ``align=True`` a second pass
replays the chosen schedule in shadow (still computing everything) and accumulates, per block,
step and channel, the least-squares statistics that map the value a block would have reused to
the value it actually produced.

Calibrating takes as long as generating, so it shows one bar over all of it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..core.accelerator import apply, find_denoiser
from ..core.method import Method
from ..core.progress import pipeline_bar_off, plural, progress_bar, times_sign
from ..core.plan import Decision
from ..anatomy import BlockIO, anatomy_of
from ..anatomy.base import SINGLE_STREAM
from ..core.rules import ReuseRule
from .block_cache import DEFAULT_THRESHOLD, BlockCache, BlockCacheCalibration, cached_quantity, text_quantity
from .block_schedule import schedule_from_changes, threshold_for_budget
from .blocks import block_paths, fingerprint

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

_EPS = 1e-12


class StepProgress:
    """Advances a bar by one per denoising step of a calibration's pipeline calls.

    Steps come from the engine's ``scheduler.step`` watch; a call is topped up to its full share
    when it returns, and never counts more than it, so a scheduler that steps twice per
    iteration (Heun) or a pipeline that starts part-way (img2img) keeps the total right.
    """

    def __init__(self, bar: Any, steps_per_call: int) -> None:
        self.bar = bar
        self.steps_per_call = steps_per_call
        self.in_call = 0

    def step(self) -> None:
        if self.in_call < self.steps_per_call:
            self.in_call += 1
            self.bar.update(1)

    def call_done(self) -> None:
        if self.in_call < self.steps_per_call:
            self.bar.update(self.steps_per_call - self.in_call)
        self.in_call = 0


class _ChangeRule(ReuseRule):
    """Sums each step's relative L1 change of the kept quantity, relative to the block's output.

    On a dual-stream block (MMDiT) the kept quantity is both streams: the next block reads the
    text stream as well, so a block whose text moves while its image stays put must recompute.
    """

    observes = True

    def __init__(self, probe: _Probe, residual: bool, io: BlockIO = SINGLE_STREAM) -> None:
        self.probe = probe
        self.residual = residual
        self.io = io
        self.previous: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.sums: dict[int, float] = defaultdict(float)
        self.counts: dict[int, int] = defaultdict(int)

    def keep(self, args: tuple, kwargs: dict, output: Any, step: int) -> Any:
        quantity, _ = cached_quantity(args, kwargs, output, self.residual, self.io)
        main = self.io.image_of(output)
        if quantity is None or main is None:
            return output
        text, _ = text_quantity(args, kwargs, output, self.residual, self.io)
        text_out = self.io.text_of(output)
        ordinal = self.probe.clock.calls_in_step
        previous = self.previous.get(ordinal)
        if previous is not None and previous[0].shape == quantity.shape:
            batch = quantity.shape[0] if quantity.dim() else 1
            diff = _l1(quantity - previous[0], batch)
            norm = _l1(main, batch)
            before = previous[1]
            if text is not None and text_out is not None and before is not None and before.shape == text.shape:
                diff = diff + _l1(text - before, batch)
                norm = norm + _l1(text_out, batch)
            self.sums[step] += float((diff / norm.clamp_min(_EPS)).mean())
            self.counts[step] += 1
        self.previous[ordinal] = (quantity.detach().clone(), None if text is None else text.detach().clone())
        return output

    def reset(self) -> None:
        self.previous.clear()

    def profile(self, steps: int) -> list[float]:
        return [self.sums[s] / self.counts[s] if self.counts[s] else 0.0 for s in range(steps)]


def _l1(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample L1 norm, in float64."""
    return tensor.abs().double().reshape(batch, -1).sum(1)


@dataclass
class _Moments:
    n: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    xx: torch.Tensor
    xy: torch.Tensor

    def fit(self) -> tuple[list[float], list[float]]:
        """Per-channel (scale, shift) minimising ||scale·x + shift − y||²; identity where x is constant."""
        denominator = self.n * self.xx - self.x * self.x
        ok = denominator.abs() > 1e-9 * (self.n * self.xx).abs().clamp_min(_EPS)
        scale = torch.where(ok, (self.n * self.xy - self.x * self.y) / torch.where(ok, denominator, 1.0), 1.0)
        shift = (self.y - scale * self.x) / self.n.clamp_min(1.0)
        return scale.tolist(), shift.tolist()


def _reduce_dims(tensor: torch.Tensor) -> tuple[int, ...] | None:
    if tensor.dim() == 4:
        return (0, 2, 3)
    if tensor.dim() == 3:
        return (0, 1)
    return None


class _FitRule(ReuseRule):
    """Replays one block's schedule in shadow and gathers cached-vs-fresh moments per step, for
    its image stream and, on a dual-stream block, its text stream."""

    observes = True

    def __init__(self, probe: _Probe, residual: bool, row: Sequence[Decision], io: BlockIO = SINGLE_STREAM) -> None:
        self.probe = probe
        self.residual = residual
        self.row = row
        self.io = io
        self.source: dict[tuple[str, int], torch.Tensor] = {}
        self.moments: dict[int, _Moments] = {}
        self.text_moments: dict[int, _Moments] = {}

    def keep(self, args: tuple, kwargs: dict, output: Any, step: int) -> Any:
        if step >= len(self.row):
            return output
        image, _ = cached_quantity(args, kwargs, output, self.residual, self.io)
        text, _ = text_quantity(args, kwargs, output, self.residual, self.io)
        ordinal = self.probe.clock.calls_in_step
        for stream, quantity, moments in (("image", image, self.moments), ("text", text, self.text_moments)):
            if quantity is None:
                continue
            if self.row[step] is Decision.COMPUTE:
                self.source[(stream, ordinal)] = quantity.detach().clone()
            else:
                _accumulate(moments, step, self.source.get((stream, ordinal)), quantity)
        return output

    def reset(self) -> None:
        self.source.clear()


def _accumulate(moments: dict[int, _Moments], step: int, x: torch.Tensor | None, y: torch.Tensor) -> None:
    """Add one (kept ``x``, fresh ``y``) pair to the per-channel least-squares sums of ``step``."""
    dims = _reduce_dims(y)
    if x is None or dims is None or x.shape != y.shape:
        return
    x, y = x.double(), y.double()
    channels = x.shape[1] if x.dim() == 4 else x.shape[-1]
    count = torch.full((channels,), float(x.numel() // channels), dtype=torch.float64, device=x.device)
    update = _Moments(count, x.sum(dims), y.sum(dims), (x * x).sum(dims), (x * y).sum(dims))
    held = moments.get(step)
    if held is None:
        moments[step] = update
    else:
        for name in ("n", "x", "y", "xx", "xy"):
            setattr(held, name, getattr(held, name) + getattr(update, name))


@dataclass
class _Probe(Method):
    """Claims the blocks, computes everything, observes through the given rules."""

    paths: list[str] = field(default_factory=list)
    rules: dict[str, ReuseRule] = field(default_factory=dict)
    clock: Any = None
    progress: StepProgress | None = None
    # count FLOPs in the first step only: a block costs the same at every step, and counting
    # every operator of a whole calibration would make it several times slower than generating
    flops_first_step_only: bool = False

    def modules(self, denoiser: torch.nn.Module) -> list[str]:
        return list(self.paths)

    def schedule(self, denoiser: torch.nn.Module, num_steps: int) -> Mapping[str, Sequence[Decision]]:
        return {path: (Decision.COMPUTE,) * num_steps for path in self.paths}

    def reuse_rule(self, denoiser: torch.nn.Module, path: str) -> ReuseRule:
        return self.rules[path]

    def after_scheduler_step(self, runtime: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.progress is not None:
            self.progress.step()
        if self.flops_first_step_only:
            runtime.count_flops = False
        return output

    @property
    def name(self) -> str:
        return "blockcache-calibration"


def _prompt_calls(pipe: DiffusionPipeline, prompts: Sequence[str], steps: int, seed: int,
                  call_kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
    from ..runner import GenerationRequest
    from ..runner import call_kwargs as request_kwargs

    calls = []
    for i, prompt in enumerate(prompts):
        kwargs = request_kwargs(pipe, GenerationRequest(prompt=prompt, steps=steps, seed=seed + i))
        kwargs.update(call_kwargs)
        calls.append(kwargs)
    return calls


def _observe(pipe: DiffusionPipeline, probe: _Probe, calls: list[dict[str, Any]], count_flops: bool,
             progress: StepProgress | None = None) -> Any:
    accelerator = apply(pipe, probe, count_flops=count_flops)
    probe.clock = accelerator.clock
    probe.progress = progress
    try:
        with torch.no_grad(), pipeline_bar_off(pipe):
            for kwargs in calls:
                pipe(**kwargs)
                if progress is not None:
                    progress.call_done()
    finally:
        accelerator.remove()
        probe.progress = None
    return accelerator


def calibration_bar(method: str, prompts: int, steps: int, passes: int, enabled: bool) -> Any:
    """The one bar of a calibration: every step of every prompt of every pass."""
    desc = f"calibrating {method} on {plural(prompts, 'prompt')} {times_sign()} {plural(steps, 'step')}"
    if passes > 1:
        desc += f", {passes} passes"
    return progress_bar(total=passes * prompts * steps, desc=desc, unit="step", enabled=enabled)


def calibrate(pipe: DiffusionPipeline, prompts: Sequence[str], *, steps: int = 50, threshold: float | None = None,
              budget: float | None = None, granularity: str = "layer", cache: str = "residual", align: bool = False,
              budget_by: str = "evaluations", seed: int = 0, show_progress: bool = True,
              **call_kwargs: Any) -> BlockCache:
    """Measure every block of ``pipe``'s denoiser on ``prompts`` and return a ready :class:`BlockCache`.

    Args:
        prompts: calibration prompts (class names or indices for class-conditional pipelines);
            each is run once with seed ``seed + i``. A handful is enough: the change curves are
            very similar across prompts (the paper's observation).
        steps: the step count the schedule is for (a schedule is tied to it).
        threshold / budget: δ, or the share of block evaluations to keep (then δ is chosen).
        align: also fit the per-channel scale/shift of cached values (a second pass).
        show_progress: one bar over the whole calibration on stderr (the pipeline's own per-call
            bars stay off meanwhile; its configuration is restored afterwards).
        call_kwargs: passed to every pipeline call (height, width, guidance_scale, ...).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: calibration needs at least one prompt")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps: calibration needs at least 2 steps (there is no change to measure in one), got {steps!r}")
    # validates threshold/budget/granularity/cache before any work
    BlockCache(threshold=threshold, budget=budget, granularity=granularity, cache=cache, budget_by=budget_by)
    _, denoiser = find_denoiser(pipe)
    paths = block_paths(denoiser, granularity)
    anatomy = anatomy_of(denoiser, "BlockCache")
    residual = cache == "residual"
    calls = _prompt_calls(pipe, prompts, steps, seed, call_kwargs)

    with calibration_bar("blockcache", len(calls), steps, 2 if align else 1, show_progress) as bar:
        progress = StepProgress(bar, steps)
        probe = _Probe(paths=paths, flops_first_step_only=True)
        change_rules = {path: _ChangeRule(probe, residual, anatomy.io(path)) for path in paths}
        probe.rules = dict(change_rules)
        accelerator = _observe(pipe, probe, calls, count_flops=True, progress=progress)
        change = {path: rule.profile(steps) for path, rule in change_rules.items()}
        measured: dict[str, list[int]] = defaultdict(list)  # per block, its FLOPs in each counted call
        for event in accelerator.ledger.modules:
            if event.flops is not None:
                measured[event.module].append(event.flops)

        calibration = BlockCacheCalibration(
            denoiser=type(denoiser).__name__, fingerprint=fingerprint(denoiser), num_steps=steps,
            granularity=granularity, cache=cache, modules=paths, change=change,
            flops={p: sum(measured[p]) / len(measured[p]) if measured[p] else 0.0 for p in paths},
            prompts=prompts, seed=seed,
        )
        if align:
            delta = threshold if threshold is not None else (
                threshold_for_budget(change, budget, calibration.flops if budget_by == "flops" else None)
                if budget is not None else DEFAULT_THRESHOLD)
            rows = schedule_from_changes(change, delta)
            probe = _Probe(paths=paths)
            fit_rules = {path: _FitRule(probe, residual, rows[path], anatomy.io(path)) for path in paths}
            probe.rules = dict(fit_rules)
            _observe(pipe, probe, calls, count_flops=False, progress=progress)
            calibration.aligned_rows = {m: "".join(d.symbol for d in r) for m, r in rows.items()}
            calibration.alignment = {
                path: {str(step): list(moments.fit()) for step, moments in sorted(rule.moments.items())}
                for path, rule in fit_rules.items()
            }
            calibration.text_alignment = {
                path: {str(step): list(moments.fit()) for step, moments in sorted(rule.text_moments.items())}
                for path, rule in fit_rules.items() if rule.text_moments
            }
    return BlockCache(threshold=threshold, budget=budget, granularity=granularity, cache=cache, align=align,
                      budget_by=budget_by, calibration=calibration)
