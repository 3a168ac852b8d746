"""MaskedDiffusionLMPipeline on models built in code: a tiny BERT, and tiny models reproducing the
interfaces of remote-code diffusion LMs (LLaDA's mask id, Dream's shifted logits, MDLM's time input)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, PretrainedConfig

from fastdiff.pipelines import MaskedDiffusionLMPipeline
from fastdiff.schedulers import MaskedDiffusionScheduler, sigma

LETTERS = list("abcdefghijklmnopqrstuvwxyz")


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    return BertTokenizer(vocab_file, do_lower_case=True)  # one token per letter ("a b c")


@pytest.fixture(scope="module")
def bert(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertForMaskedLM(config).eval()


def make(model, tokenizer, sampler="low-confidence", temperature=None, **kwargs):
    scheduler = MaskedDiffusionScheduler(sampler=sampler, temperature=temperature)
    pipe = MaskedDiffusionLMPipeline(model, tokenizer, scheduler, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Oracle(torch.nn.Module):
    """Always predicts ``target`` at the last positions; can shift its logits like a model adapted
    from an autoregressive one (Dream), and can take a time input like MDLM."""

    def __init__(self, target, vocab, model_type="", shift=False, timed=False):
        super().__init__()
        self.config = PretrainedConfig()
        self.config.model_type, self.config.vocab_size = model_type, vocab
        self.target, self.vocab, self.shift, self.timed = list(target), vocab, shift, timed
        self.times = []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, timesteps=None):
        if self.timed:
            assert timesteps is not None and timesteps.shape == (input_ids.shape[0],)
            self.times.append(timesteps.clone())
        else:
            assert timesteps is None
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab)
        start = length - len(self.target)
        logits[:, start:] = torch.nn.functional.one_hot(torch.tensor(self.target), self.vocab).float() * 100
        if self.shift:  # position i's prediction sits at i - 1
            logits = torch.cat([logits[:, 1:], logits[:, -1:]], dim=1)
        return (logits,)


TARGET = [9, 10, 11, 12, 13, 14]


def test_adapters_recover_the_oracle_target(tokenizer):
    prompt = torch.tensor([[5, 6, 7]])
    vocab = len(tokenizer)
    for sampler in ("low-confidence", "mdlm", "first-hitting", "threshold", "rdm", "random"):
        pipe = make(Oracle(TARGET, vocab), tokenizer, sampler)
        out = pipe(input_ids=prompt, gen_length=6, steps=3, generator=torch.Generator().manual_seed(0))
        assert out.sequences.tolist() == [TARGET] and out.texts == ["e f g h i j"], sampler
    # Dream: logits shifted by one, declared by its model_type (and overridable)
    dream = make(Oracle(TARGET, vocab, model_type="dream", shift=True), tokenizer)
    assert dream.interface.shift_logits and dream(input_ids=prompt, gen_length=6).sequences.tolist() == [TARGET]
    unshifted = make(Oracle(TARGET, vocab, model_type="dream", shift=True), tokenizer, shift_logits=False)
    assert unshifted(input_ids=prompt, gen_length=6).sequences.tolist() != [TARGET]
    # MDLM: the time goes in as sigma(t), one per sequence
    timed = Oracle(TARGET, vocab, model_type="mdlm", timed=True)
    mdlm = make(timed, tokenizer, "mdlm")
    assert mdlm.interface.time_input == "sigma"
    out = mdlm(input_ids=prompt.expand(2, 3), gen_length=6, steps=4, generator=torch.Generator().manual_seed(0))
    assert out.sequences.tolist() == [TARGET] * 2
    assert torch.allclose(timed.times[0].double(), sigma("log-linear", torch.ones(2, dtype=torch.float64)))
    # LLaDA: its mask token is not the tokenizer's
    llada = make(Oracle(TARGET, 126400, model_type="llada"), tokenizer)
    assert llada.interface.mask_token_id == 126336 and llada.scheduler.config.mask_token_id == 126336
    assert llada(input_ids=prompt, gen_length=6).sequences.tolist() == [TARGET]


def test_a_batch_of_mixed_prompt_lengths_equals_single_prompts(bert, tokenizer):
    pipe = make(bert, tokenizer, temperature=0.0)
    prompts = ["a b", "a b c d e f g h", "q"]
    batch = pipe(prompts, gen_length=8, steps=8)
    assert batch.sequences.shape == (3, 8) and not bool((batch.sequences == tokenizer.mask_token_id).any())
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt, gen_length=8, steps=8)
        assert alone.sequences[0].tolist() == batch.sequences[i].tolist(), prompt
        assert alone.texts[0] == batch.texts[i]


def test_reusing_unchanged_steps_cuts_model_calls_with_identical_samples(bert, tokenizer):
    pipe = make(bert, tokenizer, "mdlm")
    reused = pipe("abc", gen_length=16, steps=200, generator=torch.Generator().manual_seed(3))
    plain = pipe("abc", gen_length=16, steps=200, generator=torch.Generator().manual_seed(3), reuse_unchanged=False)
    assert torch.equal(reused.sequences, plain.sequences)
    assert reused.nfe <= 17 and plain.nfe == plain.steps and plain.nfe >= 3 * reused.nfe
    # the ledger counts the same calls, step by step: the last call (plain), then the one before
    assert pipe.report().denoiser_calls == plain.nfe and len(pipe.report().steps) == plain.steps
    earlier = pipe.report(pipe.ledger.calls[-2])
    assert earlier.denoiser_calls == reused.nfe and len(earlier.steps) == reused.steps
    assert sum(s.denoiser_calls == 0 for s in earlier.steps) == reused.steps - reused.nfe
    assert f"{reused.nfe} denoiser calls" in earlier.summary()
    # per sequence: a call carries only the sequences that changed
    prompts = ["a b c", "d", "e f"]
    reused = pipe(prompts, gen_length=16, steps=100, generator=torch.Generator().manual_seed(4))
    plain = pipe(prompts, gen_length=16, steps=100, generator=torch.Generator().manual_seed(4), reuse_unchanged=False)
    assert torch.equal(reused.sequences, plain.sequences)
    assert max(reused.sequence_nfe) <= 17 and reused.nfe >= max(reused.sequence_nfe)
    assert sum(reused.sequence_nfe) < 3 * reused.nfe and plain.sequence_nfe == [plain.nfe] * 3
    # a model with a time input is always called: its output depends on t even on an unchanged canvas
    timed = make(Oracle(TARGET, len(tokenizer), model_type="mdlm", timed=True), tokenizer, "mdlm")
    out = timed(input_ids=torch.tensor([[5, 6]]), gen_length=6, steps=50, generator=torch.Generator().manual_seed(0))
    assert out.nfe == out.steps


def test_blocks_stop_at_end_of_sequence(vocab_file):
    with_eos = BertTokenizer(vocab_file, eos_token="[SEP]")
    eos = with_eos.eos_token_id
    target = [9, 10, eos, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    steps_seen = []
    pipe = make(Oracle(target, len(with_eos)), with_eos)
    out = pipe(input_ids=torch.tensor([[5]]), gen_length=12, block_length=4, steps=12,
               callback_on_step_end=lambda p, i, canvas: steps_seen.append(i))
    assert out.sequences.tolist() == [[9, 10, eos, 11] + [eos] * 8] and out.texts == ["e f"]
    assert out.steps == 4 and steps_seen == [0, 1, 2, 3]  # the first block only: its 12 / 3 steps
    full = pipe(input_ids=torch.tensor([[5]]), gen_length=12, block_length=4, steps=12, stop_at_eos=False)
    assert full.sequences.tolist() == [target] and full.steps == 12


def test_sampler_names_options_and_guidance(bert, tokenizer):
    pipe = make(bert, tokenizer)
    # every top probability over 31 tokens exceeds 1/31: a threshold below commits all in one step
    fast = pipe("a b c", gen_length=16, sampler="fast-dllm:threshold=0.03")
    slow = pipe("a b c", gen_length=16, sampler="threshold", threshold=1.0)
    assert fast.steps == fast.nfe == 1 and slow.steps == slow.nfe == 16  # threshold 1: one token per step
    assert pipe.scheduler.config.sampler == "low-confidence"  # per-call overrides leave the pipeline alone
    guided = pipe("abc", gen_length=8, steps=8, cfg_scale=0.0)
    assert torch.equal(guided.sequences, pipe("abc", gen_length=8, steps=8).sequences)
    assert pipe("abc", gen_length=8, steps=8, cfg_scale=2.0).nfe == 8
    with pytest.raises(ValueError, match="unknown sampler option"):
        pipe("abc", gen_length=8, sampler="threshold:speed=2")


def test_bad_input(bert, tokenizer, vocab_file):
    pipe = make(bert, tokenizer)
    with pytest.raises(ValueError, match=r"gen_length \(10\) must be a multiple of block_length \(4\)"):
        pipe("a", gen_length=10, block_length=4)
    with pytest.raises(ValueError, match=r"steps \(2\) must be at least the number of blocks \(4"):
        pipe("a", gen_length=16, block_length=4, steps=2)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        pipe("a", gen_length=8, sampler="threshold", threshold=1.5)
    with pytest.raises(ValueError, match="longer than the model's maximum length 64"):
        pipe(" ".join("abcdefgh" * 4), gen_length=40)
    with pytest.raises(ValueError, match="the list of prompts is empty"):
        pipe([], gen_length=8)
    with pytest.raises(ValueError, match="sampler must be one of"):
        pipe("a", gen_length=8, sampler="beam")
    no_mask = BertTokenizer(vocab_file)
    no_mask.mask_token = None
    with pytest.raises(ValueError, match="mask_token_id: .* and its tokenizer have no mask token.*corruption=.mask."):
        make(Oracle(TARGET, len(tokenizer)), no_mask)
    assert make(Oracle(TARGET, len(tokenizer)), no_mask, mask_token_id=4).interface.mask_token_id == 4
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        make(Oracle(TARGET, len(tokenizer)), no_mask, mask_token_id=999)


def test_save_and_load(bert, tokenizer, tmp_path):
    pipe = make(bert, tokenizer, "threshold", temperature=0.0)
    before = pipe("abc", gen_length=8)
    pipe.save_pretrained(tmp_path)
    loaded = MaskedDiffusionLMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.sampler == "threshold"
    assert torch.equal(loaded("abc", gen_length=8).sequences, before.sequences)
    # a sampler named at load time replaces the saved one and keeps the rest of the config
    other = MaskedDiffusionLMPipeline.from_pretrained(tmp_path, sampler="mdlm:top_k=3")
    assert other.scheduler.config.sampler == "mdlm" and other.scheduler.config.top_k == 3
    assert other.scheduler.config.temperature == 0.0


def test_kv_caches(bert, tokenizer):
    from fastdiff.pipelines.text_cache import BlockCache

    pipe = make(bert, tokenizer)
    prompts = ["a b c", "q r s t u v"]
    # a cached step on an unchanged canvas gives exactly the full model's logits at the queried positions
    ids, mask = pipe._encode(prompts, None, None)
    canvas = torch.cat([ids, torch.full((2, 12), tokenizer.mask_token_id)], dim=1)
    attention = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], dim=1)
    canvas[:, -12:-8] = 7
    full = pipe.interface.logits(bert, canvas, attention, None)

    def forward(i, a, **kw):
        return pipe.interface.logits(bert, i, a, None, **kw)

    start = ids.shape[1] + 4
    for mode in ("prefix", "dual"):
        cache = BlockCache(mode, start, start + 4, canvas.shape[1], shifted=False)
        assert torch.allclose(cache.refresh(forward, canvas, attention), full, atol=1e-5)
        stepped = cache.step(forward, canvas, attention, (attention.cumsum(-1) - 1).clamp_min(0))
        queried = cache.query
        assert int(queried.sum()) == (canvas.shape[1] - start if mode == "prefix" else 4)
        assert torch.allclose(stepped[:, queried], full[:, queried], atol=1e-5), mode
    # one step per block: every call refreshes, so the generation is exactly the uncached one
    plain = pipe(prompts, gen_length=12, block_length=4, steps=3)
    for mode in ("prefix", "dual"):
        assert torch.equal(pipe(prompts, gen_length=12, block_length=4, steps=3, kv_cache=mode).sequences,
                           plain.sequences), mode
        cached = pipe(prompts, gen_length=12, block_length=4, steps=12, kv_cache=mode)
        assert not bool((cached.sequences == tokenizer.mask_token_id).any()) and cached.nfe == 12
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        pipe("a", gen_length=8, kv_cache="full")
    # rotary positions without position_ids: the prefix cache places the new tokens right after it
    from transformers import RoFormerConfig, RoFormerForMaskedLM

    torch.manual_seed(0)
    roformer = RoFormerForMaskedLM(RoFormerConfig(vocab_size=len(tokenizer), hidden_size=32, embedding_size=32,
                                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                                  max_position_embeddings=64)).eval()
    rotary = make(roformer, tokenizer)
    assert not rotary.interface.takes_position_ids and rotary.interface.takes_cache
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = rotary(input_ids=ids, gen_length=12, block_length=4, steps=3)
    assert torch.equal(rotary(input_ids=ids, gen_length=12, block_length=4, steps=3, kv_cache="prefix").sequences,
                       plain.sequences)
    canvas = torch.cat([ids, torch.full((1, 12), tokenizer.mask_token_id)], dim=1)
    ones = torch.ones_like(canvas)
    full = rotary.interface.logits(roformer, canvas, ones, None)
    cache = BlockCache("prefix", 8, 12, canvas.shape[1], shifted=False)
    cache.refresh(lambda i, a, **kw: rotary.interface.logits(roformer, i, a, None, **kw), canvas, ones)
    stepped = cache.step(lambda i, a, **kw: rotary.interface.logits(roformer, i, a, None, **kw), canvas, ones,
                         ones.cumsum(-1) - 1)
    assert torch.allclose(stepped[:, 8:], full[:, 8:], atol=1e-5)
    # no position_ids argument, but its rotary table is asked for the block's canvas positions
    assert rotary.interface.rotary_table == "roformer.encoder.embed_positions" and rotary.interface.places_tokens
    two, two_mask = torch.cat([canvas, canvas]), torch.cat([ones, ones])
    two[1, :2], two_mask[1, :2] = tokenizer.pad_token_id, 0  # a left-padded row: canvas indices all the same
    full = rotary.interface.logits(roformer, two, two_mask, None)
    cache = BlockCache("dual", 8, 12, canvas.shape[1], shifted=False)
    cache.refresh(lambda i, a, **kw: rotary.interface.logits(roformer, i, a, None, **kw), two, two_mask)
    stepped = cache.step(lambda i, a, **kw: rotary.interface.logits(roformer, i, a, None, **kw), two, two_mask,
                         rotary.interface.positions(two_mask))
    assert torch.allclose(stepped[:, 8:12], full[:, 8:12], atol=1e-5)
    after = rotary.interface.logits(roformer, two, two_mask, None)  # the hook is gone after the call
    assert torch.equal(after, full) and not roformer.roformer.encoder.embed_positions._forward_pre_hooks
    assert torch.equal(rotary(input_ids=ids, gen_length=12, block_length=4, steps=3, kv_cache="dual").sequences,
                       plain.sequences)
    cached = rotary(input_ids=ids, gen_length=12, block_length=4, steps=12, kv_cache="dual")
    assert cached.nfe == 12 and not bool((cached.sequences == tokenizer.mask_token_id).any())

    class NoPlacement(torch.nn.Module):  # takes a cache, but neither position_ids nor a rotary table
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return self.inner(input_ids, attention_mask=attention_mask, **kwargs)

    with pytest.raises(ValueError, match="kv_cache='dual' needs a model that takes position_ids or has a rotary"):
        make(NoPlacement(bert), tokenizer)(input_ids=ids, gen_length=12, block_length=4, steps=6, kv_cache="dual")
    oracle = make(Oracle(TARGET, len(tokenizer)), tokenizer)
    with pytest.raises(ValueError, match="kv_cache needs a model whose attention layers fill a transformers Cache"):
        oracle(input_ids=torch.tensor([[5]]), gen_length=6, block_length=3, steps=4, kv_cache="prefix")


def test_delayed_kv_cache(bert, tokenizer):
    """dKV-Cache: refreshed every step it is exact; a cached step on an unchanged canvas recomputes
    only the masks, with the full model's logits there; decoded tokens are recomputed once, then cached."""
    from fastdiff.pipelines.text_cache import DelayedCache

    pipe = make(bert, tokenizer)
    prompts = ["a b c", "q r s t u v"]
    plain = pipe(prompts, gen_length=12, block_length=4, steps=12)
    assert torch.equal(pipe(prompts, gen_length=12, block_length=4, steps=12, kv_cache="dkv",
                            kv_refresh=1).sequences, plain.sequences)
    cached = pipe(prompts, gen_length=12, steps=12, kv_cache="dkv", kv_refresh=4)
    assert not bool((cached.sequences == tokenizer.mask_token_id).any()) and cached.nfe == 12
    ids, mask = pipe._encode(prompts, None, None)
    canvas = torch.cat([ids, torch.full((2, 6), tokenizer.mask_token_id)], dim=1)
    attention = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], dim=1)
    calls = []

    def forward(i, a, **kw):
        calls.append(i.shape[1])
        return pipe.interface.logits(bert, i, a, None, **kw)

    positions = pipe.interface.positions(attention)
    cache = DelayedCache(canvas.shape[1], shifted=False, refresh=8, mask_id=tokenizer.mask_token_id)
    full = cache.refresh(forward, canvas, attention)
    stepped = cache.step(forward, canvas, attention, positions)
    assert calls[-1] == 6 and torch.allclose(stepped, full, atol=1e-5)
    decoded = canvas.clone()
    decoded[:, -6] = 7
    cache.step(forward, decoded, attention, positions)
    assert calls[-1] == 6  # the just-decoded token once more (with its value), and the 5 masks
    cache.step(forward, decoded, attention, positions)
    assert calls[-1] == 5  # from now on its keys/values come from the cache
    with pytest.raises(ValueError, match="kv_refresh must be an integer >= 1"):
        pipe("a", gen_length=8, kv_cache="dkv", kv_refresh=0)
    # a shifted model (Dream): position i's logits come from i - 1, which is recomputed too; the
    # positions added for that keep their earlier logits, so an unchanged canvas stays exact
    shifted = make(bert, tokenizer, shift_logits=True)

    def forward_shifted(i, a, **kw):
        return shifted.interface.logits(bert, i, a, None, **kw)

    cache = DelayedCache(canvas.shape[1], shifted=True, refresh=8, mask_id=tokenizer.mask_token_id)
    full = cache.refresh(forward_shifted, canvas, attention)
    assert torch.allclose(cache.step(forward_shifted, canvas, attention, positions), full, atol=1e-5)


def test_delayed_kv_cache_on_one_unpadded_prompt(bert, tokenizer):
    """One prompt, no padding: dKV-Cache recomputes scattered positions after the cache. transformers
    5.25's BERT read such position_ids without an attention mask as packed sequences and built a
    mask as long as the recomputed tokens alone ("size of tensor a (22) must match ... (15)")."""
    import inspect

    from fastdiff.pipelines.text_cache import DelayedCache

    pipe = make(bert, tokenizer)
    base_parameters = inspect.signature(bert.base_model.forward).parameters
    assert pipe.interface.cache_argument == ("cache" if "cache" in base_parameters else "past_key_values")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    canvas = torch.cat([ids, torch.full((1, 10), tokenizer.mask_token_id)], dim=1)
    attention = torch.ones_like(canvas)
    positions = pipe.interface.positions(attention)
    calls = []

    def forward(i, a, **kw):
        calls.append(i.shape[1])
        return pipe.interface.logits(bert, i, a, None, **kw)

    cache = DelayedCache(canvas.shape[1], shifted=False, refresh=8, mask_id=tokenizer.mask_token_id)
    cache.refresh(forward, canvas, attention)
    decoded = canvas.clone()
    decoded[0, 9] = 12  # a token in the middle of the masks
    cache.step(forward, decoded, attention, positions)
    stepped = cache.step(forward, decoded, attention, positions)  # the masks around it: scattered positions
    assert calls[-1] == 9 and stepped.shape == (1, 15, len(tokenizer)) and bool(torch.isfinite(stepped).all())
    for mode in ("prefix", "dual", "dkv"):
        out = pipe(input_ids=ids, gen_length=12, block_length=4, steps=12, kv_cache=mode, kv_refresh=3)
        assert not bool((out.sequences == tokenizer.mask_token_id).any()) and out.nfe == 12, mode


def test_editing_and_uniform_noise_on_a_bidirectional_model(tokenizer):
    oracle = Oracle(TARGET, len(tokenizer))
    pipe = make(oracle, tokenizer)
    # every decoded token the oracle disagrees with is replaced once all masks are resolved
    wrong = torch.full((1, 6), 5)
    ids = torch.tensor([[1, 2, 3]])

    def corrupt(p, step, canvas):
        if step == 0:
            canvas[:, 3:5] = wrong[:, :2]  # as if two tokens had been decoded wrongly

    editing = MaskedDiffusionScheduler(sampler="low-confidence", editing_threshold=0.9)
    out = pipe(input_ids=ids, gen_length=6, steps=6, sampler=editing, callback_on_step_end=corrupt)
    assert out.sequences.tolist() == [TARGET]
    unedited = pipe(input_ids=ids, gen_length=6, steps=6, callback_on_step_end=corrupt)
    assert unedited.sequences[0, :2].tolist() == [5, 5]
    # the same model with uniform noise: the canvas starts random and ends at the oracle's target
    from fastdiff.schedulers import DiscreteDiffusionScheduler

    for sampler in ("low-confidence", "threshold", "posterior"):
        uniform = DiscreteDiffusionScheduler(corruption="uniform", sampler=sampler, temperature=0.0,
                                             noise_schedule="linear")
        out = pipe(input_ids=ids, gen_length=6, steps=6, sampler=uniform, generator=torch.Generator().manual_seed(0))
        assert out.sequences.tolist() == [TARGET], sampler


def test_posterior_sampler_with_guidance_in_the_pipeline(tokenizer):
    """``cfg_scale`` with the exact posterior guides the reverse step (one batched call per step)."""
    pipe = make(Oracle(TARGET, len(tokenizer)), tokenizer)
    ids = torch.tensor([[1, 2, 3]])
    posterior = MaskedDiffusionScheduler(sampler="posterior", temperature=0.0, noise_schedule="linear")
    out = pipe(input_ids=ids, gen_length=6, steps=6, sampler=posterior, cfg_scale=1.5,
               generator=torch.Generator().manual_seed(0))
    assert out.sequences.tolist() == [TARGET] and out.nfe <= 6
