"""fastdiff against the caches users already have, eager and compiled, on a real transformer's blocks.

    python benchmarks/compiled_peers.py --model sd3-arch --layers 6 --height 256 --width 256 --steps 10 \
        --json compiled_peers_sd3.json

One pipeline in one process: vanilla, fastdiff's settings (``--methods``) and the peers
(``--peers``: diffusers' TaylorSeer and MagCache, cache-dit's DBCache; needs the ``[peers]``
extra), first eagerly, then with the denoiser compiled (``--compile``, regional by default: the
anatomy's block class, which SD3 does not declare as ``_repeated_blocks``). Each mode runs every
setting in shuffled rounds after a warm-up round (compilation happens in the warm-up round and is
reported apart). PSNR is against the same mode's vanilla image.

``--layers K`` keeps the real block geometry and cuts the depth to K blocks (the first K-1 and the
last, which on SD3 is the text-less ``context_pre_only`` block), so a CPU can run it; random weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdiff.check_only import exit_if_check_only
from fastdiff.compilation import COMPILE_MODES, compile_pipeline
from fastdiff.core.accelerator import apply, find_denoiser
from fastdiff.core.compiled import graphs_compiled
from fastdiff.core.method import parse_method
from fastdiff.evals.bench import psnr, shuffled_rounds, text_table
from fastdiff.evals.peers import PeerContext, parse_peer
from fastdiff.media import pipeline_outputs
from fastdiff.models import builtin_info
from fastdiff.models.builtin import load_pipeline
from fastdiff.runner import GenerationRequest, call_kwargs, prepare_methods

DEFAULT_METHODS = "deepcache:interval=2,branch=1;deepcache:interval=3,branch=1"
DEFAULT_PEERS = "taylorseer:interval=2,warmup=2;magcache;dbcache"


def cut_depth(pipe: Any, layers: int) -> None:
    """Keep ``layers`` transformer blocks: the first ``layers - 1`` and the last."""
    _, denoiser = find_denoiser(pipe)
    blocks = denoiser.transformer_blocks
    if not 2 <= layers <= len(blocks):
        raise SystemExit(f"--layers: between 2 and {len(blocks)}, got {layers}")
    denoiser.transformer_blocks = torch.nn.ModuleList([*blocks[: layers - 1], blocks[-1]])
    denoiser.register_to_config(num_layers=layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd3-arch", choices=["sd3-arch", "wan-arch", "tiny-sd3", "digits-sd3"])
    parser.add_argument("--layers", type=int, default=None, help="cut the transformer to this many blocks")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="fastdiff settings, separated by ';'")
    parser.add_argument("--peers", default=DEFAULT_PEERS, help="peer settings, separated by ';' (see docs/peers.md)")
    parser.add_argument("--compile", default="regional", choices=[m for m in COMPILE_MODES if m != "none"])
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per mode (after one warm-up round)")
    parser.add_argument("--json", default="compiled_peers.json")
    args = parser.parse_args()
    methods = {spec: [parse_method(spec)] for spec in filter(None, args.methods.split(";"))}
    peers = {setting.spec(): setting for spec in filter(None, args.peers.split(";")) for setting in parse_peer(spec)[:1]}
    for setting in peers.values():
        setting.peer.check_installed()
    exit_if_check_only(parser.prog)

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.layers is not None:
        cut_depth(pipe, args.layers)
    info = builtin_info(args.model)
    request = GenerationRequest(prompt=info.example_prompt, steps=args.steps, height=args.height,
                                width=args.width).with_model_defaults(args.model)
    kwargs = call_kwargs(pipe, request)
    methods = {spec: prepare_methods(pipe, chosen, request, args.model) for spec, chosen in methods.items()}
    context = PeerContext(steps=request.steps, guidance_scale=request.guidance_scale,
                          calibrate=lambda p: p(**call_kwargs(p, request), output_type="np"))

    def runner(setting: Any) -> Any:
        def run() -> tuple[float, np.ndarray]:
            enabled = accelerator = None
            if isinstance(setting, list):
                accelerator = apply(pipe, *setting)
            elif setting is not None:
                enabled = setting.enable(pipe, context)
            call = (enabled.call if enabled is not None and enabled.call is not None else pipe)
            try:
                start = time.perf_counter()
                out = pipeline_outputs(call(**{**kwargs, "generator": torch.Generator().manual_seed(0)},
                                            output_type="np"))
                elapsed = time.perf_counter() - start
            finally:
                if accelerator is not None:
                    accelerator.remove()
                if enabled is not None:
                    enabled.remove()
            return elapsed, np.asarray(out, dtype=np.float64)

        return run

    settings: dict[str, Any] = {"vanilla": None, **{f"fastdiff {k}": v for k, v in methods.items()},
                                **{f"peer {k}": v for k, v in peers.items()}}
    runners = {name: runner(setting) for name, setting in settings.items()}
    result: dict[str, Any] = {"model": args.model, "layers": args.layers, "request": {"steps": request.steps,
                              "height": request.height, "width": request.width}, "compile": args.compile,
                              "torch": torch.__version__, "threads": torch.get_num_threads(), "modes": {}}
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            compile_pipeline(pipe, args.compile)
        print(f"{mode}: {len(runners)} settings, 1 warm-up and {args.repeats} timed rounds", flush=True)
        warm = {}
        for name, run in runners.items():  # the warm-up round, in a fixed order: compilation happens here
            before, start = graphs_compiled(), time.perf_counter()
            run()
            warm[name] = {"first_s": time.perf_counter() - start, "graphs": graphs_compiled() - before}
            print(f"  first call {name}: {warm[name]['first_s']:.1f} s, {warm[name]['graphs']} graphs", flush=True)
        before = graphs_compiled()
        times, outputs = shuffled_rounds(runners, args.repeats, seed=2, warmup=False)  # warmed up above
        later = graphs_compiled() - before
        vanilla = statistics.median(times["vanilla"])
        entries = {}
        for name in runners:
            median = statistics.median(times[name])
            entries[name] = {"median_s": median, "runs": times[name], "speedup": vanilla / median,
                             "psnr_db": psnr(outputs["vanilla"], outputs[name]), **warm[name]}
        result["modes"][mode] = {"settings": entries, "graphs_after_warm_up": later}
        print(f"  graphs made after the warm-up round: {later}", flush=True)

    rows = []
    for name in runners:
        e, c = result["modes"]["eager"]["settings"][name], result["modes"]["compiled"]["settings"][name]
        rows.append([name, f"{e['median_s']:.1f}", f"{e['speedup']:.2f}x", f"{e['psnr_db']:.1f}",
                     f"{c['median_s']:.1f}", f"{c['speedup']:.2f}x", f"{c['psnr_db']:.1f}",
                     f"{c['first_s'] - c['median_s']:.0f}"])
    lines = text_table(["setting", "eager s", "speedup", "PSNR dB", "compiled s", "speedup", "PSNR dB",
                        "compile s"], rows)
    print("\n".join(lines))
    result["table"] = lines
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
