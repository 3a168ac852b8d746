"""``fastdiff generate`` and ``fastdiff bench``: the library's jobs from a shell."""

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
from .models import BUILTIN_MODELS  # noqa: E402

DEFAULT_MODEL = "tiny-sd"


def _method(spec: str) -> Method:
    try:
        return parse_method(spec)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"built-in name ({', '.join(BUILTIN_MODELS)}), local folder or hub id "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse",
                        help="text prompt (class name or index for class-conditional models)")
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
    return parser


def _request(args: argparse.Namespace):
    from .runner import GenerationRequest

    return GenerationRequest(
        prompt=args.prompt, steps=args.steps, seed=args.seed, height=args.height, width=args.width,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
    ).with_model_defaults(args.model)


def cmd_generate(args: argparse.Namespace) -> int:
    from .runner import generate, load

    request = _request(args)
    pipe = load(args.model, args.device, args.dtype)
    accelerator = apply(pipe, *args.method, count_flops=not args.no_flops)
    if args.show_plan:
        print(accelerator.plan_for(request.steps or accelerator.default_steps))
    image = generate(pipe, request)[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    methods = ", ".join(m.spec() for m in args.method) or "no method"
    print(f"wrote {out} ({image.width}x{image.height}) with {methods}: {accelerator.report().summary()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .evals.bench import benchmark, write
    from .runner import load

    request = _request(args)
    pipe = load(args.model, args.device, args.dtype)
    result = benchmark(pipe, args.method, request, model=args.model, warmup=args.warmup, repeats=args.repeats)
    print(result)
    write(result, args.json)
    print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"generate": cmd_generate, "bench": cmd_bench}
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"fastdiff {args.command}: error: {exc}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
