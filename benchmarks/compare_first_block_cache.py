"""fastdiff's DeepCache-style block reuse against diffusers' own FirstBlockCache, on one pipeline.

Every setting runs on the same pipeline object with the same prompt and seed, in shuffled order
(one warm-up round, then ``--repeats`` timed rounds). Reported per setting: median wall time,
speedup over vanilla, the denoiser FLOP ratio (vanilla's denoiser FLOPs over the setting's, all
counted by one ``FlopCounterMode`` around the denoiser's calls, in a separate untimed run), the
share of transformer-block evaluations skipped (a block counts as evaluated when its first
sub-layer runs), and PSNR against vanilla's image.

    python benchmarks/compare_first_block_cache.py --model sd3-arch --steps 10 --repeats 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
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
from fastdiff.evals.bench import print_medians, psnr, shuffled_rounds
from fastdiff.media import pipeline_outputs
from fastdiff.models import build_builtin
from fastdiff.runner import GenerationRequest, call_kwargs, example_prompt


@contextmanager
def block_evaluations(denoiser: torch.nn.Module) -> Iterator[list[int]]:
    """Counts ``[evaluated, called]`` block calls: a reused or skipped block is called but never
    runs its first sub-layer."""
    counts = [0, 0]
    handles = []
    for block in anatomy_of(denoiser).blocks:
        module = denoiser.get_submodule(block.path)
        first = next(module.children())
        handles.append(module.register_forward_pre_hook(lambda *_: counts.__setitem__(1, counts[1] + 1)))
        handles.append(first.register_forward_pre_hook(lambda *_: counts.__setitem__(0, counts[0] + 1)))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def denoiser_flops(denoiser: torch.nn.Module) -> Iterator[list[int]]:
    """FLOPs of everything the denoiser's calls run, whoever's hooks decide what that is."""
    total = [0]
    counter: list[FlopCounterMode] = []

    def enter(*_: Any) -> None:
        counter.append(FlopCounterMode(display=False, depth=0))
        counter[-1].__enter__()

    def leave(*_: Any) -> None:
        mode = counter.pop()
        mode.__exit__(None, None, None)
        total[0] += mode.get_total_flops()

    handles = [denoiser.register_forward_pre_hook(enter), denoiser.register_forward_hook(leave)]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


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
    args = parser.parse_args()

    pipe = build_builtin(args.model)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.transformer

    request = GenerationRequest(prompt=example_prompt(args.model), steps=args.steps, height=args.height,
                                width=args.width).with_model_defaults(args.model)

    def call() -> np.ndarray:
        return np.asarray(pipeline_outputs(pipe(**call_kwargs(pipe, request), output_type="np")))

    def timed(setup: Callable[[], Callable[[], None]]) -> Callable[[], tuple[float, np.ndarray]]:
        def run() -> tuple[float, np.ndarray]:
            undo = setup()
            try:
                start = time.perf_counter()
                images = call()
                return time.perf_counter() - start, images
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

    counted: dict[str, tuple[int, float]] = {}
    for name, setup in list(setups.items()):  # untimed: FLOPs and block evaluations
        undo = setup()
        try:
            with denoiser_flops(denoiser) as flops, block_evaluations(denoiser) as blocks:
                call()
        except Exception as exc:  # a peer that cannot run on this pipeline is listed with the reason
            print(f"cannot run {name} on {args.model}: {type(exc).__name__}: {exc}", flush=True)
            del setups[name]
            continue
        finally:
            undo()
        counted[name] = (flops[0], 1 - blocks[0] / max(blocks[1], 1))
        print(f"counted {name}: {flops[0] / 1e12:.3f} TFLOP, {counted[name][1]:.1%} of block evaluations skipped",
              flush=True)

    times, images = shuffled_rounds({name: timed(setup) for name, setup in setups.items()}, args.repeats)
    medians = print_medians(times)
    print("\n| setting | median (s) | speedup | denoiser FLOP ratio | block evaluations skipped | PSNR vs vanilla |")
    print("|---|---|---|---|---|---|")
    for name in setups:
        flop_ratio = counted["vanilla"][0] / max(counted[name][0], 1)
        print(f"| {name} | {medians[name]:.2f} | {medians['vanilla'] / medians[name]:.2f}x | {flop_ratio:.2f}x | "
              f"{counted[name][1]:.1%} | {psnr(images['vanilla'], images[name]):.1f} dB |")


if __name__ == "__main__":
    main()
