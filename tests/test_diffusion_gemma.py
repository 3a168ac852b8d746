"""A real transformers DiffusionGemma (tiny, random weights) through fastdiff's pipeline, and
schedulers swapped both ways with diffusers' DiffusionGemmaPipeline."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from conftest import tiny_diffusion_gemma
from diffusers import (
    BlockRefinementScheduler,
    DiscreteDDIMScheduler,
    EntropyBoundScheduler,
)

from fastdiff.pipelines import DiffusionGemmaPipeline, MaskedDiffusionLMPipeline
from fastdiff.schedulers import DiscreteDiffusionScheduler

if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):  # new in transformers 5.24
    pytest.skip(f"DiffusionGemma needs transformers >= 5.24, this is {transformers.__version__} (the lowest "
                "version pyproject.toml allows, tested by .ci/run's second stage)", allow_module_level=True)
PROMPT = torch.tensor([[2, 10, 11, 12, 13]])
warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)


@pytest.fixture(scope="module")
def gemma():
    return tiny_diffusion_gemma()


def fastdiff_pipe(model, tokenizer, scheduler):
    pipe = MaskedDiffusionLMPipeline(model, tokenizer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Processor:
    """What diffusers' DiffusionGemmaPipeline asks of its processor, for fixed prompt ids."""

    eos_token_id = 1

    def apply_chat_template(self, messages, **kwargs):
        return {"input_ids": PROMPT}

    def batch_decode(self, sequences, skip_special_tokens=True):
        return [" ".join(map(str, s.tolist())) for s in sequences]


def diffusers_run(model, scheduler, gen_length=16, steps=8, seed=0):
    pipe = DiffusionGemmaPipeline(model=model, scheduler=scheduler, processor=Processor())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="ids", gen_length=gen_length, num_inference_steps=steps, temperature=0.0,
               confidence_threshold=None, eos_early_stop=False, generator=torch.Generator().manual_seed(seed))
    return out.sequences


def entropy_bound() -> DiscreteDiffusionScheduler:
    """DiffusionGemma's own sampler: entropy bound 0.1, temperature 0.8 → 0.4, every position re-decided."""
    return DiscreteDiffusionScheduler(corruption="uniform", sampler="entropy-bound", entropy_bound=0.1,
                                      temperature=0.8, min_temperature=0.4, sampling="multinomial",
                                      keep_committed=False)


def test_fastdiff_pipeline_equals_transformers_generate(gemma):
    """The encoder cache over finished canvases, the decoder with self-conditioning, the entropy
    bound and the renoising all follow transformers' own loop: the same tokens from the same seed."""
    model, tokenizer = gemma
    torch.manual_seed(0)
    ours = fastdiff_pipe(model, tokenizer, entropy_bound())(input_ids=PROMPT, gen_length=16, steps=16,
                                                             stop_at_eos=False)
    torch.manual_seed(0)
    reference = model.generate(PROMPT, max_new_tokens=16, max_denoising_steps=8)
    assert ours.sequences.tolist() == reference.sequences[:, PROMPT.shape[1]:].tolist()
    assert ours.nfe == 16 and len(ours.texts) == 1


def test_every_uniform_sampler_runs_end_to_end(gemma):
    model, tokenizer = gemma
    for sampler in ("low-confidence", "margin", "threshold", "entropy-bound", "random", "posterior"):
        scheduler = DiscreteDiffusionScheduler(corruption="uniform", sampler=sampler)
        out = fastdiff_pipe(model, tokenizer, scheduler)(
            input_ids=PROMPT, gen_length=16, steps=8, generator=torch.Generator().manual_seed(0), stop_at_eos=False)
        assert out.sequences.shape == (1, 16) and 1 <= out.nfe <= 8, sampler
        assert int(out.sequences.max()) < 64


def test_greedy_commit_by_confidence_is_the_same_everywhere(gemma):
    """diffusers' BlockRefinementScheduler (uniform mode, no threshold extras), fastdiff's
    low-confidence sampler in diffusers' pipeline, and fastdiff's own pipeline: identical tokens."""
    model, tokenizer = gemma
    theirs = diffusers_run(model, BlockRefinementScheduler(threshold=1.0))
    ours_in_theirs = diffusers_run(model, DiscreteDiffusionScheduler(corruption="uniform", temperature=0.0,
                                                                     sampler="low-confidence"))
    ours = fastdiff_pipe(model, tokenizer, DiscreteDiffusionScheduler(corruption="uniform", sampler="low-confidence",
                                                                      temperature=0.0))(
        input_ids=PROMPT, gen_length=16, steps=16, generator=torch.Generator().manual_seed(0), stop_at_eos=False)
    assert ours_in_theirs.tolist() == theirs.tolist() == ours.sequences.tolist()
    theirs_in_ours = fastdiff_pipe(model, tokenizer, BlockRefinementScheduler(threshold=1.0))(
        input_ids=PROMPT, gen_length=16, steps=16, generator=torch.Generator().manual_seed(0), stop_at_eos=False)
    assert theirs_in_ours.sequences.tolist() == theirs.tolist()


def test_entropy_bound_matches_diffusers(gemma):
    model, _ = gemma
    theirs = diffusers_run(model, EntropyBoundScheduler(entropy_bound=0.1, t_max=0.8, t_min=0.4))
    ours = diffusers_run(model, entropy_bound())
    assert ours.tolist() == theirs.tolist()


def test_uniform_ddim_posterior_matches_diffusers(gemma):
    model, tokenizer = gemma
    posterior = DiscreteDiffusionScheduler(corruption="uniform", sampler="posterior", noise_schedule="linear",
                                           temperature=0.0, sampling="multinomial")
    theirs = diffusers_run(model, DiscreteDDIMScheduler())
    assert diffusers_run(model, posterior).tolist() == theirs.tolist()
    theirs_in_ours = fastdiff_pipe(model, tokenizer, DiscreteDDIMScheduler())(
        input_ids=PROMPT, gen_length=16, steps=16, generator=torch.Generator().manual_seed(0), stop_at_eos=False)
    assert theirs_in_ours.sequences.tolist() == theirs.tolist()


def test_confidence_stop_freezes_confident_canvases(gemma):
    """A model sure of one answer (logits fixed by a hook) is frozen once its guess repeats."""
    model, tokenizer = gemma
    sure = torch.full((64,), -20.0)
    sure[7] = 20.0

    def certain(module, args, kwargs, output):
        output.logits = sure.expand_as(output.logits).clone()
        return output

    pipe = fastdiff_pipe(model, tokenizer, entropy_bound())
    handle = model.register_forward_hook(certain, with_kwargs=True)
    try:
        full = pipe(input_ids=PROMPT, gen_length=16, steps=16, generator=torch.Generator().manual_seed(0),
                    stop_at_eos=False)
        stopped = pipe(input_ids=PROMPT, gen_length=16, steps=16, generator=torch.Generator().manual_seed(0),
                       stop_at_eos=False, confidence_stop=0.01)
    finally:
        handle.remove()
    assert full.nfe == 16 and stopped.nfe == 4  # two steps per canvas: a guess, then the same guess
    assert stopped.sequences.tolist() == full.sequences.tolist() == [[7] * 16]


def test_bad_input(gemma):
    model, tokenizer = gemma
    with pytest.raises(ValueError, match="uniform-noise model .* corruption='mask'"):
        MaskedDiffusionLMPipeline(model, tokenizer, DiscreteDiffusionScheduler())
    pipe = fastdiff_pipe(model, tokenizer, DiscreteDiffusionScheduler(corruption="uniform"))
    with pytest.raises(ValueError, match=r"gen_length \(12\) must be a multiple of .*canvas length \(8\)"):
        pipe(input_ids=PROMPT, gen_length=12)
    with pytest.raises(ValueError, match="block_length"):
        pipe(input_ids=PROMPT, gen_length=16, block_length=4)
    with pytest.raises(ValueError, match="kv_cache"):
        pipe(input_ids=PROMPT, gen_length=16, kv_cache="prefix")
    with pytest.raises(ValueError, match="needs a mask token"):
        pipe(input_ids=PROMPT, gen_length=16, sampler=DiscreteDiffusionScheduler(corruption="hybrid"))
    with pytest.raises(ValueError, match="mdlm.*corruption='mask' only"):
        DiscreteDiffusionScheduler(corruption="uniform", sampler="mdlm")
    with pytest.raises(ValueError, match="mask_token_id=5: corruption='uniform' has no mask token"):
        DiscreteDiffusionScheduler(corruption="uniform", mask_token_id=5)
    with pytest.raises(ValueError, match="entropy_bound must be > 0"):
        DiscreteDiffusionScheduler(sampler="entropy-bound", entropy_bound=0.0)


def test_from_pretrained_loads_a_saved_diffusion_gemma(gemma, tmp_path):
    model, tokenizer = gemma
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    pipe = MaskedDiffusionLMPipeline.from_pretrained(str(tmp_path), sampler="threshold:threshold=0.5")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.corruption == "uniform" and pipe.scheduler.config.sampler == "threshold"
    out = pipe(input_ids=PROMPT, gen_length=8, steps=8, generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape == (1, 8) and 1 <= out.nfe <= 8


def test_diffusers_schedulers_on_a_masked_lm_are_refused_with_a_reason():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    with pytest.raises(ValueError, match="BlockRefinementScheduler drives uniform-state block diffusion models"):
        MaskedDiffusionLMPipeline(model, None, BlockRefinementScheduler(), mask_token_id=3)


def test_command_line_on_a_saved_diffusion_gemma(gemma, tmp_path, capsys):
    from fastdiff.cli import main

    model, tokenizer = gemma
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["text", "--model", str(tmp_path), "--gen-length", "16", "--prompt", "t5 t6",
                 "--sampler", "entropy-bound:temperature=0.8,min_temperature=0.4"]) == 0
    assert "16 model calls for 16 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        main(["text", "--model", str(tmp_path), "--gen-length", "12"])
    assert error.value.code == 2
    assert "must be a multiple of DiffusionGemmaForBlockDiffusion's canvas length (8)" in capsys.readouterr().err
