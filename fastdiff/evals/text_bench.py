"""Samplers side by side on one masked diffusion LM: model calls per sequence and sample quality.

Quality is the model's own ELBO-based perplexity of the generated tokens given the prompt: each
generated position is masked with probability t and the masked cross-entropy is weighted by 1/t
(the linear-schedule bound the model was trained on), averaged over many draws. Lower is better.
The model judges its own samples, which favours its modes (greedy text scores well), so the
report also gives the share of distinct 4-grams, where repetitive text scores low.

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


def distinct_ngrams(tokens: Sequence[int], n: int = 4) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def default_prompts(count: int) -> list[str]:
    """The first line of held-out pydoc topics (never trained on), then of training ones."""
    from ..models.pydoc_text import corpus

    train, valid = corpus()
    return [text.splitlines()[0] + "\n" for text in (valid + train)[:count]]


def run(model: str, samplers: dict[str, tuple[str, int | None]], prompts: Sequence[str], gen_length: int,
        seed: int = 0, reuse: bool = True) -> list[SamplerResult]:
    from ..pipelines import MaskedDiffusionLMPipeline

    pipe = MaskedDiffusionLMPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for label, (sampler, steps) in samplers.items():
        nfes, taken, perplexities, distinct = [], [], [], []
        started = time.perf_counter()
        for i, prompt in enumerate(prompts):
            out = pipe(prompt, gen_length=gen_length, steps=steps, sampler=sampler,
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.evals.text_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pydoc-mdlm")
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8, help="how many prompts (first lines of pydoc topics)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", action="append", default=None, metavar="LABEL=SAMPLER[@STEPS]",
                        help="repeatable; default: one token per step (low-confidence) against threshold 0.9 and 0.7")
    parser.add_argument("--reuse-steps", type=int, default=1000,
                        help="also run MDLM ancestral sampling with this many steps, with and without reuse (0: skip)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    n = args.gen_length
    samplers: dict[str, tuple[str, int | None]] = {
        "low-confidence, 1 token/step": ("low-confidence", n),
        "threshold 0.9 (Fast-dLLM)": ("threshold:threshold=0.9", None),
        "threshold 0.7": ("threshold:threshold=0.7", None),
    }
    if args.sampler:
        samplers = {}
        for item in args.sampler:
            label, _, spec = item.partition("=")
            sampler, _, steps = spec.partition("@")
            samplers[label] = (sampler, int(steps) if steps else None)
    results = run(args.model, samplers, default_prompts(args.prompts), n, args.seed)
    print(f"{'setting':34} {'model calls':>11} {'steps':>6} {'ELBO ppl':>9} {'distinct 4-grams':>17} {'s':>7}")
    for r in results:
        print(f"{r.label:34} {r.mean_nfe:>11.1f} {r.mean_steps:>6.1f} {r.elbo_perplexity:>9.2f} "
              f"{r.distinct_4grams:>17.3f} {r.seconds:>7.1f}")
    record: dict[str, Any] = {"model": args.model, "gen_length": n, "prompts": args.prompts,
                              "samplers": [asdict(r) for r in results]}
    if args.reuse_steps:
        record["reuse"] = reuse_check(args.model, default_prompts(args.prompts), n, args.reuse_steps, args.seed)
        print(json.dumps(record["reuse"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
