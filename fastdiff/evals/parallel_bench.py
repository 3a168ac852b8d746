"""Patch parallelism against one process, side by side, launched by the harness itself.

The single-process run (the same methods without ``PatchParallel``) happens in this process;
each parallel setting then runs in ``world_size`` fresh processes started like torchrun would,
one after the other, never at the same time as anything else. Reported: median wall time of the
whole pipeline call (warm-up calls excluded), speedup, the Ledger's bytes per step by layer type
and communication time, and fidelity (PSNR, max |diff|) against the single-process image.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.accelerator import apply
from ..core.method import parse_method
from ..core.progress import plural, progress_bar
from ..parallel.group import check_processes_fit, launched_device, peak_memory_bytes, resident_memory_bytes
from ..parallel.patch_parallel import PatchParallel
from ..media import pipeline_outputs
from ..runner import GenerationRequest, call_kwargs, check_request, load
from .bench import psnr, text_table


@dataclass
class ParallelRun:
    label: str
    methods: list[str]
    processes: int
    times_s: list[float]
    median_s: float
    speedup: float = 1.0
    bytes_sent_per_step: dict[str, float] = field(default_factory=dict)
    comm_seconds: float = 0.0
    max_abs_diff: float = 0.0
    psnr_db: float = float("inf")
    split: str = ""  # how the processes shared the image (PatchParallel.describe_split)


@dataclass
class ParallelBenchResult:
    model: str
    request: dict[str, Any]
    threads: int | None
    runs: list[ParallelRun]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        lines = [f"model {self.model}, {self.request}, threads per process: {self.threads or 'default'}"]
        lines += text_table(
            ["setting", "procs", "median s", "speedup", "MiB/step sent", "comm s", "max|diff|", "PSNR"],
            [[r.label, str(r.processes), f"{r.median_s:.2f}", f"{r.speedup:.2f}x",
              f"{sum(r.bytes_sent_per_step.values()) / 2**20:.3f}", f"{r.comm_seconds:.2f}", f"{r.max_abs_diff:.2e}",
              f"{r.psnr_db:.2f}"] for r in self.runs])
        for r in self.runs[1:]:
            lines.append(f"  {r.label}: {r.split}")
        for r in self.runs:
            if r.bytes_sent_per_step:
                kinds = ", ".join(f"{k} {v / 2**20:.3f}" for k, v in r.bytes_sent_per_step.items() if v)
                lines.append(f"  {r.label}: MiB sent per step by layer type (one process): {kinds}")
        return "\n".join(lines)


def _loaded(model: str, device: str, dtype: str, threads: int | None) -> Any:
    if threads is not None:
        torch.set_num_threads(threads)
    pipe = load(model, launched_device(device), dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _timed_calls(pipe: Any, request: GenerationRequest, specs: list[str], warmup: int,
                 repeats: int) -> tuple[list[float], np.ndarray, Any]:
    accelerator = apply(pipe, *(parse_method(s) for s in specs))
    try:
        times, image = [], None
        for i in range(warmup + repeats):
            start = time.perf_counter()
            image = pipeline_outputs(pipe(**call_kwargs(pipe, request), output_type="np"))
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return times, np.asarray(image), accelerator.report()
    finally:
        accelerator.remove()


def _worker(rank: int, model: str, request: GenerationRequest, specs: list[str], warmup: int, repeats: int,
            device: str, dtype: str, threads: int | None) -> tuple[list[float], np.ndarray, dict[str, float], float]:
    times, image, report = _timed_calls(_loaded(model, device, dtype, threads), request, specs, warmup, repeats)
    steps = max(len(report.steps), 1)
    per_step = {kind: c.bytes_sent / steps for kind, c in report.comm_by_kind.items()
                if kind != "wait" and not kind.startswith("vae")}  # the VAE decode runs once, not per step
    return times, image, per_step, report.comm_seconds


def parallel_benchmark(model: str, request: GenerationRequest, settings: dict[str, list[str]], processes: int, *,
                       warmup: int = 1, repeats: int = 2, threads: int | None = None, device: str = "auto",
                       dtype: str = "auto", show_progress: bool = True) -> ParallelBenchResult:
    """``settings``: label -> method specs, each including one ``patch:...`` spec. ``show_progress``:
    a bar over the runs (one process, then each setting)."""
    from ..check_only import exit_if_check_only
    from ..parallel.launch import run_processes

    if processes < 2:
        raise ValueError(f"--parallel: needs at least 2 processes to compare with one, got {processes}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads: must be >= 1, got {threads}")
    check_processes_fit(processes, device, threads=threads)
    patches: dict[str, PatchParallel] = {}
    for label, specs in settings.items():
        found = [m for m in map(parse_method, specs) if isinstance(m, PatchParallel)]
        if len(found) != 1:
            raise ValueError(f"--parallel: setting {label!r} has {len(found)} patch:... methods, {specs}; it takes one "
                             f"(fastdiff bench adds patch:mode=distrifusion to a setting that has none)")
        patches[label] = found[0]
    exit_if_check_only("fastdiff bench")
    before = resident_memory_bytes()
    pipe = _loaded(model, device, dtype, threads)
    holding = resident_memory_bytes()
    check_request(pipe, request)  # steps, class label and size, before any process starts
    splits = {}
    for label, patch in patches.items():
        try:
            splits[label] = patch.describe_split(pipe, processes, height=request.height,
                                                 guidance_scale=request.guidance_scale)
        except ValueError as exc:
            raise ValueError(f"--parallel {processes}: setting {label!r}: {exc}") from None
    # a process holds what this one holds now; this one gives its pipeline back before they start
    check_processes_fit(processes, device, threads=threads, process_bytes=holding,
                        freed_bytes=(holding - before) if holding and before else None)
    single_specs = [s for s in next(iter(settings.values())) if not isinstance(parse_method(s), PatchParallel)]
    desc = f"one process, then {plural(len(settings), 'setting')} on {processes} processes"
    with progress_bar(total=1 + len(settings), desc=desc, unit="run", enabled=show_progress) as bar:
        bar.set_postfix_str("one process")
        times, reference, _ = _timed_calls(pipe, request, single_specs, warmup, repeats)
        bar.update(1)
        del pipe
        gc.collect()  # its memory goes back before the processes load their own copies
        # a process needs what a whole call needed here (the weights and the call's peak), not
        # only what loading took: checked again now that the call has shown its peak
        check_processes_fit(processes, device, threads=threads, process_bytes=peak_memory_bytes(),
                            basis="the peak of the one-process call just run")
        single = ParallelRun("one process" + (f" ({', '.join(single_specs)})" if single_specs else ""), single_specs, 1,
                             times, statistics.median(times), split="one process: no split")
        runs = [single]
        for label, specs in settings.items():
            bar.set_postfix_str(label)
            outcomes = run_processes(processes, _worker, model, request, specs, warmup, repeats, device, dtype, threads,
                                     threads=threads)
            bar.update(1)
            for rank, (status, value) in enumerate(outcomes):
                if status == "killed":
                    raise ChildProcessError(
                        f"--parallel: process {rank} of setting {label!r} was killed ({value})"
                        + ("; SIGKILL is what the system sends when it runs out of memory: use fewer processes "
                           "or a smaller --height/--width" if value == "SIGKILL" else ""))
                if status != "ok":
                    raise RuntimeError(f"--parallel: process {rank} of setting {label!r} failed: {value}")
            run_times, image, per_step, comm = outcomes[0][1]
            diff = np.abs(image.astype(np.float64) - reference.astype(np.float64))
            runs.append(ParallelRun(label, specs, processes, run_times, statistics.median(run_times),
                                    single.median_s / statistics.median(run_times), per_step, comm,
                                    float(diff.max()), psnr(image, reference), splits[label]))
    return ParallelBenchResult(model, asdict(request), threads, runs)
