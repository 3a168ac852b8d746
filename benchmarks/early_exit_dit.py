"""Early exiting on a DiT-XL/2-sized transformer: wall time against vanilla, side by side.

    python benchmarks/early_exit_dit.py --steps 10 --repeats 2

The transformer has DiT-XL/2's architecture (28 blocks, width 1152, patch 2, 32x32 latent =
256x256 images) with seeded random weights (no hub here), inside a real ``DiTPipeline`` with
DDIM and guidance 4.0; the small built-in VAE decodes. One pipeline object, the settings in
shuffled order, a warm-up round then the timed rounds. A separate counted run gives each
setting's denoiser FLOPs from the Ledger.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import fastdiff
from fastdiff.check_only import exit_if_check_only
from fastdiff.evals.bench import print_medians, shuffled_rounds
from fastdiff.models import build_builtin

DIT_XL_2 = dict(sample_size=32, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
                in_channels=4, out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                norm_elementwise_affine=False)


def build() -> DiTPipeline:
    small = build_builtin("tiny-dit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(**DIT_XL_2).eval()
    pipe = DiTPipeline(transformer=transformer, vae=small.vae, scheduler=DDIMScheduler.from_config(small.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    exit_if_check_only(parser.prog)
    pipe = build()
    settings = {
        "vanilla": [],
        "EarlyExit demo": [fastdiff.EarlyExit()],
        "EarlyExit linear to 0.5": [fastdiff.EarlyExit(schedule="linear", min_depth=0.5)],
    }

    def runner(methods):
        def run() -> tuple[float, np.ndarray]:
            accelerator = fastdiff.apply(pipe, *methods) if methods else None
            try:
                start = time.perf_counter()
                with torch.no_grad():
                    images = pipe(class_labels=[207], num_inference_steps=args.steps, guidance_scale=4.0,
                                  generator=torch.Generator().manual_seed(0), output_type="np").images
                return time.perf_counter() - start, images
            finally:
                if accelerator is not None:
                    accelerator.remove()
        return run

    for name, methods in settings.items():
        accelerator = fastdiff.apply(pipe, *methods, count_flops=True)
        pipe(class_labels=[207], num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
        report = accelerator.report()
        accelerator.remove()
        print(f"{name}: {report.summary()}")
        if methods:
            print(accelerator.plan)
    times, _ = shuffled_rounds({name: runner(m) for name, m in settings.items()}, args.repeats)
    print_medians(times)


if __name__ == "__main__":
    main()
