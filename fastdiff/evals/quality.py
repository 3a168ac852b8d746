"""Speed against quality on the trained digits model: is a method better than fewer steps?

An acceleration method is only worth it if, at equal cost, it beats simply running vanilla
with fewer steps. So every method setting is scored the same way as a sweep of vanilla step
counts: FID-digits against real digits, FID and PSNR against vanilla at full steps (same
prompts and seeds), prompt adherence by the digits classifier, and the cost per image
(wall time, measured in one process, and denoiser FLOPs).
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..cli_checks import one_line
from ..core.accelerator import apply, find_denoiser
from ..core.method import Method
from ..core.progress import pipeline_bar_off, plural, progress_bar
from ..runner import CALIBRATION_SEED, GenerationRequest
from .bench import psnr, text_table
from .fid import FrechetAccumulator, load_extractor
from .fidelity import batch_call_kwargs
from .flop_count import count_denoiser_flops
from .peers import PeerContext, PeerSetting

REFERENCE = "vanilla"


@dataclass
class QualityPoint:
    label: str
    methods: list[str]
    steps: int
    seconds_per_image: float
    denoiser_gflops_per_image: float
    fid_real: float
    fid_vs_reference: float | None
    psnr_vs_reference: float | None
    adherence: float
    kind: str = "method"  # "vanilla", "method" (fastdiff) or "peer"


@dataclass
class QualityReport:
    model: str
    samples: int
    seed: int
    guidance_scale: float | None
    reference: str
    points: list[QualityPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed_noise: float | None = None  # FID-digits gap of vanilla between two seed sets

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        lines = [
            f"quality on {self.model}: N={self.samples} images per setting (seeds {self.seed}..{self.seed + self.samples - 1}), "
            f"reference = {self.reference}",
        ]
        rows = [
            [p.label, str(p.steps), f"{p.seconds_per_image:.4f}", f"{p.denoiser_gflops_per_image:.3f}",
             f"{p.fid_real:.3f}", "" if p.fid_vs_reference is None else f"{p.fid_vs_reference:.3f}",
             "" if p.psnr_vs_reference is None else f"{p.psnr_vs_reference:.2f}", f"{p.adherence:.1%}"]
            for p in self.points
        ]
        lines += text_table(["setting", "steps", "s/img", "GFLOP/img", "FID real", "FID ref", "PSNR ref", "adherence"],
                            rows)
        if self.seed_noise is not None:
            lines.append(f"seed noise (FID real, vanilla on two seed sets): {self.seed_noise:.3f}")
        lines += self.notes
        return "\n".join(lines)


SEED_CHECK = f"{REFERENCE}, second seed set"


@dataclass
class _Run:
    """One setting of the sweep: vanilla at some step count, fastdiff methods, or a peer."""

    label: str
    steps: int
    methods: list[Method] = field(default_factory=list)
    peer: PeerSetting | None = None
    seed_offset: int = 0

    @property
    def kind(self) -> str:
        return "peer" if self.peer is not None else "method" if self.methods else "vanilla"

    @property
    def description(self) -> str:
        if self.methods or self.peer or self.seed_offset:
            return self.label
        return f"{REFERENCE} {plural(self.steps, 'step')}"

    @contextmanager
    def prepared(self, pipe: DiffusionPipeline, context: PeerContext) -> Iterator[tuple[DiffusionPipeline, Any]]:
        """The pipeline to call (a peer gets its own copy) and what to call on it."""
        if self.peer is not None:
            reason = self.peer.peer.cannot_run(pipe)
            if reason is not None:
                raise ValueError(reason)
            target = copy.deepcopy(pipe)
            enabled = self.peer.enable(target, context)
            try:
                yield target, enabled.call
            finally:
                enabled.remove()
            return
        accelerator = apply(pipe, *self.methods) if self.methods else None
        try:
            yield pipe, None
        finally:
            if accelerator is not None:
                accelerator.remove()


def _prompts_and_labels(samples: int) -> tuple[list[str], list[int]]:
    from ..models.digits import digit_prompt

    labels = [i % 10 for i in range(samples)]
    return [digit_prompt(label) for label in labels], labels


def _requests(samples: int, seed: int, steps: int, guidance_scale: float | None,
              size: int | None, call_options: Mapping[str, Any]) -> list[GenerationRequest]:
    """Image i: digit ``i mod 10``, seed ``seed + i``: the same set for every setting."""
    prompts, _ = _prompts_and_labels(samples)
    return [
        GenerationRequest(prompt=prompt, steps=steps, seed=seed + i, height=size, width=size,
                          guidance_scale=guidance_scale, call_options=call_options)
        for i, prompt in enumerate(prompts)
    ]


def _generate(pipe: DiffusionPipeline, requests: list[GenerationRequest], batch_size: int,
              bar: Any = None, call: Callable[..., Any] | None = None) -> tuple[torch.Tensor, float]:
    """uint8 images N x 3 x H x W and the wall time the pipeline calls took (the bar's own time
    is left out of it). ``call``: what to call instead of ``pipe`` (a peer's own entry point)."""
    chunks: list[torch.Tensor] = []
    elapsed = 0.0
    for start in range(0, len(requests), batch_size):
        kwargs = batch_call_kwargs(pipe, requests[start:start + batch_size])
        begin = time.perf_counter()
        images = (call or pipe)(**kwargs, output_type="np").images
        elapsed += time.perf_counter() - begin
        chunks.append(torch.from_numpy((np.asarray(images) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
        if bar is not None:
            bar.update(len(images))
    return torch.cat(chunks), elapsed


def denoiser_flops(pipe: DiffusionPipeline, methods: Sequence[Method], request: GenerationRequest | Sequence[GenerationRequest],
                   call: Callable[..., Any] | None = None, bar: Any = None) -> float:
    """Denoiser FLOPs per image, counted in an untimed call (of one image or of a batch).

    The counter is the same for everyone: torch's FlopCounterMode around every denoiser call
    (``count_denoiser_flops``), so whatever a method or a peer skips is simply not counted."""
    requests = [request] if isinstance(request, GenerationRequest) else list(request)
    accelerator = apply(pipe, *methods) if methods else None
    try:
        kwargs = batch_call_kwargs(pipe, requests)
        _, denoiser = find_denoiser(pipe)
        total = count_denoiser_flops(denoiser, lambda: (call or pipe)(**kwargs, output_type="np"),
                                     None if bar is None else lambda: bar.update(1))
        return total / len(requests)
    finally:
        if accelerator is not None:
            accelerator.remove()


def _distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of two feature sets (extracted once each, compared many times)."""
    accumulator = FrechetAccumulator(real.shape[1])
    accumulator.update(real, real=True)
    accumulator.update(fake, real=False)
    return accumulator.compute()


def evaluate_quality(
    pipe: DiffusionPipeline,
    variants: Mapping[str, Sequence[Method]],
    *,
    steps: int = 50,
    baseline_steps: Sequence[int] = (10, 20, 30),
    samples: int = 1000,
    batch_size: int = 250,
    seed: int = 0,
    guidance_scale: float | None = None,
    size: int | None = None,
    model: str = "digits",
    call_options: Mapping[str, Any] | None = None,
    peers: Sequence[PeerSetting] = (),
    variant_steps: Mapping[str, int] | None = None,
    seed_noise: bool = False,
    show_progress: bool = True,
) -> QualityReport:
    """Score vanilla at ``steps`` (the reference), vanilla at each of ``baseline_steps``, each
    variant, and each peer setting (on a copy of the pipeline, so nothing of it stays behind).

    ``variant_steps``: a step count for some variants (by name) other than ``steps``, to set a
    method at fewer steps against vanilla at fewer steps still.
    ``seed_noise``: also vanilla at ``steps`` on the next ``samples`` seeds; the FID-digits gap
    between the two seed sets is how far apart two settings must be to differ beyond chance.

    ``show_progress``: a bar per setting on stderr over the images it generates (thousands of
    images take a while); the pipeline's own per-call bars stay off meanwhile and its
    configuration is restored afterwards.
    """
    from ..models.digits import digits_split

    if samples < 2:
        raise ValueError(f"samples must be >= 2 for FID, got {samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extractor = load_extractor("digits")
    train_images, _, _, _ = digits_split()
    real_features = extractor(train_images)
    _, labels = _prompts_and_labels(samples)
    label_tensor = torch.tensor(labels)
    report = QualityReport(model, samples, seed, guidance_scale, f"{REFERENCE} at {steps} steps")

    runs: list[_Run] = [_Run(REFERENCE, steps)]
    runs += [_Run(f"{REFERENCE} {k} steps", k) for k in baseline_steps if k != steps]
    if seed_noise:
        runs.append(_Run(SEED_CHECK, steps, seed_offset=samples))
    runs += [_Run(name, (variant_steps or {}).get(name, steps), methods=list(methods))
             for name, methods in variants.items()]
    runs += [_Run(setting.spec(), steps, peer=setting) for setting in peers]
    # peers that calibrate (MagCache) do so on the ten digit prompts, on seeds no scored image uses
    calibration = _requests(10, CALIBRATION_SEED, steps, guidance_scale, size, call_options or {})
    context = PeerContext(steps, guidance_scale,
                          calibrate=lambda p: p(**batch_call_kwargs(p, calibration), output_type="np"))
    reference: tuple[torch.Tensor, torch.Tensor] | None = None  # images, features
    with pipeline_bar_off(pipe):
        for run in runs:
            requests = _requests(samples, seed + run.seed_offset, run.steps, guidance_scale, size, call_options or {})
            try:
                with run.prepared(pipe, context) as (target, call):
                    with progress_bar(total=samples, desc=run.description, unit="img", enabled=show_progress) as bar:
                        images, elapsed = _generate(target, requests, batch_size, bar, call)
                    if run.peer is not None:  # peers decide per batch (adaptive thresholds): count the first
                        with progress_bar(total=run.steps, desc=f"{run.label}: counting FLOPs", unit="step",
                                          enabled=show_progress) as bar:
                            flops = denoiser_flops(target, [], requests[:batch_size], call, bar)
                target = call = None  # a peer's copy goes before the next one is made
                if run.peer is None:  # fastdiff's plans do not depend on the images: one is enough
                    flops = denoiser_flops(pipe, run.methods, requests[0])
            except Exception as exc:  # noqa: BLE001 - a peer that fails on this pipeline is reported, not fatal
                if run.peer is None:
                    raise
                report.notes.append(f"{run.label}: cannot run on {type(pipe).__name__}: "
                                    f"{type(exc).__name__}: {one_line(exc)[:300]}")
                continue
            image_features = extractor(images)
            is_reference = reference is None
            if reference is None:
                reference = (images, image_features)
            compared = not is_reference and run.seed_offset == 0  # other seeds: other images, nothing to pair
            with torch.no_grad():
                predicted = extractor.module.classify(images)
            point = QualityPoint(
                label=run.label,
                methods=[m.spec() for m in run.methods] or ([run.peer.spec()] if run.peer else []),
                steps=run.steps,
                seconds_per_image=elapsed / samples,
                denoiser_gflops_per_image=flops / 1e9,
                fid_real=_distance(real_features, image_features),
                fid_vs_reference=_distance(reference[1], image_features) if compared else None,
                psnr_vs_reference=psnr(reference[0].numpy(), images.numpy(), 255.0) if compared else None,
                adherence=float((predicted == label_tensor).float().mean()),
                kind=run.kind,
            )
            report.points.append(point)
            if run.label == SEED_CHECK:
                report.seed_noise = abs(point.fid_real - report.points[0].fid_real)
    return report


def _family(point: QualityPoint) -> str:
    """Which curve a point belongs to: its method names (and forecast), or its peer's name."""
    names = []
    for spec in point.methods:
        name, _, options = spec.partition(":")
        forecast = re.search(r"forecast=(\w+)", options)
        names.append(f"{name} {forecast.group(1)}" if forecast and forecast.group(1) != "hold" else name)
    return "+".join(names)


def plot_speed_quality(report: QualityReport, path: str | Path, x: str = "denoiser_gflops_per_image") -> None:
    """FID against cost: vanilla's step sweep as a curve; fastdiff's settings (filled) and each
    peer's (hollow, dashed) as one curve per method or peer; the seed noise as error bars on
    vanilla."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the speed-quality plot needs matplotlib: pip install 'fastdiff[eval]'") from exc
    vanilla = sorted((p for p in report.points if p.kind == "vanilla" and p.label != SEED_CHECK),
                     key=lambda p: getattr(p, x))
    families: dict[tuple[str, str], list[QualityPoint]] = {}
    for p in report.points:
        if p.kind != "vanilla":
            families.setdefault((p.kind, _family(p)), []).append(p)
    fig, ax = plt.subplots(figsize=(7.6, 5.2), dpi=120)
    ax.errorbar([getattr(p, x) for p in vanilla], [p.fid_real for p in vanilla],
                yerr=report.seed_noise if report.seed_noise is not None else None, fmt="o-", color="black",
                capsize=3, label="vanilla, fewer steps" + (" (± seed noise)" if report.seed_noise is not None else ""))
    for p in vanilla:
        ax.annotate(f"{p.steps}", (getattr(p, x), p.fid_real), textcoords="offset points", xytext=(4, 4), fontsize=8)
    markers = "sD^v<>pPX*h"
    for i, ((kind, name), points) in enumerate(sorted(families.items())):
        points.sort(key=lambda p: getattr(p, x))
        peer = kind == "peer"
        ax.plot([getattr(p, x) for p in points], [p.fid_real for p in points], linestyle="--" if peer else "-",
                marker=markers[i % len(markers)], markerfacecolor="none" if peer else None,
                label=f"{name} (peer)" if peer else name)
    ax.set_xlabel({"denoiser_gflops_per_image": "denoiser GFLOPs per image",
                   "seconds_per_image": "seconds per image"}.get(x, x))
    ax.set_ylabel("FID-digits vs real digits (lower is better)")
    ax.set_title(f"{report.model}: speed vs quality (N={report.samples})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
