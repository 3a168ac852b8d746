"""``fastdiff text``: generate text with a masked diffusion language model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .catalog import DEFAULT_TEXT_MODEL, SAMPLER_ALIASES, SAMPLERS, TEXT_MODELS, sampler_names
from .cli_checks import UsageError, check_output_file, float_range, int_at_least, one_line

# the built-in's name from the light catalog: the model code (torch, transformers) loads in cmd_text
PYDOC_MDLM_NAME = DEFAULT_TEXT_MODEL


def _sampler(spec: str) -> str:
    """A sampler spec, checked at parse time (name, alias and options) by building its scheduler;
    a bare known name (the default among them) needs no check, nor torch."""
    if spec in SAMPLERS or spec in SAMPLER_ALIASES:
        return spec
    from .pipelines.masked_diffusion_lm import _scheduler

    try:
        _scheduler(spec)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(one_line(exc)) from None
    return spec


def _sampler_names() -> str:
    return sampler_names()


def add_text_parser(commands: argparse._SubParsersAction) -> None:
    text = commands.add_parser(
        "text", help="generate text with a masked diffusion language model",
        description=f"Generate text after each prompt with a masked diffusion LM. Samplers (aliases in brackets): "
                    f"{_sampler_names()}; options after a colon, e.g. threshold:threshold=0.9, "
                    "fast-dllm:threshold=0.9 or mdlm:noise_schedule=mdlm-cosine,temperature=0.8.")
    text.add_argument("--model", default=DEFAULT_TEXT_MODEL,
                      help=f"built-in name ({', '.join(TEXT_MODELS)}), saved pipeline folder, or transformers masked "
                           f"LM folder / hub id (default: {DEFAULT_TEXT_MODEL})")
    text.add_argument("--prompt", action="append", default=None,
                      help="prompt, repeatable (one sequence each) (default: 'The \"assert\" statement')")
    text.add_argument("--sampler", type=_sampler, default="low-confidence",
                      help=f"sampler[:option=value,...]; one of {_sampler_names()} (default: low-confidence)")
    text.add_argument("--gen-length", type=int_at_least(1), default=128, help="tokens to generate (default: 128)")
    text.add_argument("--steps", type=int_at_least(1), default=None, help="sampler steps in all (default: gen-length)")
    text.add_argument("--block-length", type=int_at_least(1), default=None,
                      help="semi-autoregressive blocks of this many tokens")
    text.add_argument("--temperature", type=float_range(0), default=None, help="0 = greedy (default: the sampler's)")
    text.add_argument("--cfg-scale", type=float_range(0), default=0.0,
                      help="guidance by masking the prompt (default: 0, off)")
    text.add_argument("--seed", type=int_at_least(0), default=0, help="random seed of the sampler")
    text.add_argument("--no-reuse", action="store_true", help="call the model at every step, even when nothing changed")
    text.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own modelling code")
    text.add_argument("--json", default=None, metavar="PATH", help="also write texts, token ids and call counts")
    text.set_defaults(handler=cmd_text)


def cmd_text(args: argparse.Namespace) -> int:
    """Print each prompt followed by its generated text. A built-in task model takes its own kind of
    prompt: sudoku-mdlm's is a puzzle, 81 cells of 0-9 row by row (0 for a blank), and its text is
    the filled grid, one row a line; its generation length is its 81 cells. Without --prompt a
    built-in answers its example prompt."""
    import torch

    from .check_only import exit_if_check_only
    from .cli import check_model_argument
    from .pipelines import MaskedDiffusionLMPipeline
    from .pipelines.masked_diffusion_lm import BUILTIN_TEXT_MODELS, check_text_model_name

    check_output_file("--json", args.json)
    check_model_argument(args.model, builtins=list(BUILTIN_TEXT_MODELS))
    try:
        check_text_model_name(args.model)  # a near miss of a built-in name fails here, not after a hub wait
    except OSError as exc:
        raise UsageError(f"--model: {one_line(exc)}") from None
    builtin = BUILTIN_TEXT_MODELS.get(args.model)
    fixed = builtin.gen_length if builtin is not None else None  # a task model's canvas: sudoku-mdlm's 81 cells
    gen_length = args.gen_length if args.gen_length is not None else fixed or 128
    if fixed is not None and gen_length != fixed:
        if args.gen_length not in (None, 128):  # 128: the parser's default, meant for free text
            raise UsageError(f"--gen-length: {args.model} writes its {fixed} cells; leave --gen-length out")
        gen_length = fixed
    prompts = args.prompt or [builtin.example_prompt if builtin is not None else "The \"assert\" statement"]
    if builtin is not None:
        for prompt in prompts:
            builtin.check_prompt(prompt, "--prompt")
    blocks = gen_length // (args.block_length or gen_length)
    if args.block_length is not None and gen_length % args.block_length:
        raise UsageError(f"--block-length: {args.block_length} does not divide --gen-length {gen_length}")
    if args.steps is not None and args.steps < blocks:
        raise UsageError(f"--steps: {args.steps} is fewer than the {blocks} blocks (--gen-length / --block-length); "
                         "every block takes at least one step")
    exit_if_check_only("fastdiff text")
    try:
        pipe = MaskedDiffusionLMPipeline.from_pretrained(args.model, sampler=args.sampler,
                                                         trust_remote_code=args.trust_remote_code)
    except OSError as exc:
        raise UsageError(f"--model: cannot load {args.model!r} as a masked diffusion LM ({one_line(exc)}); built in: "
                         f"{', '.join(BUILTIN_TEXT_MODELS)}") from None
    out = pipe(prompts, gen_length=gen_length, steps=args.steps, block_length=args.block_length,
               sampler=args.sampler, temperature=args.temperature, cfg_scale=args.cfg_scale,
               generator=torch.Generator().manual_seed(args.seed), reuse_unchanged=not args.no_reuse)
    for prompt, text in zip(prompts, out.texts):
        print(f"{prompt}{text}")
        print("-" * 40)
    print(f"{out.steps} steps, {out.nfe} model calls for {gen_length} tokens per sequence "
          f"({gen_length / max(out.nfe, 1):.2f} tokens per call)")
    if args.json:
        record: dict[str, Any] = {"model": args.model, "sampler": args.sampler, "prompts": prompts,
                                  "texts": out.texts, "sequences": out.sequences.tolist(), "steps": out.steps,
                                  "nfe": out.nfe}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
