"""Speedups with and without torch.compile, side by side: does a method keep its speedup compiled?

    python benchmarks/compiled_speedups.py --model digits --compile regional --json compiled_digits.json
    python benchmarks/compiled_speedups.py --model digits-sd3 --compile regional --json compiled_digits_sd3.json

One process, one pipeline. First every setting (vanilla and each method) runs eagerly, in
shuffled rounds after a warm-up round; then the denoiser is compiled (``--compile``) and each
setting's first call is made (compilation happens there) and every setting runs again in
shuffled rounds. Reported per method: eager and compiled speedup over the same-mode vanilla and
their ratio, the compiled output's largest difference from the eager one (relative to the eager
image's range), and the graphs made after the first call (0: nothing recompiles). Then each
setting is started once more in a fresh process (``--cold``, with an empty inductor cache) to
time its first compiled call from nothing: compile time = first call - second call, compared
with vanilla's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdiff.check_only import exit_if_check_only
from fastdiff.compilation import COMPILE_MODES, compile_pipeline
from fastdiff.core.accelerator import apply
from fastdiff.core.compiled import graphs_compiled
from fastdiff.core.method import parse_method
from fastdiff.evals.bench import shuffled_rounds, text_table, timed_call
from fastdiff.models import builtin_info
from fastdiff.models.builtin import load_pipeline
from fastdiff.runner import GenerationRequest, prepare_methods

DEFAULT_METHODS = {
    "digits": ["deepcache:interval=3", "deepcache:interval=3,forecast=ab2", "blockcache:budget=0.5",
               "tgate:gate_step=10", "encoder", "earlyexit"],
    "digits-sd3": ["deepcache:interval=3", "deepcache:interval=3,forecast=ab2", "blockcache:budget=0.5",
                   "earlyexit"],
}


def _setup(args: argparse.Namespace, specs: list[str]) -> tuple[Any, GenerationRequest, dict[str, list]]:
    info = builtin_info(args.model)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    request = GenerationRequest(prompt=info.example_prompt, steps=args.steps, batch_size=args.batch,
                                guidance_scale=args.guidance_scale).with_model_defaults(args.model)
    settings = {"vanilla": []}
    for spec in specs:
        settings[spec] = prepare_methods(pipe, [parse_method(spec)], request, args.model)
    return pipe, request, settings


def _runner(pipe: Any, request: GenerationRequest, methods: list) -> Any:
    def run() -> tuple[float, np.ndarray]:
        accelerator = apply(pipe, *methods) if methods else None
        try:
            elapsed, _, images = timed_call(pipe, request)  # synchronised on a GPU
        finally:
            if accelerator is not None:
                accelerator.remove()
        return elapsed, images.astype(np.float64)

    return run


def cold(args: argparse.Namespace) -> None:
    """One setting from nothing: compile, first call, second call (a fresh process)."""
    pipe, request, settings = _setup(args, [] if args.cold == "vanilla" else [args.cold])
    run = _runner(pipe, request, settings[args.cold])
    compile_pipeline(pipe, args.compile)
    before = graphs_compiled()
    first, _ = run()
    made = graphs_compiled() - before
    second, _ = run()
    print(json.dumps({"first_s": first, "second_s": second, "graphs": made,
                      "graphs_second": graphs_compiled() - before - made}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", choices=sorted(DEFAULT_METHODS))
    parser.add_argument("--methods", default=None, help="comma-free list separated by ';' (default: per model)")
    parser.add_argument("--compile", default="regional", choices=[m for m in COMPILE_MODES if m != "none"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's own")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per mode (after one warm-up round)")
    parser.add_argument("--no-cold", action="store_true", help="skip the fresh-process compile timings")
    parser.add_argument("--cold", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default="compiled_speedups.json")
    args = parser.parse_args()
    exit_if_check_only(parser.prog)
    if args.cold is not None:
        return cold(args)

    specs = args.methods.split(";") if args.methods else DEFAULT_METHODS[args.model]
    pipe, request, settings = _setup(args, specs)
    runners = {name: _runner(pipe, request, methods) for name, methods in settings.items()}
    print(f"{args.model}: {args.batch} images x {request.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; eager rounds", flush=True)
    eager_times, eager_out = shuffled_rounds(runners, args.repeats)

    compile_pipeline(pipe, args.compile)
    first: dict[str, dict[str, float]] = {}
    for name, run in runners.items():  # vanilla first: its graphs are the ones methods share
        before = graphs_compiled()
        seconds, _ = run()
        first[name] = {"first_s": seconds, "graphs": graphs_compiled() - before}
        print(f"first compiled call of {name}: {seconds:.1f} s, {first[name]['graphs']} graphs", flush=True)
    before = graphs_compiled()
    compiled_times, compiled_out = shuffled_rounds(runners, args.repeats, seed=1)
    later_graphs = graphs_compiled() - before

    rows, result = [], {"model": args.model, "compile": args.compile, "steps": request.steps, "batch": args.batch,
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "graphs_after_first_calls": later_graphs, "settings": {}}
    eager_v = statistics.median(eager_times["vanilla"])
    compiled_v = statistics.median(compiled_times["vanilla"])
    for name in settings:
        e, c = statistics.median(eager_times[name]), statistics.median(compiled_times[name])
        reference = eager_out[name]
        diff = float(np.abs(compiled_out[name] - reference).max() / max(np.ptp(reference), 1e-12))
        entry = {"eager_s": e, "compiled_s": c, "eager_speedup": eager_v / e, "compiled_speedup": compiled_v / c,
                 "eager_runs": eager_times[name], "compiled_runs": compiled_times[name],
                 "relative_diff_compiled_vs_eager": diff, **first[name]}
        entry["speedup_kept"] = entry["compiled_speedup"] / entry["eager_speedup"]
        if not args.no_cold:
            command = [sys.executable, __file__, "--model", args.model, "--compile", args.compile, "--steps",
                       str(args.steps), "--batch", str(args.batch), "--cold", name]
            if args.guidance_scale is not None:
                command += ["--guidance-scale", str(args.guidance_scale)]
            print(f"cold start: {name}", flush=True)
            with tempfile.TemporaryDirectory() as cache:  # no compiled kernels on disk from earlier runs
                environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                done = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            entry["cold"] = measured
            entry["cold_compile_s"] = max(measured["first_s"] - measured["second_s"], 0.0)
        result["settings"][name] = entry
    vanilla_compile = result["settings"]["vanilla"].get("cold_compile_s")
    for name, entry in result["settings"].items():
        cold_cell = "-"
        if "cold_compile_s" in entry:
            ratio = entry["cold_compile_s"] / vanilla_compile if vanilla_compile else float("nan")
            cold_cell = f"{entry['cold_compile_s']:.0f} s ({ratio:.2f}x)"
        rows.append([name, f"{entry['eager_s']:.2f}", f"{entry['eager_speedup']:.2f}x", f"{entry['compiled_s']:.2f}",
                     f"{entry['compiled_speedup']:.2f}x", f"{entry['speedup_kept']:.0%}",
                     f"{entry['relative_diff_compiled_vs_eager']:.1e}", cold_cell])
    lines = text_table(["setting", "eager s", "speedup", "compiled s", "speedup", "kept", "rel diff",
                        "compile (cold)"], rows)
    print("\n".join(lines))
    print(f"graphs made after every setting's first compiled call: {later_graphs}")
    result["table"] = lines
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
