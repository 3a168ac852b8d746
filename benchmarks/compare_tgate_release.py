"""sd15-arch at 256x256, 20 DDIM steps: vanilla, the T-GATE authors' release and fastdiff's TGate,
DeepCache, and DeepCache + TGate, on one pipeline object in shuffled order.

Reports median wall times, speedups over vanilla, and how far fastdiff's TGate image is from
the release's (same parameters, same seed). Needs the test extra (``tgate==1.0.0``).

    python benchmarks/compare_tgate_release.py --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diffusers.models.attention_processor import Attention
from tgate import TgateSDLoader

import fastdiff
from fastdiff.check_only import exit_if_check_only
from fastdiff.evals.bench import print_medians, psnr, shuffled_rounds
from fastdiff.models import build_builtin

PROMPT = "a photograph of an astronaut riding a horse"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gate-step", type=int, default=10)
    parser.add_argument("--interval", type=int, default=3, help="DeepCache interval")
    args = parser.parse_args()
    exit_if_check_only(parser.prog)

    pipe = build_builtin("sd15-arch")
    pipe.set_progress_bar_config(disable=True)
    settings = dict(num_inference_steps=args.steps, height=256, width=256, output_type="np")
    gate = dict(gate_step=args.gate_step, sp_interval=5, fi_interval=1, warm_up=2)

    def call() -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        images = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **settings).images
        return time.perf_counter() - start, images

    def release() -> tuple[float, np.ndarray]:
        loaded = TgateSDLoader(pipe)
        try:
            start = time.perf_counter()
            images = loaded.tgate(PROMPT, generator=torch.Generator().manual_seed(0), **gate, **settings).images
            return time.perf_counter() - start, images
        finally:  # the release patches every Attention.forward on the instance and leaves it
            for module in pipe.unet.modules():
                if isinstance(module, Attention):
                    module.__dict__.pop("forward", None)
                    module.__dict__.pop("cache", None)

    def accelerated(*methods: fastdiff.Method):
        def runner() -> tuple[float, np.ndarray]:
            accelerator = fastdiff.apply(pipe, *methods)
            try:
                return call()
            finally:
                accelerator.remove()
        return runner

    runners = {
        "vanilla": call,
        "tgate release": release,
        "fastdiff TGate": accelerated(fastdiff.TGate(**gate)),
        "fastdiff DeepCache": accelerated(fastdiff.DeepCache(interval=args.interval)),
        "fastdiff DeepCache+TGate": accelerated(fastdiff.DeepCache(interval=args.interval), fastdiff.TGate(**gate)),
    }
    times, images = shuffled_rounds(runners, args.repeats)
    print_medians(times)
    diff = float(np.abs(images["fastdiff TGate"] - images["tgate release"]).max())
    print(f"max |fastdiff TGate - release| = {diff}")
    for name in runners:
        print(f"PSNR vs vanilla, {name}: {psnr(images[name], images['vanilla']):.2f} dB")


if __name__ == "__main__":
    main()
