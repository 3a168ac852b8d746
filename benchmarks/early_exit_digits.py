"""Early exiting on digits: training-free exits, the same after a short fine-tune, and fewer steps.

    python benchmarks/early_exit_digits.py --samples 1000 --json early_exit_digits.json

Every setting generates the same prompts and seeds (digits 0-9 cycling, seeds 0..N-1, 50 DDIM
steps, guidance 2.0) and is scored with FID-digits against real digits
(``fastdiff.evals.evaluate_quality``). The fine-tuned rows use a copy of the pipeline adapted to
each schedule with ``fastdiff.caching.early_exit.finetune`` on the digits training split (the
data the model was trained on); their "vs vanilla" columns compare with the fine-tuned copy's
own full-depth images.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from fastdiff.caching import EarlyExit
from fastdiff.caching.early_exit import finetune
from fastdiff.evals.quality import evaluate_quality
from fastdiff.models.builtin import load_pipeline
from fastdiff.models.digits import (
    DIGITS_GUIDANCE_SCALE,
    DIGITS_IMAGE_SIZE,
    digit_prompt,
    digits_split,
    to_unit_range,
)

SCHEDULES = {"demo": EarlyExit(), "linear to 0.1": EarlyExit(schedule="linear", min_depth=0.1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--baseline-steps", default="41,46")
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--json", default="early_exit_digits.json")
    args = parser.parse_args()

    pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    options = dict(steps=50, samples=args.samples, batch_size=args.batch_size, guidance_scale=DIGITS_GUIDANCE_SCALE,
                   size=DIGITS_IMAGE_SIZE)
    results = {}
    report = evaluate_quality(pipe, {name: [m] for name, m in SCHEDULES.items()},
                              baseline_steps=[int(s) for s in args.baseline_steps.split(",")], **options)
    print(report)
    results["training-free"] = json.loads(report.to_json())

    images, labels, _, _ = digits_split(seed=0)
    prompts = [digit_prompt(int(label)) for label in labels]
    for name, method in SCHEDULES.items():
        tuned = copy.deepcopy(pipe)
        started = time.perf_counter()
        losses = finetune(tuned, method, to_unit_range(images), prompts, steps=args.finetune_steps, batch_size=128,
                          lr=args.lr, log=print)
        seconds = time.perf_counter() - started
        report = evaluate_quality(tuned, {f"{name}, fine-tuned": [method]}, baseline_steps=[], **options)
        print(report)
        results[f"fine-tuned {name}"] = {**json.loads(report.to_json()), "finetune_seconds": seconds,
                                         "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps({"wrote": args.json}))


if __name__ == "__main__":
    main()
