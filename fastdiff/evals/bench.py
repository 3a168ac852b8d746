"""Side-by-side speed measurement against the same pipeline with nothing applied.

Vanilla and accelerated runs alternate in one process on one pipeline object (``apply`` and
``remove`` between them), so both see the same weights, allocator state, thermal state and
background load; the medians are then comparable. FLOPs are counted in separate, untimed
runs because counting slows every operator.

The denoiser FLOP ratio is the accelerated run's ledger's (vanilla's denoiser FLOPs for the same
call over those run), so the ratio printed beside the speedup and the ledger line are one number.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..core.accelerator import apply
from ..core.flops import total_flop_counter
from ..core.ledger import Report
from ..core.method import Method
from ..core.progress import pipeline_bar_off, plural, progress_bar
from ..media import pipeline_outputs
from ..runner import GenerationRequest, call_kwargs


@dataclass
class RunStats:
    times_s: list[float]
    median_s: float
    peak_memory_bytes: int | None
    pipeline_flops: int
    denoiser_flops: int
    cache_bytes: int
    first_call_s: float | None = None
    """The first (warm-up) call: with a compiled denoiser, compilation is in it."""
    graphs_first_call: int = 0
    """Graphs torch.compile made during the first call."""
    graphs_later: int = 0
    """Graphs made during every later call (0: nothing recompiles once warm)."""

    @property
    def compile_s(self) -> float | None:
        """What the first call took beyond a warm one: the compile time."""
        return None if self.first_call_s is None else max(self.first_call_s - self.median_s, 0.0)


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    request: dict[str, Any]
    methods: list[str]
    vanilla: RunStats
    accelerated: RunStats
    speedup: float
    flop_ratio: float
    denoiser_flop_ratio: float
    max_abs_diff: float
    psnr_db: float
    report: str
    notes: list[str] = field(default_factory=list)
    processes: int = 1
    """Processes that split each accelerated denoiser call (patch parallelism under a launcher):
    then the FLOP ratios are this process's share of the work, split rather than saved."""
    compile: str = "none"
    """How the denoiser was compiled for both (``none``, ``regional``, ``full``)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        v, a = self.vanilla, self.accelerated
        def mem(stats: RunStats) -> str:
            return "n/a" if stats.peak_memory_bytes is None else f"{stats.peak_memory_bytes / 2**20:.0f} MiB"

        return "\n".join([
            f"model {self.model} on {self.device} ({self.dtype}), {self.request}",
            f"methods: {', '.join(self.methods) or 'none'}",
            f"{'':12} {'median s':>9} {'peak mem':>10} {'cache':>10} {'pipeline FLOPs':>15}",
            *(
                f"{name:12} {s.median_s:>9.3f} {mem(s):>10} {s.cache_bytes / 2**20:>6.1f} MiB "
                f"{s.pipeline_flops / 1e9:>13.1f} G"
                for name, s in (("vanilla", v), ("accelerated", a))
            ),
            *(
                [f"compiled ({self.compile}) for both; compile time (first call beyond a warm one): vanilla "
                 f"{v.compile_s:.1f} s ({v.graphs_first_call} graphs), accelerated {a.compile_s:.1f} s "
                 f"({a.graphs_first_call} graphs); graphs made after the first call: vanilla {v.graphs_later}, "
                 f"accelerated {a.graphs_later}"]
                if self.compile != "none" and v.compile_s is not None and a.compile_s is not None else []
            ),
            f"speedup {self.speedup:.2f}x (wall clock)   FLOP ratio {self.flop_ratio:.2f}x (ideal; denoiser "
            f"alone {self.denoiser_flop_ratio:.2f}x)"
            + (f", per process: the work is split across {self.processes} processes, not saved"
               if self.processes > 1 else ""),
            f"fidelity to vanilla: max |diff| {self.max_abs_diff:.4f}, PSNR {self.psnr_db:.2f} dB",
            f"ledger: {self.report}",
        ])


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Rows of already formatted cells as aligned lines: each column as wide as its widest cell
    (header included), the first ``left`` columns left-aligned (names), the rest right-aligned
    (numbers). Fixed widths misalign as soon as one name (a peer's setting, a composed method
    spec) is longer than the width guessed for it."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return [" ".join(f"{cell:<{w}}" if i < left else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(line, widths)))
            .rstrip() for line in (header, *rows)]


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(pipe: DiffusionPipeline, request: GenerationRequest) -> tuple[float, int | None, np.ndarray]:
    """One call's wall time (the device synchronised around it), peak GPU memory and its images."""
    device = pipe.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    images = pipeline_outputs(pipe(**call_kwargs(pipe, request), output_type="np"))
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return elapsed, peak, np.asarray(images)


def _counted(pipe: DiffusionPipeline, methods: Sequence[Method], request: GenerationRequest) -> tuple[int, Report]:
    """Whole-pipeline FLOPs of one call, and the ledger's report of it (the ledger's vanilla shadow
    passes are hidden from the counter here, so the total is the work the call really did)."""
    accelerator = apply(pipe, *methods, count_flops=True)
    try:  # operators are counted as they dispatch, which compiled kernels do not: count eagerly
        with torch.compiler.set_stance("force_eager"), total_flop_counter() as counter:
            pipe(**call_kwargs(pipe, request), output_type="np")
        report = accelerator.report()
    finally:
        accelerator.remove()
    return counter.get_total_flops(), report


def benchmark(pipe: DiffusionPipeline, methods: Sequence[Method], request: GenerationRequest, *,
              model: str = "", warmup: int = 1, repeats: int = 3, show_progress: bool = True,
              compile: str = "none", compile_options: dict[str, Any] | None = None) -> BenchResult:
    """Alternate vanilla and accelerated calls; medians, FLOP ratios and fidelity of the outputs.
    ``show_progress``: one bar over all the calls (advanced between them, outside the timings).
    ``compile``: compile the denoiser first (``regional`` or ``full``, see
    :func:`fastdiff.compile_pipeline`), for vanilla and accelerated alike; the first call of each,
    where compilation happens, is reported apart and never timed."""
    from ..compilation import COMPILE_MODES, compile_pipeline
    from ..core.compiled import graphs_compiled

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile: must be one of {list(COMPILE_MODES)}, got {compile!r}")
    if compile != "none" and warmup < 1:
        raise ValueError("warmup: a compiled benchmark needs at least 1 warm-up call (the first call compiles)")
    compile_pipeline(pipe, compile, compile_options)
    first: dict[str, float] = {}
    graphs: dict[str, list[int]] = {"vanilla": [0, 0], "accelerated": [0, 0]}  # first call, later calls
    times: dict[str, list[float]] = {"vanilla": [], "accelerated": []}
    peaks: dict[str, int | None] = {"vanilla": None, "accelerated": None}
    images: dict[str, np.ndarray] = {}
    calls = 2 * (warmup + repeats) + 2
    desc = f"timing vanilla and accelerated ({warmup} warm-up and {plural(repeats, 'timed call')} each)"
    with pipeline_bar_off(pipe), progress_bar(total=calls, desc=desc, unit="call", enabled=show_progress) as bar:
        for i in range(warmup + repeats):
            for kind in ("vanilla", "accelerated"):
                accelerator = apply(pipe, *methods) if kind == "accelerated" else None
                made = graphs_compiled()
                try:
                    elapsed, peak, out = timed_call(pipe, request)
                finally:
                    if accelerator is not None:
                        accelerator.remove()
                graphs[kind][min(i, 1)] += graphs_compiled() - made
                first.setdefault(kind, elapsed)
                bar.update(1)
                images[kind] = out
                if i >= warmup:
                    times[kind].append(elapsed)
                    if peak is not None:
                        peaks[kind] = max(peaks[kind] or 0, peak)
        counted = {"vanilla": _counted(pipe, [], request)}
        bar.update(1)
        counted["accelerated"] = _counted(pipe, methods, request)
        bar.update(1)
    stats = {
        kind: RunStats(times[kind], statistics.median(times[kind]), peaks[kind], flops, report.flops_run or 0,
                       report.peak_cache_bytes, first_call_s=first[kind] if warmup else None,
                       graphs_first_call=graphs[kind][0], graphs_later=graphs[kind][1])
        for kind, (flops, report) in counted.items()
    }
    vanilla_flops, accel_flops = counted["vanilla"][0], counted["accelerated"][0]
    accel_report = counted["accelerated"][1]
    notes = [f"torch {torch.__version__}", f"threads {torch.get_num_threads()}"]
    if compile != "none":
        notes.append("FLOPs counted in separate eager runs (counting sees operators; compiled kernels are not dispatched)")
    if accel_report.flops_vanilla != stats["vanilla"].denoiser_flops:
        notes.append(f"the ledger's vanilla denoiser FLOPs ({accel_report.flops_vanilla}) differ from the vanilla "
                     f"run's ({stats['vanilla'].denoiser_flops}): the two calls did not make the same denoiser calls")
    diff = np.abs(images["vanilla"].astype(np.float64) - images["accelerated"].astype(np.float64))
    return BenchResult(
        model=model,
        device=str(pipe.device),
        dtype=str(pipe.dtype).removeprefix("torch."),
        request=asdict(request),
        methods=[m.spec() for m in methods],
        vanilla=stats["vanilla"],
        accelerated=stats["accelerated"],
        speedup=stats["vanilla"].median_s / stats["accelerated"].median_s,
        flop_ratio=vanilla_flops / max(accel_flops, 1),
        denoiser_flop_ratio=accel_report.flop_ratio or 1.0,
        max_abs_diff=float(diff.max()),
        psnr_db=psnr(images["vanilla"], images["accelerated"]),
        report=accel_report.summary(),
        notes=notes,
        processes=accel_report.processes,
        compile=compile,
    )


def write(result: BenchResult, path: str | Path) -> None:
    Path(path).write_text(result.to_json())


def shuffled_rounds(runners: dict[str, Any], repeats: int, seed: int = 0,
                    warmup: bool = True) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run every ``runner() -> (seconds, output)`` once per round in a shuffled order; with
    ``warmup`` an extra first round warms up untimed (without: the caller warmed up already).
    Returns the timed seconds and the last output of each, by name.

    Shuffling spreads slow drifts of the machine (heat, background load) over all settings
    instead of charging them to whichever always runs last.
    """
    import random

    times: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, Any] = {}
    order = list(runners)
    rng = random.Random(seed)
    for i in range(repeats + warmup):
        rng.shuffle(order)
        for name in order:
            elapsed, outputs[name] = runners[name]()
            if i or not warmup:
                times[name].append(elapsed)
    return times, outputs


def print_medians(times: dict[str, list[float]], reference: str = "vanilla") -> dict[str, float]:
    medians = {name: statistics.median(values) for name, values in times.items()}
    width = max(len(name) for name in times)
    for name, values in times.items():
        print(f"{name:{width}} median {medians[name]:6.2f} s  runs {[round(v, 2) for v in values]}  "
              f"speedup {medians[reference] / medians[name]:.2f}x")
    return medians
