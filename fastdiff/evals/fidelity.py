"""Paired fidelity: the same prompts and seeds, vanilla against accelerated, saved and scored.

For each seed ``s`` the prompt is ``prompts[s % len(prompts)]`` (the seed's value, not its
position, so a subset or an extension of the seed list pairs the same prompt with the same
seed). Both images are written as PNG to ``out_dir/vanilla/`` and ``out_dir/accelerated/``
named by the seed; images already there are not generated again, so an interrupted run
resumes, and more seeds can be added later. ``out_dir/settings.json`` records what made the
images, and a run with other settings is refused rather than mixing two experiments.

Scores are computed from the PNG files (uint8, as a user would see them): FID(accelerated,
vanilla), the mean PSNR over pairs (data range 255) and the largest absolute pixel difference;
with ``real_dir``, also FID of each against real images.

Seeds in one call are batched, each image with its own ``torch.Generator``, so an image depends
on its seed and prompt only (up to floating-point effects of the batch composition; the two
images of a pair are always generated in the same composition, hence PSNR inf for a method that
changes nothing). Under ``torch.distributed`` each rank generates and scores ``seeds[rank::world]``
and the sums are reduced; all ranks return the same result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from ..core.accelerator import apply, pipeline_default_steps
from ..core.method import Method
from ..core.progress import all_bars_off, pipeline_bar_off, plural, progress_bar
from ..runner import GenerationRequest, call_kwargs
from .bench import psnr
from .fid import (
    FeatureExtractor,
    FrechetAccumulator,
    all_reduce,
    batched,
    common_size,
    extract_folder,
    list_images,
    load_extractor,
    load_images,
    progress,
    rank_and_world,
    reduce_device,
)

REFERENCE = "vanilla"
KINDS = (REFERENCE, "accelerated")
SETTINGS_FILE = "settings.json"


# --------------------------------------------------------------------------------------------
# Inputs


def parse_seeds(text: str) -> list[int]:
    """``"0-999"``, ``"0,5,7"``, ``"0-9,20-29"`` -> the seeds in that order (no repeats)."""
    seeds: list[int] = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        if len(bounds) not in (1, 2) or not all(b.strip().isdigit() for b in bounds):
            raise ValueError(
                f"--seeds: {part.strip()!r} in {text!r} is not a seed or a range; use e.g. 0-999, 0,5,7 or 0-9,20-29"
            )
        first, last = int(bounds[0]), int(bounds[-1])
        if last < first:
            raise ValueError(f"--seeds: range {part.strip()!r} ends before it starts")
        seeds.extend(range(first, last + 1))
    repeated = sorted(seed for seed, count in Counter(seeds).items() if count > 1)
    if repeated:
        raise ValueError(f"--seeds: {text!r} lists seed(s) {repeated[:5]} more than once")
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    """The inverse of :func:`parse_seeds`: consecutive runs collapsed to ranges."""
    parts: list[str] = []
    start = prev = None
    for seed in [*seeds, None]:
        if seed is not None and prev is not None and seed == prev + 1:
            prev = seed
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = seed
    return ",".join(parts)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line, surrounding whitespace stripped; blank lines are ignored."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts: cannot read {file} ({exc})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {file} has no prompts (one per line; blank lines are ignored)")
    return prompts


# --------------------------------------------------------------------------------------------
# Generation


def image_path(out_dir: Path, kind: str, seed: int) -> Path:
    return out_dir / kind / f"{seed:06d}.png"


def batch_call_kwargs(pipe: DiffusionPipeline, requests: Sequence[GenerationRequest]) -> dict[str, Any]:
    """One call's kwargs for several single-image requests: prompts batched, one generator each.

    Built from :func:`call_kwargs` per request so text-to-image and class-conditional pipelines
    are handled alike; diffusers draws image i's latents from ``generator[i]``.
    """
    merged: dict[str, Any] = {}
    for request in requests:
        for key, value in call_kwargs(pipe, replace(request, batch_size=1)).items():
            if key == "generator":
                merged.setdefault(key, []).append(value)
            elif isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                merged.setdefault(key, value)
    return merged


def _generate(pipe: DiffusionPipeline, methods: Sequence[Method], requests: Sequence[GenerationRequest]) -> list:
    accelerator = apply(pipe, *methods) if methods else None
    try:
        return pipe(**batch_call_kwargs(pipe, requests), output_type="pil").images
    finally:
        if accelerator is not None:
            accelerator.remove()


def _save(image: Image.Image, path: Path) -> None:
    """Write then rename, so an interrupted run never leaves a truncated PNG that looks done."""
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    os.replace(partial, path)


def generate_pairs(pipe: DiffusionPipeline, methods: Sequence[Method], seeds: Sequence[int], prompts: Sequence[str],
                   out_dir: Path, request: GenerationRequest, *, batch_size: int, show_progress: bool,
                   model: str = "") -> int:
    """Generate this rank's missing images; returns how many were written.

    One setting at a time, each with its own bar over its missing images; the batches are the
    same for both (chunks of the seeds either one lacks), so a pair shares its batch composition.
    Methods that need a calibration get it (see :func:`fastdiff.runner.prepare_methods`, which
    ``model`` feeds) only when accelerated images are missing: a finished folder costs none.
    """
    from ..runner import prepare_methods

    for kind in KINDS:
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    pending = [s for s in seeds if any(not image_path(out_dir, kind, s).exists() for kind in KINDS)]
    chunks = list(batched(pending, batch_size))
    steps = request.steps or pipeline_default_steps(pipe)
    written = 0
    with pipeline_bar_off(pipe):
        for kind, kind_methods in ((REFERENCE, ()), ("accelerated", methods)):
            todo = [[s for s in chunk if not image_path(out_dir, kind, s).exists()] for chunk in chunks]
            if kind_methods and any(todo):
                with all_bars_off(not show_progress):
                    kind_methods = prepare_methods(pipe, kind_methods, request, model)
            desc = "+".join(m.spec() for m in kind_methods) or f"{REFERENCE} {plural(steps, 'step')}"
            with progress_bar(total=sum(map(len, todo)), desc=desc, unit="img", enabled=show_progress) as bar:
                for missing in filter(None, todo):
                    requests = [replace(request, prompt=prompts[s % len(prompts)], seed=s) for s in missing]
                    for seed, image in zip(missing, _generate(pipe, kind_methods, requests)):
                        _save(image, image_path(out_dir, kind, seed))
                        written += 1
                    bar.update(len(missing))
    return written


# --------------------------------------------------------------------------------------------
# Settings recorded next to the images


def _settings(model: str, pipe: DiffusionPipeline, methods: Sequence[Method], prompts: Sequence[str],
              request: GenerationRequest) -> dict[str, Any]:
    fields = asdict(request)
    for transient in ("prompt", "seed", "batch_size"):
        fields.pop(transient)
    return {
        "model": model,
        "methods": [m.spec() for m in methods],
        "reference": REFERENCE,
        "request": fields,
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "device_type": pipe.device.type,
    }


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to add images made differently to a folder; record the settings on first use."""
    path = out_dir / SETTINGS_FILE
    if path.exists():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in settings if recorded.get(k) != settings[k])
        if changed:
            differences = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings[k]!r} now" for k in changed)
            raise ValueError(
                f"--out-dir: {out_dir} holds images made with other settings ({differences}); use another folder "
                f"(to compare another method with the same vanilla images, link {REFERENCE}/ into the new one)"
            )
    elif rank_and_world()[0] == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


# --------------------------------------------------------------------------------------------
# Scores


@dataclass
class PairedResult:
    model: str
    methods: list[str]
    reference: str
    n: int
    seeds: str
    fid_vs_vanilla: float
    psnr_mean: float
    identical_pairs: int
    max_abs_diff: float
    extractor: str
    generated: int
    out_dir: str
    fid_real_vanilla: float | None = None
    fid_real_accelerated: float | None = None
    n_real: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        differing = self.n - self.identical_pairs
        lines = [
            f"paired fidelity, {self.model}: N = {self.n} pairs (seeds {self.seeds}), "
            f"{' + '.join(self.methods) or 'no method'} vs {self.reference}; features: {self.extractor}",
            f"  FID(accelerated, vanilla)  {self.fid_vs_vanilla:.4f}",
            f"  PSNR mean                  {self.psnr_mean:.2f} dB (over {differing} differing pairs; "
            f"{self.identical_pairs} identical)",
            f"  max |diff|                 {self.max_abs_diff:.0f} of 255",
        ]
        if self.fid_real_vanilla is not None:
            lines += [f"  FID(real, vanilla)         {self.fid_real_vanilla:.4f}  (N real = {self.n_real})",
                      f"  FID(real, accelerated)     {self.fid_real_accelerated:.4f}"]
        lines.append(f"generated {self.generated} new image(s) in {self.out_dir}")
        return "\n".join(lines)


@dataclass
class _PairStats:
    """Per-rank sums that are reduced across ranks before they become a result."""

    psnr_sum: float = 0.0
    differing: int = 0
    identical: int = 0
    max_abs_diff: float = 0.0

    def add(self, vanilla: torch.Tensor, accelerated: torch.Tensor) -> None:
        for a, b in zip(vanilla.numpy(), accelerated.numpy()):
            value = psnr(a, b, data_range=255.0)
            if math.isinf(value):
                self.identical += 1
            else:
                self.psnr_sum += value
                self.differing += 1
        diff = (vanilla.to(torch.int16) - accelerated.to(torch.int16)).abs()
        self.max_abs_diff = max(self.max_abs_diff, float(diff.max()) if diff.numel() else 0.0)

    def reduced(self, device: torch.device) -> _PairStats:
        psnr_sum, differing, identical = all_reduce([self.psnr_sum, self.differing, self.identical], "sum", device)
        (max_abs_diff,) = all_reduce([self.max_abs_diff], "max", device)
        return _PairStats(psnr_sum, int(differing), int(identical), max_abs_diff)

    @property
    def psnr_mean(self) -> float:
        """Mean over pairs that differ; inf when no pair differs (an identical pair has no finite PSNR)."""
        return self.psnr_sum / self.differing if self.differing else math.inf


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _score(extractor: FeatureExtractor, out_dir: Path, seeds: Sequence[int],
           real: tuple[list[Path], tuple[int, int]] | None, *, batch_size: int, device: torch.device,
           show_progress: bool) -> dict[str, Any]:
    """Every score of this rank's pairs (and share of real images), reduced across ranks."""
    sync_device = reduce_device(device)
    pair_fid = FrechetAccumulator(extractor.num_features, sync_device)
    real_fids = {kind: FrechetAccumulator(extractor.num_features, sync_device) for kind in KINDS} if real else {}
    stats = _PairStats()
    size = _image_size(image_path(out_dir, REFERENCE, seeds[0])) if seeds else (0, 0)
    chunks = progress(batched(list(seeds), batch_size), total=math.ceil(len(seeds) / batch_size),
                      desc="scoring pairs", enabled=show_progress)
    for chunk in chunks:
        images = {kind: load_images([image_path(out_dir, kind, s) for s in chunk], size) for kind in KINDS}
        stats.add(images[REFERENCE], images["accelerated"])
        features = {kind: extractor(images[kind]) for kind in KINDS}
        pair_fid.update(features[REFERENCE], real=True)
        pair_fid.update(features["accelerated"], real=False)
        for kind, accumulator in real_fids.items():
            accumulator.update(features[kind], real=False)
    if real:
        real_files, real_size = real
        for batch in extract_folder(extractor, real_files, real_size, batch_size, desc="real features",
                                    show_progress=show_progress):
            for accumulator in real_fids.values():
                accumulator.update(batch, real=True)
    totals = stats.reduced(sync_device)
    scores: dict[str, Any] = {
        "fid_vs_vanilla": pair_fid.compute(), "psnr_mean": totals.psnr_mean,
        "identical_pairs": totals.identical, "max_abs_diff": totals.max_abs_diff,
    }
    if real:
        scores.update(fid_real_vanilla=real_fids[REFERENCE].compute(),
                      fid_real_accelerated=real_fids["accelerated"].compute(), n_real=len(real[0]))
    return scores


# --------------------------------------------------------------------------------------------
# The whole job


def paired_fidelity(
    model: str | DiffusionPipeline,
    methods: Sequence[Method],
    seeds: Sequence[int] | str,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    request: GenerationRequest | None = None,
    reference: str = REFERENCE,
    real_dir: str | os.PathLike | None = None,
    features: str | FeatureExtractor = "inception",
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    show_progress: bool = True,
) -> PairedResult:
    """Generate (or reuse) vanilla and accelerated images for ``seeds`` and score them pairwise.

    ``model`` is a pipeline (used as it is, and left vanilla afterwards) or a name for
    :func:`fastdiff.runner.load` (``device``/``dtype`` apply then). Unset ``request`` fields
    take a built-in model's defaults. The feature extractor and the real folder are checked
    before anything is generated, so a missing weights file fails in seconds, not after hours.
    """
    from ..check_only import exit_if_check_only
    from ..runner import check_prompt, check_request, load

    if reference != REFERENCE:
        raise ValueError(f"--reference: only {REFERENCE!r} is supported, got {reference!r}")
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts: pass a list of prompts (read_prompts(path) reads a file)")
    if not prompts:
        raise ValueError("--prompts: no prompts given")
    seed_list = parse_seeds(seeds) if isinstance(seeds, str) else [int(s) for s in seeds]
    if len(seed_list) < 2:
        raise ValueError(f"--seeds: FID needs at least 2 seeds, got {len(seed_list)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    real_files = list_images(real_dir, "--real") if real_dir is not None else None
    real = (real_files, common_size(real_files, "--real")) if real_files else None
    extractor = load_extractor(features, inception_weights=inception_weights)

    name = model if isinstance(model, str) else getattr(model, "name_or_path", None) or type(model).__name__
    request = (request or GenerationRequest())
    if isinstance(model, str):
        request = request.with_model_defaults(model)
        exit_if_check_only("fastdiff fid")
        pipe = load(model, device, dtype)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = model
    extractor.to(pipe.device)
    # what the pipeline cannot run is refused before its folder and settings file are made
    check_request(pipe, replace(request, prompt=prompts[0], batch_size=batch_size))
    for prompt in dict.fromkeys(prompts[1:]):
        check_prompt(pipe, prompt)
    folder = Path(out_dir)
    settings = _settings(name, pipe, methods, prompts, request)
    _check_settings(folder, settings)

    rank, world = rank_and_world()
    mine = seed_list[rank::world]
    written = generate_pairs(pipe, methods, mine, prompts, folder, request, batch_size=batch_size,
                             show_progress=show_progress, model=name)
    scores = _score(extractor, folder, mine, real, batch_size=batch_size, device=pipe.device,
                    show_progress=show_progress)
    (generated,) = all_reduce([written], "sum", reduce_device(pipe.device))
    return PairedResult(
        model=name, methods=settings["methods"], reference=REFERENCE, n=len(seed_list),
        seeds=format_seeds(seed_list), extractor=extractor.name, generated=int(generated), out_dir=str(folder),
        settings={**settings, "batch_size": batch_size, "world_size": world, **extractor.settings}, **scores,
    )
