"""sd15-arch, 10 DDIM steps at 256x256: vanilla vs the DeepCache authors' release vs fastdiff.

Runs the three in shuffled order on one pipeline object and reports median wall times and
whether the two DeepCache images are identical. Needs the test extra (``DeepCache==0.1.1``).

    python benchmarks/compare_deepcache_release.py --repeats 6
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from DeepCache import DeepCacheSDHelper

import fastdiff
from fastdiff.check_only import exit_if_check_only
from fastdiff.evals.bench import print_medians, shuffled_rounds
from fastdiff.models import build_builtin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--branch", type=int, default=0)
    args = parser.parse_args()
    exit_if_check_only(parser.prog)

    pipe = build_builtin("sd15-arch")
    pipe.set_progress_bar_config(disable=True)

    def call() -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        images = pipe("a photograph of an astronaut riding a horse", num_inference_steps=10, height=256,
                      width=256, generator=torch.Generator().manual_seed(0), output_type="np").images
        return time.perf_counter() - start, images

    def release() -> tuple[float, np.ndarray]:
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=args.interval, cache_branch_id=args.branch)
        helper.enable()
        try:
            return call()
        finally:
            helper.disable()

    def ours() -> tuple[float, np.ndarray]:
        accelerator = fastdiff.apply(pipe, fastdiff.DeepCache(interval=args.interval, branch=args.branch))
        try:
            return call()
        finally:
            accelerator.remove()

    runners = {"vanilla": call, "release": release, "fastdiff": ours}
    times, images = shuffled_rounds(runners, args.repeats)
    print_medians(times)
    print("max |fastdiff - release| =", float(np.abs(images["fastdiff"] - images["release"]).max()))


if __name__ == "__main__":
    main()
