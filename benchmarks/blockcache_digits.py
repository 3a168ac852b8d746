"""Block Caching against DeepCache and fewer vanilla steps at equal denoiser FLOPs, on digits.

    python benchmarks/blockcache_digits.py --samples 1000 --json blockcache_digits.json

Every setting generates the same prompts and seeds (digits 0-9 cycling, seeds 0..N-1, 50 DDIM
steps, guidance 2.0) and is scored with FID-digits against real digits and FID/PSNR against
vanilla's own images (``fastdiff.evals.evaluate_quality``). Block Caching is calibrated on
other seeds and its budget is set, by FLOPs, to DeepCache's FLOP share at intervals 2, 3 and 5.

One extra setting is diagnostic: Block Caching's engine run on a DeepCache-shaped schedule
(the outermost down and up blocks computed every step, every other block every third step).
It separates "the per-block reuse machinery loses quality" from "the calibrated schedule
chooses badly". The change profile is plotted next to the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fastdiff.caching import BlockCache, DeepCache
from fastdiff.caching.block_calibration import calibrate
from fastdiff.check_only import exit_if_check_only
from fastdiff.evals.quality import denoiser_flops, evaluate_quality, plot_speed_quality
from fastdiff.models.builtin import load_pipeline
from fastdiff.models.digits import DIGITS_GUIDANCE_SCALE, DIGITS_IMAGE_SIZE, digit_prompt
from fastdiff.runner import CALIBRATION_SEED, GenerationRequest

DEEPCACHE_INTERVALS = (2, 3, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--baseline-steps", default="10,17,25")
    parser.add_argument("--json", default="blockcache_digits.json")
    args = parser.parse_args()
    exit_if_check_only(parser.prog)

    pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    prompts = [digit_prompt(d) for d in range(10)]
    options = dict(steps=50, seed=CALIBRATION_SEED, guidance_scale=DIGITS_GUIDANCE_SCALE)
    residual = calibrate(pipe, prompts, threshold=0.1, **options)
    aligned_at = {}
    variants: dict[str, list] = {}
    for interval in DEEPCACHE_INTERVALS:
        variants[f"deepcache:interval={interval}"] = [DeepCache(interval=interval)]
    # DeepCache's share of the denoiser FLOPs at each interval, so that each Block Caching
    # budget matches one DeepCache point
    request = GenerationRequest(prompt=prompts[0], steps=50, guidance_scale=DIGITS_GUIDANCE_SCALE,
                                height=DIGITS_IMAGE_SIZE, width=DIGITS_IMAGE_SIZE)
    vanilla_flops = denoiser_flops(pipe, [], request)
    for interval in DEEPCACHE_INTERVALS:
        share = denoiser_flops(pipe, [DeepCache(interval=interval)], request) / vanilla_flops
        method = BlockCache(budget=round(share, 3), budget_by="flops", calibration=residual.calibration)
        variants[method.spec()] = [method]
        if interval == 3:
            aligned_at["budget"] = round(share, 3)
    aligned = calibrate(pipe, prompts, budget=aligned_at["budget"], budget_by="flops", align=True, **options)
    variants[aligned.spec()] = [aligned]

    blocks = calibrate(pipe, prompts, threshold=0.1, granularity="block", cache="output", **options).calibration
    live = {"down_blocks.0", f"up_blocks.{len(pipe.unet.up_blocks) - 1}"}
    shaped = dataclasses.replace(  # changes that make δ=0.25 give '#' every step or '#..' (see block_schedule)
        blocks, change={m: [0.0] + [1.0 if m in live else 0.1] * 49 for m in blocks.modules})
    variants["diagnostic: DeepCache-shaped plan on BlockCache"] = [
        BlockCache(threshold=0.25, granularity="block", cache="output", calibration=shaped)]

    report = evaluate_quality(
        pipe, variants, steps=50, baseline_steps=[int(s) for s in args.baseline_steps.split(",")],
        samples=args.samples, batch_size=args.batch_size, guidance_scale=DIGITS_GUIDANCE_SCALE,
        size=DIGITS_IMAGE_SIZE,
    )
    print(report)
    out = Path(args.json)
    out.write_text(report.to_json())
    plot_speed_quality(report, out.with_suffix(".png"))
    residual.calibration.save(out.with_name(out.stem + "_calibration.json"))
    residual.calibration.plot(out.with_name(out.stem + "_change.png"), threshold=residual.calibration.threshold_for(
        aligned_at["budget"], "flops"))
    print(json.dumps({"wrote": [str(out), str(out.with_suffix(".png")), str(out.with_name(out.stem + "_change.png"))]}))


if __name__ == "__main__":
    main()
