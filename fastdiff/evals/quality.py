"""Speed against quality on the trained digits model: is a method better than fewer steps?

An acceleration method is only worth it if, at equal cost, it beats simply running vanilla
with fewer steps. So every method setting is scored the same way as a sweep of vanilla step
counts: FID-digits against real digits, FID and PSNR against vanilla at full steps (same
prompts and seeds), prompt adherence by the digits classifier, and the cost per image
(wall time, measured in one process, and denoiser FLOPs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..core.progress import pipeline_bar_off, plural, progress_bar
from ..core.accelerator import apply
from ..core.method import Method
from ..runner import GenerationRequest, call_kwargs
from .bench import psnr
from .fid import FrechetAccumulator, load_extractor
from .fidelity import batch_call_kwargs

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


@dataclass
class QualityReport:
    model: str
    samples: int
    seed: int
    guidance_scale: float | None
    reference: str
    points: list[QualityPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        lines = [
            f"quality on {self.model}: N={self.samples} images per setting (seeds {self.seed}..{self.seed + self.samples - 1}), "
            f"reference = {self.reference}",
            f"{'setting':34} {'steps':>5} {'s/img':>8} {'GFLOP/img':>10} {'FID real':>9} {'FID ref':>8} "
            f"{'PSNR ref':>9} {'adherence':>9}",
        ]
        for p in self.points:
            ref = "" if p.fid_vs_reference is None else f"{p.fid_vs_reference:.3f}"
            ps = "" if p.psnr_vs_reference is None else f"{p.psnr_vs_reference:.2f}"
            lines.append(
                f"{p.label:34} {p.steps:>5} {p.seconds_per_image:>8.4f} {p.denoiser_gflops_per_image:>10.3f} "
                f"{p.fid_real:>9.3f} {ref:>8} {ps:>9} {p.adherence:>9.1%}"
            )
        return "\n".join(lines)


def _prompts_and_labels(samples: int) -> tuple[list[str], list[int]]:
    from ..models.digits import digit_prompt

    labels = [i % 10 for i in range(samples)]
    return [digit_prompt(label) for label in labels], labels


def _requests(samples: int, seed: int, steps: int, guidance_scale: float | None,
              size: int | None) -> list[GenerationRequest]:
    """Image i: digit ``i mod 10``, seed ``seed + i``: the same set for every setting."""
    prompts, _ = _prompts_and_labels(samples)
    return [
        GenerationRequest(prompt=prompt, steps=steps, seed=seed + i, height=size, width=size,
                          guidance_scale=guidance_scale)
        for i, prompt in enumerate(prompts)
    ]


def _generate(pipe: DiffusionPipeline, requests: list[GenerationRequest], batch_size: int,
              bar: Any = None) -> tuple[torch.Tensor, float]:
    """uint8 images N x 3 x H x W and the wall time the pipeline calls took (the bar's own time
    is left out of it)."""
    chunks: list[torch.Tensor] = []
    elapsed = 0.0
    for start in range(0, len(requests), batch_size):
        kwargs = batch_call_kwargs(pipe, requests[start:start + batch_size])
        begin = time.perf_counter()
        images = pipe(**kwargs, output_type="np").images
        elapsed += time.perf_counter() - begin
        chunks.append(torch.from_numpy((np.asarray(images) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
        if bar is not None:
            bar.update(len(images))
    return torch.cat(chunks), elapsed


def denoiser_flops(pipe: DiffusionPipeline, methods: Sequence[Method], request: GenerationRequest) -> int:
    """Denoiser FLOPs of one image, counted in an untimed call."""
    accelerator = apply(pipe, *methods, count_flops=True)
    try:
        pipe(**call_kwargs(pipe, request), output_type="np")
        return accelerator.report().flops_run or 0
    finally:
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
    show_progress: bool = True,
) -> QualityReport:
    """Score vanilla at ``steps`` (the reference), vanilla at each of ``baseline_steps``, and each variant.

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

    settings: list[tuple[str, list[Method], int]] = [(REFERENCE, [], steps)]
    settings += [(f"{REFERENCE} {k} steps", [], k) for k in baseline_steps if k != steps]
    settings += [(name, list(methods), steps) for name, methods in variants.items()]
    reference: tuple[torch.Tensor, torch.Tensor] | None = None  # images, features
    with pipeline_bar_off(pipe):
        for label, methods, count in settings:
            desc = label if methods else f"{REFERENCE} {plural(count, 'step')}"
            accelerator = apply(pipe, *methods) if methods else None
            try:
                requests = _requests(samples, seed, count, guidance_scale, size)
                with progress_bar(total=samples, desc=desc, unit="img", enabled=show_progress) as bar:
                    images, elapsed = _generate(pipe, requests, batch_size, bar)
            finally:
                if accelerator is not None:
                    accelerator.remove()
            image_features = extractor(images)
            is_reference = reference is None
            if reference is None:
                reference = (images, image_features)
            with torch.no_grad():
                predicted = extractor.module.classify(images)
            report.points.append(QualityPoint(
                label=label,
                methods=[m.spec() for m in methods],
                steps=count,
                seconds_per_image=elapsed / samples,
                denoiser_gflops_per_image=denoiser_flops(pipe, methods, requests[0]) / 1e9,
                fid_real=_distance(real_features, image_features),
                fid_vs_reference=None if is_reference else _distance(reference[1], image_features),
                psnr_vs_reference=None if is_reference else psnr(reference[0].numpy(), images.numpy(), 255.0),
                adherence=float((predicted == label_tensor).float().mean()),
            ))
    return report


def plot_speed_quality(report: QualityReport, path: str | Path, x: str = "denoiser_gflops_per_image") -> None:
    """FID against cost: vanilla's step sweep as a curve, each method as a labelled point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the speed-quality plot needs matplotlib: pip install 'fastdiff[eval]'") from exc
    vanilla = sorted((p for p in report.points if not p.methods), key=lambda p: getattr(p, x))
    methods = [p for p in report.points if p.methods]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot([getattr(p, x) for p in vanilla], [p.fid_real for p in vanilla], "o-", color="black",
            label="vanilla, fewer steps")
    for p in vanilla:
        ax.annotate(f"{p.steps}", (getattr(p, x), p.fid_real), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for p in methods:
        ax.plot(getattr(p, x), p.fid_real, "s", label=p.label)
    ax.set_xlabel({"denoiser_gflops_per_image": "denoiser GFLOPs per image",
                   "seconds_per_image": "seconds per image"}.get(x, x))
    ax.set_ylabel("FID-digits vs real digits (lower is better)")
    ax.set_title(f"{report.model}: speed vs quality (N={report.samples})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
