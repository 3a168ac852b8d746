"""``fastdiff generate``, ``bench``, ``fid``, ``calibrate`` and ``text``: the library's jobs from a shell."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

# transformers announces, once per image-processor class, that it falls back to PIL when
# torchvision is absent (always, with the CPU torch); on a command line that is only noise.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

from . import __version__  # noqa: E402
from .cli_checks import (  # noqa: E402
    UsageError,
    check_input_file,
    check_input_folder,
    check_output_file,
    check_output_folder,
    float_range,
    int_at_least,
    multiple_of_8,
    one_line,
)
from .catalog import BUILTIN_MODELS, DEFAULT_MODEL, METHOD_SPECS, method_help, model_help  # noqa: E402
from .cli_text import add_text_parser  # noqa: E402

# torch, diffusers and transformers load inside the commands, never here: `fastdiff --help`
# and a mistake on the command line answer at once (tests/test_cli_startup.py).
if TYPE_CHECKING:
    from .core.method import Method

DTYPES = ("auto", "float32", "float16", "bfloat16")


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default, and keeps the indented rows of a table (the methods and
    models under a command's help) as written instead of running them into one paragraph."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        default = action.default
        if "%(default)" in help or "(default" in help or default is None or default is False or default == [] \
                or default == argparse.SUPPRESS:
            return help
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return help
        return f"{help} (default: %(default)s)" if help else "default: %(default)s"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # never break inside a name such as tiny-flux or low-confidence
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for line in text.splitlines():
            keep = line.startswith(" ") or (len(line) + len(indent) <= width and line.endswith(":"))
            paragraphs.append(indent + line if keep else textwrap.fill(
                " ".join(line.split()), width, initial_indent=indent, subsequent_indent=indent,
                break_on_hyphens=False))
        return "\n".join(paragraphs)


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (no usage block): ``fastdiff generate: error: ...``;
    its help (and its commands') shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _method(spec: str) -> Method:
    """A method spec, checked whole at parse time (names, values, and files it names); the
    spec parser (and torch with it) loads only when a spec is given, and a name that is no
    method is refused before it loads."""
    name = spec.strip().partition(":")[0].strip().lower()
    if name not in METHOD_SPECS:
        raise argparse.ArgumentTypeError(f"--method {spec!r}: unknown method {name!r}; allowed: {sorted(METHOD_SPECS)}")
    from .core.method import parse_method

    try:
        return parse_method(spec)
    except (ValueError, TypeError, OSError) as exc:
        raise argparse.ArgumentTypeError(one_line(exc)) from None


def _device(text: str) -> str:
    """A torch device, checked at parse time; ``auto`` (the default, always valid) without
    loading torch, so that a mistake elsewhere on the line is reported at once."""
    if text == "auto":
        return text
    from .runner import resolve_device

    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(one_line(str(exc).removeprefix("device: "))) from None
    return text


class _Variant(list):
    """Methods composed with '+', and the step count they run at (``@N``; None: the request's)."""

    steps: int | None = None

    @property
    def label(self) -> str:
        specs = "+".join(m.spec() for m in self)
        return specs if self.steps is None else f"{specs}@{self.steps}"


def _variant(spec: str) -> _Variant:
    spec, at, steps = spec.partition("@")
    variant = _Variant(_method(part) for part in spec.split("+") if part.strip())
    if at:
        try:
            variant.steps = int(steps)
        except ValueError:
            raise argparse.ArgumentTypeError(f"@{steps}: expected a step count, e.g. deepcache:interval=3@25") from None
        if variant.steps < 1:
            raise argparse.ArgumentTypeError(f"@{steps}: the step count must be >= 1")
    return variant


def _peer(spec: str) -> list:
    from .evals.peers import parse_peer

    try:
        return parse_peer(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(one_line(exc)) from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected step counts >= 1, got {text!r}")
    return values


def _common(parser: argparse.ArgumentParser, methods: bool = True) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"built-in name ({', '.join(BUILTIN_MODELS)}; see below), local folder or hub id "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--prompt", default=None,
                        help="text prompt, or class name/index for class-conditional models "
                             "(default: the built-in model's example prompt)")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    parser.add_argument("--steps", type=int_at_least(1), default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed of the initial noise")
    parser.add_argument("--height", type=multiple_of_8, default=None,
                        help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument("--width", type=multiple_of_8, default=None,
                        help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument("--guidance-scale", type=float_range(0), default=None,
                        help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--frames", type=int_at_least(1), default=None,
                        help="video models: frames to generate (default: the model's)")
    if methods:
        parser.add_argument("--method", type=_method, action="append", default=[], metavar="SPEC",
                            help="acceleration, repeatable, composed together: name[:key=value,...], e.g. "
                                 "deepcache:interval=3; the methods are listed below (default: none, vanilla)")
    parser.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on CUDA, fp32 on CPU")


def _compile_option(parser: argparse.ArgumentParser, more: str = "") -> None:
    parser.add_argument("--compile", choices=("none", "regional", "full"), default="none",
                        help="torch.compile the denoiser: regional (each repeated block, once for all its copies) "
                             "or full (the whole model)" + more)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastdiff", description="Faster diffusion sampling for diffusers pipelines.",
                    epilog="Run fastdiff COMMAND --help for a command's options; generate and bench list the "
                           "methods (--method) and built-in models (--model).")
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.commands = commands.choices  # type: ignore[attr-defined]

    gen = commands.add_parser("generate", help="generate an image with a pipeline, accelerated",
                              description="Generate one image (or video) with a pipeline, accelerated by the "
                                          "--method list, and print what the methods saved.",
                              epilog=f"{method_help()}\n\n{model_help()}")
    _common(gen)
    gen.add_argument("--out", default="image.png",
                     help="output image (.png, .jpg, ...); a video model writes an animated .png (APNG), .gif or .webp")
    gen.add_argument("--no-flops", action="store_true", help="do not count FLOPs (faster on large models)")
    _compile_option(gen)
    gen.add_argument("--show-plan", action="store_true", help="print the reuse plan before generating")

    bench = commands.add_parser("bench", help="time vanilla vs accelerated side by side in one process",
                                description="Time vanilla and accelerated (the --method list) side by side in one "
                                            "process; --quality scores images instead, --parallel times N processes.",
                                epilog=f"{method_help()}\n\n{model_help()}")
    _common(bench)
    bench.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed calls first")
    bench.add_argument("--repeats", type=int_at_least(1), default=3, help="timed calls of each")
    bench.add_argument("--json", default="bench.json", help="where to write the JSON result")
    _compile_option(bench, " (timing bench: vanilla and accelerated both compiled; compile time reported apart)")
    parallel = bench.add_argument_group("patch parallelism")
    parallel.add_argument("--parallel", type=int_at_least(2), default=None, metavar="N",
                          help="compare one process with N processes started by the harness, running the --method "
                               "list and each --variant; a setting without a patch:... method gets the default one "
                               "(patch:mode=distrifusion) added, and none may have two")
    parallel.add_argument("--threads", type=int_at_least(1), default=None,
                          help="torch threads per process (equal compute per process)")
    quality = bench.add_argument_group("quality (digits models: digits, digits-sd3)")
    quality.add_argument("--quality", action="store_true",
                         help="score FID-digits, fidelity to vanilla and prompt adherence instead of timing one image "
                              "(needs the eval extra: pip install -e \".[eval]\")")
    quality.add_argument("--variant", type=_variant, action="append", default=[], metavar="SPEC[+SPEC]",
                         help="another method setting to compare, repeatable; '+' composes methods; a trailing @N runs it "
                              "at N steps (with --quality)")
    quality.add_argument("--peer", type=_peer, action="append", default=[], metavar="SPEC",
                         help="another project's cache on the same pipeline, prompts and seeds: NAME (its 2-3 "
                              "settings), NAME:key=value,... or all; see docs/peers.md")
    quality.add_argument("--seed-noise", action="store_true",
                         help="also vanilla on a second seed set: the FID gap that is chance")
    quality.add_argument("--samples", type=int_at_least(2), default=None, help="images per setting (default 1000)")
    quality.add_argument("--baseline-steps", type=_int_list, default=None,
                         help="vanilla step counts for the baseline curve (default 10,20,30)")
    quality.add_argument("--batch-size", type=int_at_least(1), default=None, help="images per call (default 250)")
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
    _common(cal, methods=False)  # it measures Block Caching; the options below set it
    choice = cal.add_mutually_exclusive_group()
    choice.add_argument("--threshold", type=float_range(0), default=None,
                        help="δ: accumulated change before recomputing")
    choice.add_argument("--budget", type=float_range(0, 1, low_open=True), default=None,
                        help="share of block evaluations to keep, (0, 1]")
    cal.add_argument("--granularity", choices=("layer", "attention", "block"), default="layer",
                     help="what one cached unit is")
    cal.add_argument("--cache", choices=("residual", "output"), default="residual",
                     help="cache each unit's residual (its change to its input) or its output")
    cal.add_argument("--align", action="store_true", help="also fit the per-channel scale/shift of cached values")
    cal.add_argument("--out", default="calibration.json", help="where to write the calibration")
    cal.add_argument("--plot", default=None,
                     help="also plot the per-block change curves (PNG; needs matplotlib, in the eval extra)")


def _request(args: argparse.Namespace):
    from .runner import GenerationRequest, example_prompt

    return GenerationRequest(
        prompt=args.prompt or example_prompt(args.model), steps=args.steps, seed=args.seed, height=args.height, width=args.width,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, num_frames=args.frames,
    ).with_model_defaults(args.model)


def _image_suffixes() -> list[str]:
    from PIL import Image

    Image.init()
    return [ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE]


def check_model_argument(model: str, argument: str = "--model",
                         builtins: Sequence[str] = tuple(BUILTIN_MODELS)) -> None:
    """A ``--model`` that is meant as a path must be a folder; hub ids are left to the loader."""
    from .models.builtin import looks_like_path

    if model in builtins:
        return
    choices = f"give a built-in name ({', '.join(builtins)}), a folder saved with save_pretrained, or a hub id"
    path = Path(os.path.expanduser(model))
    if path.exists() and not path.is_dir():
        raise UsageError(f"{argument}: {model!r} is a file; {choices}")
    if not path.exists() and looks_like_path(model):
        raise UsageError(f"{argument}: no such folder {model!r}; {choices}")


def _load(args: argparse.Namespace, device: str | None = None):
    from .check_only import exit_if_check_only
    from .media import makes_video
    from .models import ModelLoadError
    from .runner import load

    exit_if_check_only(f"fastdiff {args.command}")
    try:
        pipe = load(args.model, device or args.device, args.dtype)
    except ModelLoadError as exc:
        raise UsageError(f"--model: {exc}") from None
    if getattr(args, "frames", None) is not None and not makes_video(pipe):
        raise UsageError(f"--frames: {args.model} ({type(pipe).__name__}) makes images, not videos")
    return pipe


def _check_patches(pipe, methods: list[Method], request, world_size: int) -> str | None:
    """Under a launcher: refuse a patch split the latent cannot hold before the first denoiser call."""
    from .parallel import PatchParallel

    for method in methods:
        if isinstance(method, PatchParallel):
            try:
                return method.describe_split(pipe, world_size, height=request.height,
                                             guidance_scale=request.guidance_scale)
            except ValueError as exc:
                raise UsageError(f"--method {method.spec()}: {world_size} processes: {exc}") from None
    return None


def _check_size(request, device: str, model: str) -> None:
    """Before loading: a size whose decoded image alone cannot fit in memory is refused at once
    (the loaded pipeline's VAE sharpens the estimate later, see :func:`_check_request`)."""
    from .models import builtin_info, is_builtin
    from .runner import check_memory, resolve_device

    if not is_builtin(model) or builtin_info(model).takes_size:  # DiT draws its own fixed size
        check_memory(request, resolve_device(device))


def _check_request(pipe, request, step_counts: Sequence[int | None] = ()) -> None:
    """On the loaded pipeline, before any call: the step counts its scheduler can run (the
    request's and ``step_counts``), the class label, the memory the size needs."""
    from .runner import check_request, check_steps

    check_request(pipe, request)
    for steps in sorted({s for s in step_counts if s is not None and s != request.steps}):
        check_steps(pipe, steps)


def cmd_generate(args: argparse.Namespace) -> int:
    from .media import VIDEO_SUFFIXES, Video, makes_video, save_output
    from .parallel.group import is_main_process, launched_device, launched_world_size
    from .runner import generate, prepare_methods

    check_output_file("--out", args.out, _image_suffixes(), "an image format Pillow writes (.png, .jpg, .webp, ...)")
    check_model_argument(args.model)
    request = _request(args)
    _check_size(request, launched_device(args.device), args.model)
    pipe = _load(args, launched_device(args.device))
    if makes_video(pipe):
        check_output_file("--out", args.out, list(VIDEO_SUFFIXES), "an animated image: .png (APNG), .gif or .webp")
    _check_request(pipe, request)
    split = _check_patches(pipe, args.method, request, launched_world_size())
    args.method = prepare_methods(pipe, args.method, request, args.model)
    compiled = _compile(pipe, args)
    # FLOPs are counted as operators dispatch, which compiled kernels do not
    accelerator = _apply(pipe, args.method, count_flops=not args.no_flops and not compiled)
    if args.show_plan:
        print(accelerator.plan_for(request.steps or accelerator.default_steps))
    image = generate(pipe, request)[0]
    if not is_main_process():  # every process computed the same image; one writes it
        return 0
    out = Path(args.out)  # its folder exists: checked above, and never made
    save_output(image, out)
    methods = ", ".join(m.spec() for m in args.method) or "no method"
    frames = f", {len(image)} frames" if isinstance(image, Video) else ""
    print(f"wrote {out} ({image.width}x{image.height}{frames}) with {methods}: {accelerator.report().summary()}")
    if compiled:
        from .core.progress import plural

        print(f"compiled ({args.compile}: {plural(len(compiled), 'module')}); the time above includes compiling, "
              "and FLOPs are not counted while compiled (fastdiff bench --compile counts them eagerly)")
    if split is not None and launched_world_size() > 1:
        print(f"split across {launched_world_size()} processes: {split}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .evals.bench import benchmark, write
    from .runner import prepare_methods

    check_output_file("--json", args.json)
    check_model_argument(args.model)
    if args.quality and args.parallel is not None:
        raise UsageError("--quality and --parallel: choose one (quality scores images, --parallel times processes)")
    if args.compile != "none" and (args.quality or args.parallel is not None):
        raise UsageError(f"--compile: only with the timing bench, not with {'--quality' if args.quality else '--parallel'}")
    if args.quality:
        return _quality_bench(args)
    if args.parallel is not None:
        _refuse_quality_options(args)
        return _parallel_bench(args)
    if args.variant:
        raise UsageError("--variant: only with --quality or --parallel; the timing bench compares one --method "
                         "list with vanilla")
    if args.compile != "none" and args.warmup < 1:
        raise UsageError("--warmup: at least 1 with --compile (the first call compiles and is not timed)")
    if args.threads is not None:
        raise UsageError("--threads: only with --parallel")
    _refuse_quality_options(args)
    request = _request(args)
    _check_size(request, args.device, args.model)
    pipe = _load(args)
    _check_request(pipe, request)
    args.method = prepare_methods(pipe, args.method, request, args.model)
    from .core.compiled import CompileError

    _check_compile(pipe, args.method, args.compile)
    try:
        result = benchmark(pipe, args.method, request, model=args.model, warmup=args.warmup, repeats=args.repeats,
                           compile=args.compile)
    except CompileError as exc:
        raise UsageError(f"--compile {args.compile}: {exc}") from None
    print(result)
    write(result, args.json)
    print(f"wrote {args.json}")
    return 0


def _check_compile(pipe, methods: Sequence[Method], mode: str) -> None:
    """Before any call: the methods can run on the compiled denoiser, and a regional compile has blocks."""
    if mode == "none":
        return
    from .compilation import regional_block_classes
    from .core.accelerator import find_denoiser

    for method in methods:
        reason = method.compile_refusal()
        if reason:
            raise UsageError(f"--compile {mode}: --method {method.spec()} cannot run compiled: {reason}")
    if mode == "regional":
        try:
            regional_block_classes(find_denoiser(pipe)[1])
        except ValueError as exc:
            raise UsageError(f"--compile regional: {exc}") from None


def _compile(pipe, args: argparse.Namespace) -> list[str]:
    from .compilation import compile_pipeline

    _check_compile(pipe, args.method, args.compile)
    return compile_pipeline(pipe, args.compile)


def _apply(pipe, methods: Sequence[Method], **options: Any):
    from .core.accelerator import apply
    from .core.compiled import CompileError

    try:
        return apply(pipe, *methods, **options)
    except CompileError as exc:
        raise UsageError(f"--compile: {exc}") from None


def _refuse_quality_options(args: argparse.Namespace) -> None:
    given = [flag for flag, value in (("--plot", args.plot), ("--samples", args.samples),
                                      ("--baseline-steps", args.baseline_steps), ("--batch-size", args.batch_size),
                                      ("--peer", args.peer or None), ("--seed-noise", args.seed_noise or None))
             if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --quality")


def _parallel_bench(args: argparse.Namespace) -> int:
    from .evals.parallel_bench import parallel_benchmark
    from .parallel import PatchParallel

    settings = {}
    for variant in args.variant:
        if variant.steps is not None:
            raise UsageError(f"--variant {variant.label}: @steps only with --quality (the parallel bench runs every "
                             f"setting at --steps)")
    for methods in [args.method, *args.variant]:
        specs = [m.spec() for m in methods]
        if not any(isinstance(m, PatchParallel) for m in methods):
            specs.append(PatchParallel().spec())
        settings["+".join(specs)] = specs
    request = _request(args)
    _check_size(request, args.device, args.model)
    result = parallel_benchmark(args.model, request, settings, args.parallel, warmup=args.warmup,
                                repeats=args.repeats, threads=args.threads, device=args.device, dtype=args.dtype)
    print(result)
    Path(args.json).write_text(result.to_json())
    print(f"wrote {args.json}")
    return 0


def _quality_bench(args: argparse.Namespace) -> int:
    from .evals.quality import evaluate_quality, plot_speed_quality
    from .models import builtin_info
    from .runner import prepare_methods

    digits_models = [name for name in BUILTIN_MODELS if builtin_info(name).digits_task]
    if args.model not in digits_models:
        raise UsageError(f"--quality scores with the digits feature network: use --model "
                         f"{' or '.join(digits_models)}, not {args.model!r}")
    plot = args.plot or str(Path(args.json).with_suffix(".png"))
    check_output_file("--plot", plot, [".png"])
    request = _request(args)
    chosen = ([args.method] if args.method else []) + args.variant
    peers = [setting for settings in args.peer for setting in settings]
    if not chosen and not peers:
        raise UsageError("--quality needs at least one --method, --variant or --peer to compare with vanilla")
    from .cli_checks import require_packages

    # FID (torchmetrics, scipy), the real digits (scikit-learn) and the plot (matplotlib)
    require_packages("--quality", "torchmetrics", "scipy", "sklearn", "matplotlib")
    batch = replace(request, batch_size=args.batch_size or 250)
    _check_size(batch, args.device, args.model)
    pipe = _load(args)
    chosen = [v if isinstance(v, _Variant) else _Variant(v) for v in chosen]
    _check_request(pipe, batch, [*(args.baseline_steps or [10, 20, 30]), *(v.steps for v in chosen)])
    variants = {v.label: prepare_methods(pipe, v, replace(request, steps=v.steps or request.steps), args.model)
                for v in chosen}
    variant_steps = {v.label: v.steps for v in chosen if v.steps is not None}
    report = evaluate_quality(
        pipe, variants, steps=request.steps, baseline_steps=args.baseline_steps or [10, 20, 30],
        samples=args.samples or 1000, batch_size=args.batch_size or 250, seed=args.seed, guidance_scale=request.guidance_scale,
        size=request.height, model=args.model, call_options=request.call_options, peers=peers,
        variant_steps=variant_steps,
        seed_noise=args.seed_noise,
    )
    print(report)
    Path(args.json).write_text(report.to_json())
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
                    "image); rank 0 prints and writes --json. Needs the eval extra (torchmetrics, scipy): "
                    "pip install -e \".[eval]\".",
        epilog=method_help(),
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
    fid.add_argument("--batch-size", type=int_at_least(1), default=None,
                     help="images per batch (default: 50 folders, 8 paired)")
    fid.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N")
    fid.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    fid.add_argument("--no-progress", action="store_true", help="no progress bars")
    paired = fid.add_argument_group("paired mode (with --model)")
    paired.add_argument("--model", default=None,
                        help=f"built-in name ({', '.join(BUILTIN_MODELS)}), local folder or hub id")
    paired.add_argument("--prompts", default=None, metavar="FILE",
                        help="one prompt per line (blank lines ignored); seed s uses prompt s mod count")
    paired.add_argument("--seeds", default=None, help="e.g. 0-999, 0,5,7 or 0-9,20-29")
    paired.add_argument("--method", type=_method, action="append", default=[], metavar="SPEC",
                        help="acceleration of the accelerated images, repeatable (all applied together); "
                             "the methods are listed below")
    paired.add_argument("--reference", default="vanilla", choices=["vanilla"],
                        help="what the accelerated images are compared with (default: vanilla)")
    paired.add_argument("--out-dir", default=None, metavar="DIR",
                        help="images go to DIR/vanilla/ and DIR/accelerated/; existing ones are reused")
    paired.add_argument("--real", default=None, metavar="REAL_DIR", help="also FID of each against these images")
    paired.add_argument("--steps", type=int_at_least(1), default=None, help="denoising steps (default: the model's)")
    paired.add_argument("--height", type=multiple_of_8, default=None,
                        help="pixels, a multiple of 8 (default: the model's)")
    paired.add_argument("--width", type=multiple_of_8, default=None,
                        help="pixels, a multiple of 8 (default: the model's)")
    paired.add_argument("--guidance-scale", type=float_range(0), default=None,
                        help="classifier-free guidance scale (default: the model's)")
    paired.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    paired.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on CUDA, fp32 on CPU")


_PAIRED_ONLY = ("prompts", "seeds", "method", "out_dir", "real", "steps", "height", "width", "guidance_scale",
                "negative_prompt")


def _fid_folders(args: argparse.Namespace):
    from .evals.fid import fid_folders

    given = [f"--{name.replace('_', '-')}" for name in _PAIRED_ONLY if getattr(args, name) not in (None, [])]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --model (paired mode)")
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


def _check_fid(args: argparse.Namespace) -> None:
    check_output_file("--json", args.json)
    check_input_file("--inception-weights", args.inception_weights)
    if args.model is None:
        check_input_folder("REAL_DIR", args.real_dir)
        check_input_folder("FAKE_DIR", args.fake_dir)
        return
    check_model_argument(args.model)
    check_input_file("--prompts", args.prompts)
    check_input_folder("--real", args.real)
    check_output_folder("--out-dir", args.out_dir)
    if args.seeds is not None:
        from .evals.fidelity import parse_seeds

        parse_seeds(args.seeds)


def cmd_fid(args: argparse.Namespace) -> int:
    import torch

    from .evals.fid import init_distributed_from_env, rank_and_world

    _check_fid(args)
    from .cli_checks import require_packages

    # Both modes end in torchmetrics' Fréchet distance, paired mode after hours of generating; the
    # torch-fidelity and weights --features inception needs are checked as the extractor loads,
    # which is also before any image is read or written.
    require_packages("FID", "torchmetrics", "scipy")
    created = init_distributed_from_env(args.device)
    try:
        try:
            result = _fid_paired(args) if args.model else _fid_folders(args)
        except (FileNotFoundError, ImportError) as exc:  # missing weights or extras: a message, not a traceback
            raise UsageError(str(exc)) from None
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
    from .runner import prepare_methods

    check_output_file("--out", args.out, [".json"])
    check_output_file("--plot", args.plot, [".png"])
    check_model_argument(args.model)
    if args.plot:
        from .cli_checks import require_packages

        require_packages("--plot", "matplotlib")
    request = _request(args)
    method = BlockCache(threshold=args.threshold, budget=args.budget, granularity=args.granularity,
                        cache=args.cache, align=args.align)
    _check_size(request, args.device, args.model)
    pipe = _load(args)
    _check_request(pipe, request)
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


# The user's mistakes, and what their environment lacks (an optional extra, a file, disk space):
# one line each. Anything else is a fault of fastdiff's and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure the user can fix ends here as one line on stderr,
    ``fastdiff <command>: error: ...``, with exit code 2; Ctrl-C ends with 130 and no traceback."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse would blame the top-level parser; the command's own is the one to blame
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
    handlers = {"generate": cmd_generate, "bench": cmd_bench, "fid": cmd_fid, "calibrate": cmd_calibrate}
    handler = handlers.get(args.command) or args.handler
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_one_line_warning, f"fastdiff {args.command}")
            try:
                return handler(args)
            finally:
                _leave_process_group()
    except KeyboardInterrupt:
        parser.exit(130, f"fastdiff {args.command}: interrupted\n")
    except USER_ERRORS as exc:
        parser.exit(2, f"fastdiff {args.command}: error: {one_line(exc)}\n")
    return 1


def _one_line_warning(prefix: str, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """A warning as one line naming the command, without the source line Python echoes under it:
    on a command line that line is fastdiff's code, which means nothing to the user."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    print(f"{prefix}: warning{kind}: {one_line(message)}", file=sys.stderr if file is None else file)


def _leave_process_group() -> None:
    """A launched command leaves its process group before exit: a gloo group still open when
    the interpreter shuts down can abort the process ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")  # not loaded: no group was started, and none to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
