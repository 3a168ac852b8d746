"""``fastdiff generate``, ``bench``, ``fid``, ``calibrate`` and ``text``: the library's jobs from a shell."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

# transformers announces, once per image-processor class, that it falls back to PIL when
# torchvision is absent (always, with the CPU torch); on a command line that is only noise.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

from . import __version__  # noqa: E402
from .core.accelerator import apply  # noqa: E402
from .core.method import METHODS, Method, parse_method  # noqa: E402
from .cli_text import add_text_parser  # noqa: E402
from .models import BUILTIN_MODELS  # noqa: E402

DEFAULT_MODEL = "digits"


def _method(spec: str) -> Method:
    try:
        return parse_method(spec)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _variant(spec: str) -> list[Method]:
    return [_method(part) for part in spec.split("+") if part.strip()]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected step counts >= 1, got {text!r}")
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"built-in name ({', '.join(BUILTIN_MODELS)}), local folder or hub id "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--prompt", default=None,
                        help="text prompt, or class name/index for class-conditional models "
                             "(default: the built-in model's example prompt)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--method", type=_method, action="append", default=[], metavar="SPEC",
                        help=f"acceleration, repeatable: name[:key=value,...]; methods: {', '.join(sorted(METHODS))}")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description="Faster diffusion sampling for diffusers pipelines.")
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image with a pipeline, accelerated")
    _common(gen)
    gen.add_argument("--out", default="image.png", help="output PNG path")
    gen.add_argument("--no-flops", action="store_true", help="do not count FLOPs (faster on large models)")
    gen.add_argument("--show-plan", action="store_true", help="print the reuse plan before generating")

    bench = commands.add_parser("bench", help="time vanilla vs accelerated side by side in one process")
    _common(bench)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--json", default="bench.json", help="where to write the JSON result")
    parallel = bench.add_argument_group("patch parallelism")
    parallel.add_argument("--parallel", type=int, default=None, metavar="N",
                          help="compare one process with N processes started by the harness (the --method list, "
                               "which must include one patch:... method, and each --variant)")
    parallel.add_argument("--threads", type=int, default=None, help="torch threads per process (equal compute per process)")
    quality = bench.add_argument_group("quality (digits model)")
    quality.add_argument("--quality", action="store_true",
                         help="score FID-digits, fidelity to vanilla and prompt adherence instead of timing one image")
    quality.add_argument("--variant", type=_variant, action="append", default=[], metavar="SPEC[+SPEC]",
                         help="another method setting to compare, repeatable; '+' composes methods")
    quality.add_argument("--samples", type=int, default=1000, help="images per setting (default 1000)")
    quality.add_argument("--baseline-steps", type=_int_list, default=[10, 20, 30],
                         help="vanilla step counts for the baseline curve (default 10,20,30)")
    quality.add_argument("--batch-size", type=int, default=250)
    quality.add_argument("--plot", default=None, help="speed-quality plot PNG (default: next to --json)")
    _fid_parser(commands)
    _calibrate_parser(commands)
    add_text_parser(commands)
    return parser


def _calibrate_parser(commands: argparse._SubParsersAction) -> None:
    cal = commands.add_parser(
        "calibrate", help="measure a pipeline's blocks for Block Caching and save the calibration (JSON)",
        description="Runs the pipeline on calibration prompts (every digit for the digits model, else --prompt), "
                    "records each block's change per step, prints the schedule and writes the calibration; "
                    "use it with --method blockcache:calibration=FILE,threshold=... or budget=...",
    )
    _common(cal)
    choice = cal.add_mutually_exclusive_group()
    choice.add_argument("--threshold", type=float, default=None, help="δ: accumulated change before recomputing")
    choice.add_argument("--budget", type=float, default=None, help="share of block evaluations to keep, (0, 1]")
    cal.add_argument("--granularity", default="layer", help="layer, attention or block")
    cal.add_argument("--cache", default="residual", help="residual or output")
    cal.add_argument("--align", action="store_true", help="also fit the per-channel scale/shift of cached values")
    cal.add_argument("--out", default="calibration.json", help="where to write the calibration")
    cal.add_argument("--plot", default=None, help="also plot the per-block change curves (PNG)")


def _request(args: argparse.Namespace):
    from .runner import GenerationRequest, example_prompt

    return GenerationRequest(
        prompt=args.prompt or example_prompt(args.model), steps=args.steps, seed=args.seed, height=args.height, width=args.width,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
    ).with_model_defaults(args.model)


def cmd_generate(args: argparse.Namespace) -> int:
    from .parallel.group import is_main_process, launched_device
    from .runner import generate, load, prepare_methods

    request = _request(args)
    pipe = load(args.model, launched_device(args.device), args.dtype)
    args.method = prepare_methods(pipe, args.method, request, args.model)
    accelerator = apply(pipe, *args.method, count_flops=not args.no_flops)
    if args.show_plan:
        print(accelerator.plan_for(request.steps or accelerator.default_steps))
    image = generate(pipe, request)[0]
    if not is_main_process():  # every process computed the same image; one writes it
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    methods = ", ".join(m.spec() for m in args.method) or "no method"
    print(f"wrote {out} ({image.width}x{image.height}) with {methods}: {accelerator.report().summary()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .evals.bench import benchmark, write
    from .runner import load, prepare_methods

    if args.quality:
        return _quality_bench(args)
    if args.parallel is not None:
        return _parallel_bench(args)
    request = _request(args)
    pipe = load(args.model, args.device, args.dtype)
    args.method = prepare_methods(pipe, args.method, request, args.model)
    result = benchmark(pipe, args.method, request, model=args.model, warmup=args.warmup, repeats=args.repeats)
    print(result)
    write(result, args.json)
    print(f"wrote {args.json}")
    return 0


def _parallel_bench(args: argparse.Namespace) -> int:
    from .evals.parallel_bench import parallel_benchmark
    from .parallel import PatchParallel

    settings = {}
    for methods in [args.method, *args.variant]:
        specs = [m.spec() for m in methods]
        if not any(isinstance(m, PatchParallel) for m in methods):
            specs.append(PatchParallel().spec())
        settings["+".join(specs)] = specs
    result = parallel_benchmark(args.model, _request(args), settings, args.parallel, warmup=args.warmup,
                                repeats=args.repeats, threads=args.threads, device=args.device, dtype=args.dtype)
    print(result)
    Path(args.json).write_text(result.to_json())
    print(f"wrote {args.json}")
    return 0


def _quality_bench(args: argparse.Namespace) -> int:
    from .evals.quality import evaluate_quality, plot_speed_quality
    from .runner import load, prepare_methods

    if args.model != "digits":
        raise ValueError(f"--quality scores with the digits feature network: use --model digits, not {args.model!r}")
    request = _request(args)
    chosen = ([args.method] if args.method else []) + args.variant
    if not chosen:
        raise ValueError("--quality needs at least one --method or --variant to compare with vanilla")
    pipe = load(args.model, args.device, args.dtype)
    variants = {"+".join(m.spec() for m in v): prepare_methods(pipe, v, request, args.model) for v in chosen}
    report = evaluate_quality(
        pipe, variants, steps=request.steps, baseline_steps=args.baseline_steps, samples=args.samples,
        batch_size=args.batch_size, seed=args.seed, guidance_scale=request.guidance_scale,
        size=request.height, model=args.model,
    )
    print(report)
    Path(args.json).write_text(report.to_json())
    plot = args.plot or str(Path(args.json).with_suffix(".png"))
    plot_speed_quality(report, plot)
    print(f"wrote {args.json} and {plot}")
    return 0


def _fid_parser(commands: argparse._SubParsersAction) -> None:
    fid = commands.add_parser(
        "fid", help="FID between two image folders, or vanilla vs accelerated on the same seeds",
        description="fastdiff fid REAL_DIR FAKE_DIR: FID between two folders of PNG/JPEG images. "
                    "fastdiff fid --model M --prompts FILE --seeds 0-999 --method SPEC --out-dir DIR: generate "
                    "vanilla and accelerated images for each seed (resumable) and report FID between them, "
                    "PSNR and max |diff| of the pairs, and with --real FID of each against real images. "
                    "Images of a folder that differ in size or mode from its first image are converted to RGB "
                    "and resized to it, with a warning. Under torchrun each rank takes every world-th seed (or "
                    "image); rank 0 prints and writes --json.",
    )
    fid.add_argument("real_dir", nargs="?", metavar="REAL_DIR", help="reference images (folder mode)")
    fid.add_argument("fake_dir", nargs="?", metavar="FAKE_DIR", help="generated images (folder mode)")
    fid.add_argument("--features", default="inception",
                     help="inception (standard; needs torch-fidelity and the weights file), digits (built-in, "
                          "offline), or package.module:callable returning an nn.Module mapping uint8 N x 3 x H x W "
                          "to float N x D (default: inception)")
    fid.add_argument("--inception-weights", default=None, metavar="PATH",
                     help="Inception weights file (default: weights-inception-2015-12-05-6726825d.pth in "
                          "$TORCH_HOME/hub/checkpoints/); never downloaded")
    fid.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 50 folders, 8 paired)")
    fid.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    fid.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    fid.add_argument("--no-progress", action="store_true", help="no progress bars")
    paired = fid.add_argument_group("paired mode (with --model)")
    paired.add_argument("--model", default=None,
                        help=f"built-in name ({', '.join(BUILTIN_MODELS)}), local folder or hub id")
    paired.add_argument("--prompts", default=None, metavar="FILE",
                        help="one prompt per line (blank lines ignored); seed s uses prompt s mod count")
    paired.add_argument("--seeds", default=None, help="e.g. 0-999, 0,5,7 or 0-9,20-29")
    paired.add_argument("--method", type=_method, action="append", default=[], metavar="SPEC",
                        help="acceleration of the accelerated images, repeatable (all applied together)")
    paired.add_argument("--reference", default="vanilla", choices=["vanilla"],
                        help="what the accelerated images are compared with (default: vanilla)")
    paired.add_argument("--out-dir", default=None, metavar="DIR",
                        help="images go to DIR/vanilla/ and DIR/accelerated/; existing ones are reused")
    paired.add_argument("--real", default=None, metavar="REAL_DIR", help="also FID of each against these images")
    paired.add_argument("--steps", type=int, default=None)
    paired.add_argument("--height", type=int, default=None)
    paired.add_argument("--width", type=int, default=None)
    paired.add_argument("--guidance-scale", type=float, default=None)
    paired.add_argument("--negative-prompt", default=None)
    paired.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")


_PAIRED_ONLY = ("prompts", "seeds", "method", "out_dir", "real", "steps", "height", "width", "guidance_scale",
                "negative_prompt")


def _fid_folders(args: argparse.Namespace):
    from .evals.fid import fid_folders

    given = [f"--{name.replace('_', '-')}" for name in _PAIRED_ONLY if getattr(args, name) not in (None, [])]
    if given:
        raise ValueError(f"{', '.join(given)} need --model (paired mode)")
    if args.real_dir is None or args.fake_dir is None:
        raise ValueError("give REAL_DIR and FAKE_DIR, or --model ... for paired mode")
    return fid_folders(args.real_dir, args.fake_dir, features=args.features, batch_size=args.batch_size or 50,
                       device=args.device, inception_weights=args.inception_weights,
                       show_progress=not args.no_progress)


def _fid_paired(args: argparse.Namespace):
    from .evals.fidelity import paired_fidelity, parse_seeds, read_prompts
    from .runner import GenerationRequest

    if args.real_dir is not None:
        raise ValueError("REAL_DIR/FAKE_DIR are for folder mode; with --model, give real images with --real")
    missing = [flag for flag, value in (("--prompts", args.prompts), ("--seeds", args.seeds),
                                        ("--out-dir", args.out_dir)) if value is None]
    if missing:
        raise ValueError(f"paired mode needs {', '.join(missing)}")
    request = GenerationRequest(steps=args.steps, height=args.height, width=args.width,
                                guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt)
    return paired_fidelity(
        args.model, args.method, parse_seeds(args.seeds), read_prompts(args.prompts), args.out_dir,
        request=request, reference=args.reference, real_dir=args.real, features=args.features,
        inception_weights=args.inception_weights, batch_size=args.batch_size or 8, device=args.device,
        dtype=args.dtype, show_progress=not args.no_progress,
    )


def cmd_fid(args: argparse.Namespace) -> int:
    import torch

    from .evals.fid import init_distributed_from_env, rank_and_world

    created = init_distributed_from_env(args.device)
    try:
        try:
            result = _fid_paired(args) if args.model else _fid_folders(args)
        except (FileNotFoundError, ImportError) as exc:  # missing weights or extras: a message, not a traceback
            raise ValueError(str(exc)) from None
        if rank_and_world()[0] == 0:
            print(result)
            if args.json:
                Path(args.json).write_text(result.to_json())
                print(f"wrote {args.json}")
    finally:
        if created:
            torch.distributed.destroy_process_group()
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .caching import BlockCache
    from .runner import load, prepare_methods

    request = _request(args)
    method = BlockCache(threshold=args.threshold, budget=args.budget, granularity=args.granularity,
                        cache=args.cache, align=args.align)
    pipe = load(args.model, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    (ready,) = prepare_methods(pipe, [method], request, args.model)
    print(ready.plan())
    print(f"keeps {ready.kept_fraction():.1%} of block evaluations ({ready.kept_fraction('flops'):.1%} of their FLOPs) "
          f"at threshold {ready.effective_threshold:.4g}")
    ready.calibration.save(args.out)
    print(f"wrote {args.out}")
    if args.plot:
        ready.calibration.plot(args.plot, ready.effective_threshold)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"generate": cmd_generate, "bench": cmd_bench, "fid": cmd_fid, "calibrate": cmd_calibrate}
    try:
        return handlers[args.command](args) if args.command in handlers else args.handler(args)
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"fastdiff {args.command}: error: {exc}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
