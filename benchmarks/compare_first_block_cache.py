"""fastdiff's DeepCache-style block reuse against diffusers' own FirstBlockCache, on one pipeline.

Every setting runs on the same pipeline object with the same prompt and seed, in shuffled order
(one warm-up round, then ``--repeats`` timed rounds). Reported per setting: median wall time,
speedup over vanilla, the denoiser FLOP ratio (vanilla's denoiser FLOPs over the setting's, all
counted with ``FlopCounterMode``, see below), the
share of transformer-block evaluations skipped (a block counts as evaluated when its first
sub-layer runs), and PSNR against vanilla's image. FLOPs are counted once, on a vanilla call:
each setting's are vanilla's minus those of the block evaluations it skipped.

    python benchmarks/compare_first_block_cache.py --model sd3-arch --steps 10 --repeats 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from collections import Counter
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from torch.utils.flop_counter import FlopCounterMode

import fastdiff
from fastdiff.anatomy import anatomy_of
from fastdiff.check_only import exit_if_check_only
from fastdiff.evals.bench import print_medians, psnr, shuffled_rounds
from fastdiff.media import pipeline_outputs
from fastdiff.models import build_builtin
from fastdiff.runner import GenerationRequest, call_kwargs, example_prompt


@contextmanager
def block_evaluations(denoiser: torch.nn.Module) -> Iterator[Counter[str]]:
    """Evaluations per block: a block reused or skipped by any cache is called (or not) but never
    runs its first sub-layer, so that sub-layer's calls are the block's evaluations."""
    counts: Counter[str] = Counter()
    handles = []
    for block in anatomy_of(denoiser).blocks:
        first = next(denoiser.get_submodule(block.path).children())
        handles.append(first.register_forward_pre_hook(lambda *_, path=block.path: counts.update([path])))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def vanilla_costs(denoiser: torch.nn.Module, call: Callable[[], Any]) -> tuple[int, dict[str, float], Counter[str]]:
    """One vanilla call under ``FlopCounterMode``: the denoiser's FLOPs in all, each block's FLOPs
    per evaluation, and each block's evaluations. A cached setting's FLOPs are then vanilla's minus
    the FLOPs of the block evaluations it did not run (residual additions and the caches'
    similarity checks are left out: they are a few element-wise operations per step)."""
    counter = FlopCounterMode(display=False, depth=0)
    per_block: dict[str, float] = {}
    started: dict[str, int] = {}
    handles = []
    for block in anatomy_of(denoiser).blocks:
        module = denoiser.get_submodule(block.path)
        handles.append(module.register_forward_pre_hook(
            lambda *_, path=block.path: started.__setitem__(path, counter.get_total_flops())))
        handles.append(module.register_forward_hook(
            lambda *_, path=block.path: per_block.__setitem__(
                path, per_block.get(path, 0) + counter.get_total_flops() - started[path])))
    try:
        with block_evaluations(denoiser) as evaluations, counter:
            call()
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops(), {p: f / max(evaluations[p], 1) for p, f in per_block.items()}, evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd3-arch")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--thresholds", default="0.1,0.3", help="FirstBlockCache thresholds")
    parser.add_argument("--intervals", default="2,3", help="fastdiff DeepCache intervals")
    parser.add_argument("--branch", type=int, default=1, help="fastdiff DeepCache: live blocks at each end")
    parser.add_argument("--count-only", action="store_true", help="only the FLOP and block counts (no timing)")
    args = parser.parse_args()
    exit_if_check_only(parser.prog)

    pipe = build_builtin(args.model)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.transformer

    request = GenerationRequest(prompt=example_prompt(args.model), steps=args.steps, height=args.height,
                                width=args.width).with_model_defaults(args.model)

    def call() -> np.ndarray:
        return np.asarray(pipeline_outputs(pipe(**call_kwargs(pipe, request), output_type="np")))

    def timed(setup: Callable[[], Callable[[], None]]) -> Callable[[], tuple[float, tuple[np.ndarray, Counter]]]:
        def run() -> tuple[float, tuple[np.ndarray, Counter]]:
            undo = setup()
            try:
                with block_evaluations(denoiser) as evaluations:
                    start = time.perf_counter()
                    images = call()
                    elapsed = time.perf_counter() - start
                return elapsed, (images, evaluations)
            finally:
                undo()
        return run

    def vanilla() -> Callable[[], None]:
        return lambda: None

    def first_block(threshold: float) -> Callable[[], Callable[[], None]]:
        def setup() -> Callable[[], None]:
            if hasattr(denoiser, "enable_cache"):  # the pipeline sets its cache contexts itself
                denoiser.enable_cache(FirstBlockCacheConfig(threshold=threshold))
                return denoiser.disable_cache
            # SD3's transformer has no enable_cache() and its pipeline sets no cache context, so
            # the context is set here around the whole call (one guidance batch, one context)
            apply_first_block_cache(denoiser, FirstBlockCacheConfig(threshold=threshold))
            _set_cache_context(denoiser, CacheContext("cond"))

            def undo() -> None:
                _set_cache_context(denoiser, None)
                registry = HookRegistry.check_if_exists_or_initialize(denoiser)
                registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
                registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)
            return undo
        return setup

    def deepcache(interval: int) -> Callable[[], Callable[[], None]]:
        def setup() -> Callable[[], None]:
            return fastdiff.apply(pipe, fastdiff.DeepCache(interval=interval, branch=args.branch)).remove
        return setup

    setups: dict[str, Callable[[], Callable[[], None]]] = {"vanilla": vanilla}
    for t in (float(v) for v in args.thresholds.split(",") if v):
        setups[f"FirstBlockCache threshold={t:g}"] = first_block(t)
    for n in (int(v) for v in args.intervals.split(",") if v):
        setups[f"fastdiff DeepCache interval={n},branch={args.branch}"] = deepcache(n)

    total, per_evaluation, vanilla_evaluations = vanilla_costs(denoiser, call)
    print(f"vanilla: {total / 1e12:.3f} TFLOP in the denoiser, {sum(vanilla_evaluations.values())} block evaluations",
          flush=True)
    for name, setup in list(setups.items()):  # a peer that cannot run on this pipeline is listed with the reason
        if name == "vanilla":
            continue
        undo = setup()
        try:
            request_steps = request.steps
            pipe(**{**call_kwargs(pipe, request), "num_inference_steps": min(2, request_steps)}, output_type="np")
        except Exception as exc:
            print(f"cannot run {name} on {args.model}: {type(exc).__name__}: {exc}", flush=True)
            del setups[name]
        finally:
            undo()
    if args.count_only:
        return
    times, outputs = shuffled_rounds({name: timed(setup) for name, setup in setups.items()}, args.repeats)
    medians = print_medians(times)
    reference = outputs["vanilla"][0]
    print("\n| setting | median (s) | speedup | denoiser FLOP ratio | block evaluations skipped | PSNR vs vanilla |")
    print("|---|---|---|---|---|---|")
    for name in setups:
        images, evaluations = outputs[name]
        not_run = sum((vanilla_evaluations[p] - evaluations[p]) * per_evaluation[p] for p in vanilla_evaluations)
        skipped = 1 - sum(evaluations.values()) / sum(vanilla_evaluations.values())
        print(f"| {name} | {medians[name]:.2f} | {medians['vanilla'] / medians[name]:.2f}x | "
              f"{total / (total - not_run):.2f}x | {skipped:.1%} | {psnr(reference, images):.1f} dB |")


if __name__ == "__main__":
    main()
