"""The masked diffusion scheduler: every sampler against an oracle, exact per-step counts, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.schedulers import NOISE_SCHEDULES, SAMPLERS, MaskedDiffusionScheduler, alpha, time_of
from fastdiff.schedulers import sampling

MASK, VOCAB = 0, 12


def oracle(target: torch.Tensor) -> torch.Tensor:
    """Logits that put all mass on the target token (a gap no float64 Gumbel draw can close)."""
    logits = torch.zeros(*target.shape, VOCAB)
    return logits.scatter(-1, target.unsqueeze(-1), 1000.0)


def run(scheduler, target, prompt_len=3, steps=8, generator=None, record=None):
    canvas = target.clone()
    canvas[:, prompt_len:] = MASK
    active = torch.zeros_like(canvas, dtype=torch.bool)
    active[:, prompt_len:] = True
    scheduler.set_timesteps(steps)
    t = torch.ones(target.shape[0], dtype=torch.float64)
    for _ in range(target.shape[1] if scheduler.adaptive else steps):
        if not bool(((canvas == MASK) & active).any()):
            break
        out = scheduler.step(oracle(target), t, canvas, active=active, generator=generator)
        if record is not None:
            record.append((out.committed.sum(1).tolist(), t.clone(), out.next_timestep.clone()))
        canvas, t = out.prev_sample, out.next_timestep
    return canvas


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("temperature", [None, 0.0, 1.0])
def test_every_sampler_recovers_the_oracle_target(sampler, temperature):
    target = torch.randint(1, VOCAB, (3, 19), generator=torch.Generator().manual_seed(1))
    scheduler = MaskedDiffusionScheduler(sampler=sampler, mask_token_id=MASK, temperature=temperature)
    canvas = run(scheduler, target, generator=torch.Generator().manual_seed(0))
    assert torch.equal(canvas, target)  # no mask left, prompt untouched, every token right


def test_tokens_per_step():
    target = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))  # 10 to generate
    for sampler in ("low-confidence", "random"):
        record = []
        run(MaskedDiffusionScheduler(sampler=sampler, mask_token_id=MASK), target, steps=4, record=record,
            generator=torch.Generator().manual_seed(0))
        assert [r[0] for r in record] == [[3, 3], [3, 3], [2, 2], [2, 2]]  # an even quota, remainder first
    record = []
    run(MaskedDiffusionScheduler(sampler="first-hitting", mask_token_id=MASK), target, record=record,
        generator=torch.Generator().manual_seed(0))
    assert [r[0] for r in record] == [[1, 1]] * 10
    assert all(bool((nxt < t).all()) for _, t, nxt in record) and bool((record[-1][2] == 0).all())
    # threshold: every token is certain under the oracle, so one step commits all of them
    record = []
    run(MaskedDiffusionScheduler(sampler="threshold", mask_token_id=MASK), target, record=record)
    assert [r[0] for r in record] == [[10, 10]]


def test_threshold_commits_at_least_one_and_only_confident_ones():
    logits = torch.zeros(1, 4, VOCAB)
    logits[0, 0, 5] = 10.0  # p ≈ 0.9996
    logits[0, 1, 6] = 3.0  # p ≈ 0.65
    logits[0, 2, 7] = 2.0
    logits[0, 3, 8] = 1.0
    canvas = torch.full((1, 4), MASK)
    scheduler = MaskedDiffusionScheduler(sampler="threshold", mask_token_id=MASK, threshold=0.9)
    scheduler.set_timesteps(4)
    out = scheduler.step(logits, 1.0, canvas)
    assert out.committed.tolist() == [[True, False, False, False]] and out.prev_sample[0, 0] == 5
    out = scheduler.step(logits, 1.0, out.prev_sample)  # nothing above 0.9 left: the most confident one
    assert out.committed.tolist() == [[False, True, False, False]] and out.prev_sample[0, 1] == 6
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        MaskedDiffusionScheduler(sampler="threshold", threshold=0.0)


def test_mdlm_unmasks_with_the_ancestral_probability():
    scheduler = MaskedDiffusionScheduler(sampler="mdlm", noise_schedule="linear", mask_token_id=MASK)
    scheduler.set_timesteps(4)
    canvas = torch.full((4, 5000), MASK)
    logits = torch.randn(4, 5000, VOCAB)
    out = scheduler.step(logits, torch.tensor([1.0, 0.75, 0.5, 0.25]), canvas, generator=torch.Generator().manual_seed(0))
    share = out.committed.double().mean(1)
    # (α_s − α_t)/(1 − α_t) with α = 1 − t: 1/4, 1/3, 1/2, 1
    assert torch.allclose(share, torch.tensor([0.25, 1 / 3, 0.5, 1.0], dtype=torch.float64), atol=0.03)
    assert torch.allclose(out.next_timestep, torch.tensor([0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert not bool((out.prev_sample == MASK)[3].any())
    decoded = canvas.clone()
    decoded[:, :10] = 3  # already decoded tokens are carried over
    assert bool((scheduler.step(logits, 1.0, decoded).prev_sample[:, :10] == 3).all())


def test_first_hitting_time_jumps_to_the_next_unmasking_event():
    n = 4
    scheduler = MaskedDiffusionScheduler(sampler="first-hitting", noise_schedule="linear", mask_token_id=MASK)
    scheduler.set_timesteps(1)
    canvas = torch.full((20000, n), MASK)
    out = scheduler.step(torch.randn(20000, n, VOCAB), 1.0, canvas, generator=torch.Generator().manual_seed(0))
    # 1 − α_s = u^(1/n) with α = 1 − t: the next time is the largest of n uniforms, mean n/(n+1)
    assert abs(float(out.next_timestep.mean()) - n / (n + 1)) < 0.01
    assert out.committed.sum(1).eq(1).all()


def test_rdm_masks_again_the_lowest_scoring_decoded_tokens():
    scheduler = MaskedDiffusionScheduler(sampler="rdm", noise_schedule="linear", mask_token_id=MASK, temperature=0.0)
    scheduler.set_timesteps(2)
    target = torch.tensor([[4, 5, 6, 7]])
    canvas = torch.tensor([[9, MASK, MASK, MASK]])  # a decoded token the model disagrees with
    out = scheduler.step(oracle(target), 1.0, canvas)  # t = 1 -> 0.5: keep round(0.5 · 4) = 2 decoded
    assert out.prev_sample.tolist() == [[MASK, 5, 6, MASK]]  # revised: 9 masked again; best-scored kept
    out = scheduler.step(oracle(target), 0.5, out.prev_sample)
    assert out.prev_sample.tolist() == [[4, 5, 6, 7]]


def test_noise_schedules():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    eps = 1e-3
    expected = {
        "linear": [1.0, 0.5, 0.0],
        "log-linear": [1.0, 1 - (1 - eps) * 0.5, eps],
        "mdlm-cosine": [1.0, eps + (1 - eps) * math.cos(math.pi / 4), eps],
        "maskgit-cosine": [1.0, 1 - math.sin(math.pi / 4), 0.0],
    }
    assert set(expected) == set(NOISE_SCHEDULES)
    for name, values in expected.items():
        a = alpha(name, t, eps)
        assert a.dtype == torch.float64 and torch.allclose(a, torch.tensor(values, dtype=torch.float64)), name
        grid = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
        assert torch.allclose(time_of(name, alpha(name, grid, eps), eps), grid, atol=1e-9), name
        assert bool((alpha(name, grid[1:], eps) < alpha(name, grid[:-1], eps)).all()), name  # strictly masking more
    with pytest.raises(ValueError, match="noise_schedule must be one of"):
        MaskedDiffusionScheduler(noise_schedule="cosine")  # ambiguous: which cosine?


def test_add_noise_masks_one_minus_alpha():
    scheduler = MaskedDiffusionScheduler(noise_schedule="maskgit-cosine", mask_token_id=MASK)
    clean = torch.randint(1, VOCAB, (2, 20000), generator=torch.Generator().manual_seed(0))
    noisy = scheduler.add_noise(clean, torch.tensor([0.3, 0.8]), generator=torch.Generator().manual_seed(1))
    masked = (noisy == MASK).double().mean(1)
    assert torch.allclose(masked, 1 - alpha("maskgit-cosine", torch.tensor([0.3, 0.8])), atol=0.01)
    assert bool(((noisy == clean) | (noisy == MASK)).all())


def test_sampling_is_float64_with_the_right_temperature(monkeypatch):
    seen = []
    argmax = torch.argmax

    def spy(x, *args, **kwargs):
        seen.append(x.dtype)
        return argmax(x, *args, **kwargs)

    monkeypatch.setattr(sampling.torch, "argmax", spy)
    logits = torch.tensor([[0.0, -math.log(9.0)]], dtype=torch.float32).expand(40000, 2)  # p = 0.9, 0.1
    tokens, confidence = sampling.sample_tokens(logits, 1.0, torch.Generator().manual_seed(0))
    assert seen == [torch.float64]
    assert abs(float(tokens.double().mean()) - 0.1) < 0.01
    assert torch.allclose(confidence, torch.where(tokens == 0, 0.9, 0.1).double())  # untempered probabilities
    tokens, _ = sampling.sample_tokens(logits, 0.5, torch.Generator().manual_seed(0))  # p ∝ (0.9², 0.1²)
    assert abs(float(tokens.double().mean()) - 0.01 / 0.82) < 0.005


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(sampling.filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(sampling.filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(sampling.filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    tokens, _ = sampling.sample_tokens(logits.expand(5000, 4), 1.0, torch.Generator().manual_seed(0), top_k=2)
    assert set(tokens.tolist()) == {0, 1}


def test_config_round_trip_and_bad_input(tmp_path):
    scheduler = MaskedDiffusionScheduler(sampler="fast-dllm", threshold=0.8, mask_token_id=7,
                                         noise_schedule="mdlm-cosine", top_p=0.9)
    assert scheduler.config.sampler == "threshold"  # aliases are stored by their canonical name
    scheduler.save_pretrained(tmp_path)
    loaded = MaskedDiffusionScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    with pytest.raises(ValueError, match="sampler must be one of"):
        MaskedDiffusionScheduler(sampler="greedy")
    with pytest.raises(ValueError, match="mask_token_id is not set"):
        unset = MaskedDiffusionScheduler()
        unset.set_timesteps(2)
        unset.step(torch.zeros(1, 2, VOCAB), 1.0, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        MaskedDiffusionScheduler(mask_token_id=MASK).step(torch.zeros(1, 2, VOCAB), 1.0, torch.zeros(1, 2, dtype=torch.long))
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"eps": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MaskedDiffusionScheduler(**bad)
