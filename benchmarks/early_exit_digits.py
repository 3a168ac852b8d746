"""Early exiting on the digits models: demo, linear and calibrated schedules, training-free and
after a short fine-tune, against vanilla with fewer steps.

    python benchmarks/early_exit_digits.py --model digits --samples 1000 --json early_exit_digits.json
    python benchmarks/early_exit_digits.py --model digits-sd3 --samples 1000 --batch-size 250 \
        --baseline-steps 28,35,42 --json early_exit_digits_sd3.json

Every setting generates the same prompts and seeds (digits 0-9 cycling, seeds 0..N-1, the
model's 50 steps and guidance) and is scored with FID-digits against real digits
(``fastdiff.evals.evaluate_quality``). The calibrated schedule is measured first on seeds
10,000+ (``EarlyExit.calibrate``), outside any scored run. The fine-tuned rows use a copy of
the pipeline adapted to each schedule with ``fastdiff.caching.early_exit.finetune`` on the
digits training split (the data the model was trained on); their "vs vanilla" columns compare
with the fine-tuned copy's own full-depth images.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

from fastdiff.caching import EarlyExit
from fastdiff.caching.early_exit import finetune
from fastdiff.check_only import exit_if_check_only
from fastdiff.evals.quality import evaluate_quality
from fastdiff.models import builtin_info
from fastdiff.models.builtin import load_pipeline
from fastdiff.models.digits import digit_prompt, digits_split, to_unit_range
from fastdiff.runner import GenerationRequest, prepare_methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", choices=["digits", "digits-sd3"])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--baseline-steps", default="41,46")
    parser.add_argument("--schedules", default="demo,linear,calibrated",
                        help="which of demo, linear (to --min-depth), calibrated (--tolerance)")
    parser.add_argument("--min-depth", type=float, default=0.1)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--finetune", default="demo,linear", help="schedules to fine-tune for ('' for none)")
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="default: the model's own; the measurements in docs/early-exit.md used 1.0 on digits-sd3")
    parser.add_argument("--json", default="early_exit_digits.json")
    args = parser.parse_args()
    exit_if_check_only(parser.prog)

    info = builtin_info(args.model)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    request = GenerationRequest(prompt=info.example_prompt).with_model_defaults(args.model)
    if args.guidance_scale is not None:
        request = replace(request, guidance_scale=args.guidance_scale)
    known = {"demo": EarlyExit(schedule="demo"),
             f"linear to {args.min_depth}": EarlyExit(schedule="linear", min_depth=args.min_depth),
             f"calibrated {args.tolerance}": EarlyExit(schedule="calibrated", tolerance=args.tolerance)}
    chosen = {name: method for name, method in known.items() if name.split()[0] in args.schedules.split(",")}
    schedules = {name: prepare_methods(pipe, [method], request, args.model)[0] for name, method in chosen.items()}
    for name, method in schedules.items():
        print(f"{name}: depths per timestep decile (lowest noise first) {method.depths(pipe.transformer if hasattr(pipe, 'transformer') else pipe.unet)}")
    options = dict(steps=request.steps, samples=args.samples, batch_size=args.batch_size,
                   guidance_scale=request.guidance_scale, size=request.height, model=args.model,
                   call_options=request.call_options)
    results = {}
    report = evaluate_quality(pipe, {name: [m] for name, m in schedules.items()},
                              baseline_steps=[int(s) for s in args.baseline_steps.split(",")], **options)
    print(report)
    results["training-free"] = json.loads(report.to_json())

    images, labels, _, _ = digits_split(seed=0)
    prompts = [digit_prompt(int(label)) for label in labels]
    tuned_names = [name for name in schedules if name.split()[0] in args.finetune.split(",")]
    for name in tuned_names:
        method = schedules[name]
        tuned = copy.deepcopy(pipe)
        started = time.perf_counter()
        losses = finetune(tuned, method, to_unit_range(images), prompts, steps=args.finetune_steps, batch_size=128,
                          lr=args.lr, log=print, **request.call_options)
        seconds = time.perf_counter() - started
        report = evaluate_quality(tuned, {f"{name}, fine-tuned": [method]}, baseline_steps=[], **options)
        print(report)
        results[f"fine-tuned {name}"] = {**json.loads(report.to_json()), "finetune_seconds": seconds,
                                         "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps({"wrote": args.json}))


if __name__ == "__main__":
    main()
