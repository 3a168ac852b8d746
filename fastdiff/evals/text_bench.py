"""Samplers side by side on one masked diffusion LM: model calls per sequence and sample quality.

Quality is the model's own ELBO-based perplexity of the generated tokens given the prompt: each
generated position is masked with probability t and the masked cross-entropy is weighted by 1/t
(the linear-schedule bound the model was trained on), averaged over many draws. Lower is better.
The model judges its own samples, which favours its modes (greedy text scores well), so the
report also gives the share of distinct 4-grams, where repetitive text scores low, and
(``--infill``) a measure the model does not grade: a span cut from held-out text, filled by each
sampler, compared with the original tokens.

    python -m fastdiff.evals.text_bench --gen-length 128 --prompts 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..check_only import exit_if_check_only


@dataclass
class SamplerResult:
    label: str
    sampler: str
    steps: int | None
    mean_nfe: float
    mean_steps: float
    seconds: float
    elbo_perplexity: float
    distinct_4grams: float


@torch.no_grad()
def elbo_perplexity(pipe: Any, prompt_ids: torch.Tensor, generated: torch.Tensor, passes: int = 32,
                    seed: int = 0) -> float:
    """exp(mean negative ELBO per generated token), prompt visible, in the pipeline's model."""
    generator = torch.Generator().manual_seed(seed)
    mask_id = pipe.interface.mask_token_id
    sequence = torch.cat([prompt_ids, generated], dim=1)
    start = prompt_ids.shape[1]
    total = 0.0
    for _ in range(passes):
        t = torch.rand((), generator=generator).clamp_min(1e-3)
        masked = torch.rand(generated.shape, generator=generator) < t
        noisy = sequence.clone()
        noisy[:, start:] = torch.where(masked, torch.full_like(generated, mask_id), generated)
        logits = pipe.interface.logits(pipe.model, noisy, None, None)[:, start:].double()
        logits[..., mask_id] = float("-inf")
        loss = F.cross_entropy(logits.transpose(1, 2), generated, reduction="none")
        total += float((loss * masked).sum() / t) / generated.numel()
    return math.exp(total / passes)


@torch.no_grad()
def confidence_profile(pipe: Any, texts: Sequence[str] | None = None, visible: float = 0.95, seed: int = 0,
                       chunk: int = 16) -> dict[str, float]:
    """How sure the model is where threshold decoding asks it: every window of held-out text with
    a share ``visible`` of its tokens shown, and at the masked positions the top-1 accuracy, the
    mean probability of the top token, and the share of positions above 0.5 and 0.9."""
    from ..models.pydoc_text import corpus, token_stream

    generator = torch.Generator().manual_seed(seed)
    mask_id = pipe.interface.mask_token_id
    stream = token_stream(pipe.tokenizer, texts if texts is not None else corpus()[1])
    length = min(pipe._max_length() or 192, 192)
    tokens = stream[:len(stream) // length * length].reshape(-1, length)
    masked = torch.rand(tokens.shape, generator=generator) >= visible
    noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    confidence, choice = [], []
    for rows in torch.split(noisy, chunk):
        logits = pipe.interface.logits(pipe.model, rows, None, None).double()
        logits[..., mask_id] = float("-inf")
        best = logits.softmax(-1).max(-1)
        confidence.append(best.values)
        choice.append(best.indices)
    top, right = torch.cat(confidence)[masked], (torch.cat(choice) == tokens)[masked]
    return {"visible": visible, "masked_positions": int(masked.sum()),
            "top1_accuracy": round(float(right.double().mean()), 4), "mean_confidence": round(float(top.mean()), 4),
            "share_above_0.5": round(float((top > 0.5).double().mean()), 4),
            "share_above_0.9": round(float((top > 0.9).double().mean()), 4)}


def distinct_ngrams(tokens: Sequence[int], n: int = 4) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def default_prompts(count: int) -> list[str]:
    """The first line of held-out pydoc topics (never trained on), then of training ones."""
    from ..models.pydoc_text import corpus

    train, valid = corpus()
    return [text.splitlines()[0] + "\n" for text in (valid + train)[:count]]


def run(model: str, samplers: dict[str, tuple[str, int | None]], prompts: Sequence[str], gen_length: int,
        seed: int = 0, reuse: bool = True, block_length: int | None = None) -> list[SamplerResult]:
    from ..pipelines import MaskedDiffusionLMPipeline

    pipe = MaskedDiffusionLMPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for label, (sampler, steps) in samplers.items():
        nfes, taken, perplexities, distinct = [], [], [], []
        started = time.perf_counter()
        for i, prompt in enumerate(prompts):
            out = pipe(prompt, gen_length=gen_length, steps=steps, sampler=sampler, block_length=block_length,
                       generator=torch.Generator().manual_seed(seed + i), reuse_unchanged=reuse, stop_at_eos=False)
            nfes.append(out.nfe)
            taken.append(out.steps)
            prompt_ids = torch.tensor([pipe.tokenizer(prompt)["input_ids"]])
            perplexities.append(elbo_perplexity(pipe, prompt_ids, out.sequences, seed=seed + i))
            distinct.append(distinct_ngrams(out.sequences[0].tolist()))
        seconds = time.perf_counter() - started
        results.append(SamplerResult(label, sampler, steps, statistics.mean(nfes), statistics.mean(taken), seconds,
                                     math.exp(statistics.mean(math.log(p) for p in perplexities)),
                                     statistics.mean(distinct)))
    return results


def with_option(sampler: str, option: str) -> str:
    """``"threshold:threshold=0.1"`` + ``"temperature=1"`` -> ``"threshold:threshold=0.1,temperature=1"``."""
    name, _, options = sampler.partition(":")
    return f"{name}:{options},{option}" if options else f"{name}:{option}"


def mean_over_seeds(per_seed: Sequence[Sequence[SamplerResult]]) -> list[SamplerResult]:
    """Each sampler's calls and times averaged over the seeds, its perplexity as a geometric mean
    (every seed's value already is one, over its prompts)."""
    return [SamplerResult(rows[0].label, rows[0].sampler, rows[0].steps,
                          statistics.mean(r.mean_nfe for r in rows), statistics.mean(r.mean_steps for r in rows),
                          statistics.mean(r.seconds for r in rows),
                          math.exp(statistics.mean(math.log(r.elbo_perplexity) for r in rows)),
                          statistics.mean(r.distinct_4grams for r in rows))
            for rows in zip(*per_seed)]


def reuse_check(model: str, prompts: Sequence[str], gen_length: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """MDLM ancestral sampling with many steps, with and without reusing unchanged steps' logits."""
    from ..pipelines import MaskedDiffusionLMPipeline

    pipe = MaskedDiffusionLMPipeline.from_pretrained(model, sampler="mdlm")
    pipe.set_progress_bar_config(disable=True)
    calls = {True: [], False: []}
    seconds = {True: 0.0, False: 0.0}
    identical = True
    for i, prompt in enumerate(prompts):
        outs = {}
        for reuse in (True, False):
            started = time.perf_counter()
            outs[reuse] = pipe(prompt, gen_length=gen_length, steps=steps, stop_at_eos=False, reuse_unchanged=reuse,
                               generator=torch.Generator().manual_seed(seed + i))
            seconds[reuse] += time.perf_counter() - started
            calls[reuse].append(outs[reuse].nfe)
        identical &= torch.equal(outs[True].sequences, outs[False].sequences)
    return {"steps": steps, "gen_length": gen_length, "mean_nfe_reused": statistics.mean(calls[True]),
            "mean_nfe_plain": statistics.mean(calls[False]), "seconds_reused": round(seconds[True], 2),
            "seconds_plain": round(seconds[False], 2), "identical_samples": identical}


def cache_check(model: str, prompts: Sequence[str], gen_length: int, block_length: int, sampler: str,
                seed: int = 0) -> dict[str, Any]:
    """Fast-dLLM's key/value caches and dKV-Cache against the uncached pipeline, on the same prompts and seeds:
    the share of generated tokens that agree, sample quality and wall time (the model is called
    as often either way; a cached call computes fewer positions)."""
    from ..pipelines import MaskedDiffusionLMPipeline

    pipe = MaskedDiffusionLMPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    record: dict[str, Any] = {"sampler": sampler, "gen_length": gen_length, "block_length": block_length}
    reference: list[torch.Tensor] = []
    for mode in (None, "prefix", "dual", "dkv"):
        agree, nfes, perplexities, seconds = [], [], [], 0.0
        for i, prompt in enumerate(prompts):
            started = time.perf_counter()
            out = pipe(prompt, gen_length=gen_length, block_length=block_length, sampler=sampler, kv_cache=mode,
                       stop_at_eos=False, generator=torch.Generator().manual_seed(seed + i))
            seconds += time.perf_counter() - started
            if mode is None:
                reference.append(out.sequences)
            agree.append(float((out.sequences == reference[i]).float().mean()))
            nfes.append(out.nfe)
            prompt_ids = torch.tensor([pipe.tokenizer(prompt)["input_ids"]])
            perplexities.append(elbo_perplexity(pipe, prompt_ids, out.sequences, seed=seed + i))
        record[mode or "none"] = {"token_agreement": round(statistics.mean(agree), 4),
                                  "mean_nfe": statistics.mean(nfes), "seconds": round(seconds, 2),
                                  "elbo_perplexity": round(math.exp(statistics.mean(map(math.log, perplexities))), 3)}
    return record


@torch.no_grad()
def infill_check(model: str, samplers: dict[str, tuple[str, int | None]], gen_length: int, windows: int = 32,
                 span: int = 32, seed: int = 0, log: Any = None) -> list[dict[str, Any]]:
    """Held-out infilling: a span of ``span`` tokens cut from the middle of each of the first
    ``windows`` validation windows (192 tokens or the model's length, never trained on) is filled by each sampler; the
    share of tokens equal to the original text is a quality measure the model does not grade
    itself. Step counts are scaled from ``gen_length`` to ``span``."""
    from ..models.pydoc_text import SEQUENCE_LENGTH, corpus, token_stream
    from ..pipelines import MaskedDiffusionLMPipeline
    from ..schedulers.fill import fill_masks

    pipe = MaskedDiffusionLMPipeline.from_pretrained(model)
    if pipe.interface.time_input is not None:
        raise ValueError(f"--infill: {model} takes the diffusion time as an input, which the infilling loop does "
                         "not pass; it measures models without one (as LLaDA and pydoc-mdlm)")
    stream = token_stream(pipe.tokenizer, corpus()[1])
    width = min(SEQUENCE_LENGTH, pipe._max_length() or SEQUENCE_LENGTH)  # a smaller model: shorter windows
    span = min(span, width // 2)
    count = min(windows, len(stream) // width)
    original = stream[:count * width].reshape(count, width)
    start = (width - span) // 2
    cut = original.clone()
    cut[:, start:start + span] = pipe.interface.mask_token_id
    rows = []
    for label, (sampler, steps) in samplers.items():
        scheduler = pipe._scheduler_for(sampler, {})
        scaled = None if steps is None or steps >= gen_length else max(1, round(steps * span / gen_length))
        began = time.perf_counter()
        filled, calls = fill_masks(lambda ids: pipe.interface.logits(pipe.model, ids, None, None), cut, scheduler,
                                   scaled, torch.Generator().manual_seed(seed))
        right = (filled[:, start:start + span] == original[:, start:start + span]).double().mean()
        rows.append({"label": label, "sampler": sampler, "steps": scaled or span, "windows": count, "span": span,
                     "mean_calls": round(float(calls.double().mean()), 2),
                     "infill_accuracy": round(100 * float(right), 2),
                     "seconds": round(time.perf_counter() - began, 2)})
        if log is not None:  # one line per sampler: each takes a while on many windows
            log(f"infilling, {label}: {rows[-1]['infill_accuracy']} % right in {rows[-1]['mean_calls']} calls")
    return rows


PROG = "python -m fastdiff.evals.text_bench"


def _sampler_spec(text: str) -> str:
    """A sampler spec, checked at parse time by building its scheduler."""
    from ..pipelines.masked_diffusion_lm import _scheduler

    try:
        _scheduler(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(" ".join(str(exc).split())) from None
    return text


def _labelled_sampler(text: str) -> tuple[str, str, int | None]:
    """``LABEL=SAMPLER[@STEPS]`` -> (label, sampler, steps or None), checked at parse time."""
    label, equals, spec = text.partition("=")
    sampler, at, steps = spec.partition("@")
    if not equals or not label.strip() or not sampler.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=SAMPLER[@STEPS], e.g. 'fast=threshold:threshold=0.9' or "
                                         f"'slow=low-confidence@128', got {text!r}")
    if at and not (steps.isdigit() and int(steps) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: the steps after @ must be an integer >= 1, got {steps!r}")
    return label.strip(), _sampler_spec(sampler.strip()), int(steps) if at else None


def _parser() -> argparse.ArgumentParser:
    from ..cli import Parser  # one-line mistakes, defaults in the help: as fastdiff's own
    from ..cli_checks import float_range, int_at_least

    parser = Parser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pydoc-mdlm",
                        help="the masked diffusion LM: a built-in name, a saved pipeline folder, or a transformers "
                             "masked LM folder or hub id")
    parser.add_argument("--gen-length", type=int_at_least(1), default=128, help="tokens to generate per prompt")
    parser.add_argument("--prompts", type=int_at_least(1), default=8,
                        help="how many prompts (first lines of pydoc topics, held-out ones first)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the first prompt's sampling")
    parser.add_argument("--seeds", type=int_at_least(1), default=1,
                        help="repeat the sampler comparison with this many seeds (seed, seed+1000, ...) and report "
                             "each and their mean: one seed's few prompts can move the quality by 10 %%")
    parser.add_argument("--temperature", type=float_range(0), default=None,
                        help="sampling temperature for every compared sampler (default: each sampler's own: 0 for "
                             "low-confidence and threshold, 1 for the others)")
    parser.add_argument("--block-length", type=int_at_least(1), default=None,
                        help="decode every sampler in semi-autoregressive blocks of this many tokens, a divisor of "
                             "--gen-length (default: one block)")
    parser.add_argument("--sampler", type=_labelled_sampler, action="append", default=None,
                        metavar="LABEL=SAMPLER[@STEPS]",
                        help="repeatable; default: low-confidence and margin with one token per step and with "
                             "gen-length/4 steps, threshold 0.9, 0.5, 0.2, 0.1, entropy bound 1 and 3 (greedy)")
    parser.add_argument("--reuse-steps", type=int_at_least(0), default=1000,
                        help="also run MDLM ancestral sampling with this many steps, with and without reuse (0: skip)")
    parser.add_argument("--cache-block", type=int_at_least(0), default=0,
                        help="also compare the prefix, dual and dKV key/value caches with no cache, in blocks of "
                             "this many tokens, a divisor of --gen-length (0: skip)")
    parser.add_argument("--cache-sampler", type=_sampler_spec, default="threshold:threshold=0.9",
                        help="the sampler of the cache comparison")
    parser.add_argument("--confidence", action="store_true",
                        help="also measure the model's confidence at masked positions of held-out pydoc text "
                             "with 95%% and 50%% of the tokens visible")
    parser.add_argument("--infill", type=int_at_least(0), default=0, metavar="WINDOWS",
                        help="also fill a 32-token span cut from the middle of this many held-out windows with "
                             "every compared sampler and report the share of original tokens recovered (0: skip)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every result as JSON")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything that can be checked before a model loads; one line and exit status 2 if not."""
    from ..cli_checks import UsageError, check_output_file
    from ..models.pydoc_text import corpus
    from ..pipelines.masked_diffusion_lm import BUILTIN_TEXT_MODELS, check_text_model_name

    try:
        check_text_model_name(args.model)
    except OSError as error:
        parser.error(f"--model: {error}")
    try:
        check_output_file("--json", args.json)
    except UsageError as error:
        parser.error(str(error))
    builtin = BUILTIN_TEXT_MODELS.get(args.model)
    if builtin is not None and builtin.gen_length is not None:
        parser.error(f"--model: {args.model} takes task prompts, not the pydoc text this benchmark prompts with")
    for flag, value in (("--block-length", args.block_length), ("--cache-block", args.cache_block)):
        if value and args.gen_length % value:
            parser.error(f"{flag}: {value} does not divide --gen-length {args.gen_length}")
    topics = sum(map(len, corpus()))
    if args.prompts > topics:
        parser.error(f"--prompts: at most {topics} (one per pydoc topic), got {args.prompts}")


def main(argv: Sequence[str] | None = None) -> int:
    """Ctrl-C ends the run with one line and exit status 130; a bad argument with one line and
    exit status 2, before any model loads."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _check(parser, args)
        return _run(args)
    except KeyboardInterrupt:
        parser.exit(130, f"{PROG}: interrupted\n")
    except ValueError as error:  # what only the loaded model can refuse (a length past its maximum)
        parser.error(str(error))


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    n = args.gen_length
    samplers: dict[str, tuple[str, int | None]] = {
        "low-confidence, 1 token/step": ("low-confidence", n),
        "margin, 1 token/step": ("margin", n),
        "threshold 0.9 (Fast-dLLM)": ("threshold:threshold=0.9", None),
        "threshold 0.5": ("threshold:threshold=0.5", None),
        "threshold 0.2": ("threshold:threshold=0.2", None),
        "threshold 0.1": ("threshold:threshold=0.1", None),
        "entropy bound 1": ("entropy-bound:entropy_bound=1,temperature=0", None),
        "entropy bound 3": ("entropy-bound:entropy_bound=3,temperature=0", None),
        f"low-confidence, {max(n // 4, 1)} steps": ("low-confidence", max(n // 4, 1)),
        f"margin, {max(n // 4, 1)} steps": ("margin", max(n // 4, 1)),
    }
    if args.sampler:
        samplers = {label: (sampler, steps) for label, sampler, steps in args.sampler}
    if args.temperature is not None:
        samplers = {label: (with_option(sampler, f"temperature={args.temperature:g}"), steps)
                    for label, (sampler, steps) in samplers.items()}
    exit_if_check_only("python -m fastdiff.evals.text_bench")
    seeds = [args.seed + 1000 * k for k in range(args.seeds)]
    per_seed = [run(args.model, samplers, default_prompts(args.prompts), n, seed, block_length=args.block_length)
                for seed in seeds]
    results = per_seed[0] if len(seeds) == 1 else mean_over_seeds(per_seed)
    tables = [(results, "")] if len(seeds) == 1 else [
        *((rows, f"seed {seed}") for seed, rows in zip(seeds, per_seed)), (results, f"mean of {len(seeds)} seeds")]
    print(f"{'setting':34} {'model calls':>11} {'steps':>6} {'ELBO ppl':>9} {'distinct 4-grams':>17} {'s':>7}")
    for rows, title in tables:
        if title:
            print(f"-- {title}")
        for r in rows:
            print(f"{r.label:34} {r.mean_nfe:>11.1f} {r.mean_steps:>6.1f} {r.elbo_perplexity:>9.2f} "
                  f"{r.distinct_4grams:>17.3f} {r.seconds:>7.1f}")
    record: dict[str, Any] = {"model": args.model, "gen_length": n, "prompts": args.prompts,
                              "block_length": args.block_length, "temperature": args.temperature,
                              "seeds": seeds, "samplers": [asdict(r) for r in results],
                              **({"samplers_per_seed": [[asdict(r) for r in rows] for rows in per_seed]}
                                 if len(seeds) > 1 else {})}
    if args.reuse_steps:
        record["reuse"] = reuse_check(args.model, default_prompts(args.prompts), n, args.reuse_steps, args.seed)
        print(json.dumps(record["reuse"]))
    if args.cache_block:
        record["kv_cache"] = cache_check(args.model, default_prompts(args.prompts), n, args.cache_block,
                                         args.cache_sampler, args.seed)
        print(json.dumps(record["kv_cache"]))
    if args.infill:
        record["infill"] = infill_check(args.model, samplers, n, args.infill, seed=args.seed,
                                         log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"{'infilling, 32 of 192 tokens':34} {'model calls':>11} {'tokens right %':>15}")
        for row in record["infill"]:
            print(f"{row['label']:34} {row['mean_calls']:>11.1f} {row['infill_accuracy']:>15.2f}")
    if args.confidence:
        from ..pipelines import MaskedDiffusionLMPipeline

        pipe = MaskedDiffusionLMPipeline.from_pretrained(args.model)
        record["confidence"] = [confidence_profile(pipe, visible=v, seed=args.seed) for v in (0.95, 0.5)]
        for row in record["confidence"]:
            print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
