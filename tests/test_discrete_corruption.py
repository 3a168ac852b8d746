"""Uniform and hybrid (GIDD) corruption, the new samplers and options of the one text scheduler."""

from __future__ import annotations

import pytest
import torch

from fastdiff.schedulers import DiscreteDiffusionScheduler, MaskedDiffusionScheduler
from fastdiff.schedulers.corruption import noise_mass, routes, survival, transition

VOCAB, MASK = 5, 4
SCHEDULE = {"noise_schedule": "log-linear", "eps": 1e-3, "p_uniform": 0.3, "gamma": 1.0}


def marginal(kind: str, t: float) -> torch.Tensor:
    """Q_t[x_t, x_0] = q_t(x_t | x_0) as a matrix, from the kernel's definition."""
    tokens = torch.arange(VOCAB)
    noise = noise_mass(kind, torch.tensor(t), tokens, VOCAB, MASK, **SCHEDULE)
    return survival(kind, torch.tensor(t), **SCHEDULE) * torch.eye(VOCAB, dtype=torch.float64) + noise.unsqueeze(1)


@pytest.mark.parametrize("kind,gamma", [("mask", 1.0), ("uniform", 1.0), ("hybrid", 1.0), ("hybrid", 2.0)])
def test_reverse_step_is_the_exact_posterior(kind, gamma):
    """Against Bayes on explicit matrices: q(x_s | x_t, x_0) ∝ Q_{t|s}[x_t, x_s]·Q_s[x_s, x_0], with
    Q_{t|s} = Q_t·Q_s⁻¹; routes (one clean guess) and transition (a distribution over guesses)."""
    t, s = 0.7, 0.45
    SCHEDULE["gamma"] = gamma
    q_t, q_s = marginal(kind, t), marginal(kind, s)
    step = q_t @ torch.linalg.inv(q_s)
    assert (step > -1e-12).all() and torch.allclose(step.sum(0), torch.ones(VOCAB, dtype=torch.float64))
    current = torch.arange(VOCAB)
    probs = torch.softmax(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0),
                                      dtype=torch.float64), -1)
    if kind == "mask":
        probs[:, MASK] = 0  # x_0 is never the mask
        probs = probs / probs.sum(-1, keepdim=True)
    expected = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for x_t in range(VOCAB):
        for x_0 in range(VOCAB):
            if q_t[x_t, x_0] <= 0 or probs[x_t, x_0] == 0:
                continue
            posterior = step[x_t] * q_s[:, x_0] / q_t[x_t, x_0]
            assert torch.allclose(posterior.sum(), torch.tensor(1.0, dtype=torch.float64))
            expected[x_t] += probs[x_t, x_0] * posterior
            weights = routes(kind, torch.tensor([t]), torch.tensor([s]), torch.tensor([[x_t]]),
                             torch.tensor([[x_0]]), VOCAB, MASK, **SCHEDULE)[0, 0]
            noise = noise_mass(kind, torch.tensor(s), current, VOCAB, MASK, **SCHEDULE)
            noise = noise / noise.sum()
            from_routes = weights[0] * torch.eye(VOCAB, dtype=torch.float64)[x_0] + \
                weights[1] * torch.eye(VOCAB, dtype=torch.float64)[x_t] + weights[2] * noise
            assert torch.allclose(from_routes, posterior, atol=1e-12), (x_t, x_0)
    expected = expected / expected.sum(-1, keepdim=True)
    consistent = expected.sum(-1) > 0
    got = transition(kind, torch.tensor([t]), torch.tensor([s]), current.unsqueeze(0), probs.unsqueeze(0), MASK,
                     **SCHEDULE)[0]
    assert torch.allclose(got[consistent], expected[consistent], atol=1e-12)
    SCHEDULE["gamma"] = 1.0


def test_gidd_mixes_mask_and_uniform_noise():
    scheduler = DiscreteDiffusionScheduler(corruption="hybrid", sampler="posterior", mask_token_id=MASK,
                                           p_uniform=0.3)
    scheduler.vocab_size = 50
    clean = torch.zeros(4000, 8, dtype=torch.long)
    half = scheduler.add_noise(clean, 0.5, generator=torch.Generator().manual_seed(0))
    masked, other = (half == MASK).double().mean(), ((half != MASK) & (half != 0)).double().mean()
    c = 2 * 0.3 / 0.7 * 0.5  # B·(t(1−t))^½ at t = ½
    assert abs(masked - 0.5 / (1 + c)) < 0.01 and abs(other - c / (1 + c) * 48 / 49) < 0.01
    assert bool((scheduler.add_noise(clean, 1.0) == MASK).all())  # all mask at t = 1: a masked canvas to start
    assert bool((scheduler.initial_sample((2, 3), 50) == MASK).all())


def test_posterior_on_the_mask_kernel_is_mdlm():
    """The same commit chance, (α_s − α_t)/(1 − α_t), as the ancestral sampler."""
    kind, t, s = "mask", torch.tensor([0.8]), torch.tensor([0.6])
    weights = routes(kind, t, s, torch.tensor([[MASK]]), torch.tensor([[2]]), VOCAB, MASK, **SCHEDULE)[0, 0]
    a_t, a_s = survival(kind, t, **SCHEDULE), survival(kind, s, **SCHEDULE)
    assert torch.allclose(weights[0], ((a_s - a_t) / (1 - a_t))[0])


def test_guidance_on_the_reverse_step():
    """γ = 1 or identical conditional/unconditional logits: plain sampling from p(x_s | x_t)."""
    scheduler = DiscreteDiffusionScheduler(corruption="uniform", sampler="posterior", noise_schedule="linear")
    scheduler.set_timesteps(4)
    logits = torch.tensor([[[2.0, 0.5, -1.0, 0.0, 1.0]]]).expand(20000, 1, 5)
    sample = torch.full((20000, 1), 3)
    t = torch.ones(20000, dtype=torch.float64) * 0.5
    expected = transition("uniform", torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([[3]]),
                          torch.softmax(logits[:1].double(), -1), None, noise_schedule="linear")[0, 0]
    for guidance, unconditional in ((1.0, torch.zeros_like(logits)), (3.0, logits)):
        out = scheduler.step(logits, t, sample, unconditional_output=unconditional, guidance_scale=guidance,
                             generator=torch.Generator().manual_seed(1))
        freq = torch.bincount(out.prev_sample[:, 0], minlength=5).double() / 20000
        assert torch.allclose(freq, expected.float().double(), atol=0.015), (guidance, freq, expected)
    sharpened = scheduler.step(logits, t, sample, unconditional_output=torch.zeros_like(logits), guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(1)).prev_sample
    assert (sharpened == 0).double().mean() > (out.prev_sample == 0).double().mean() + 0.05


def test_margin_and_entropy_bound_choose_what_their_papers_say():
    logits = torch.log(torch.tensor([[[0.50, 0.48, 0.02, 1e-9, 1e-9],    # confident-ish but a near tie
                                      [0.40, 0.10, 0.10, 0.10, 0.30],    # lower top-1, larger margin (0.10)
                                      [0.97, 0.01, 0.01, 0.01, 1e-9],    # near certain
                                      [0.25, 0.25, 0.25, 0.25, 1e-9]]]))  # undecided
    sample = torch.full((1, 4), MASK)
    margin = DiscreteDiffusionScheduler(sampler="margin", mask_token_id=MASK)
    margin.set_timesteps(4)
    assert margin.step(logits, 1.0, sample).committed.tolist() == [[False, False, True, False]]
    out = margin.step(logits, 0.75, torch.tensor([[MASK, MASK, 0, MASK]]))
    assert out.committed.tolist() == [[False, True, False, False]]  # margin 0.10 beats 0.02 despite less confidence
    bound = DiscreteDiffusionScheduler(sampler="entropy-bound", mask_token_id=MASK, entropy_bound=0.8)
    bound.set_timesteps(4)
    entropy = torch.distributions.Categorical(logits=logits.double()).entropy()[0]
    chosen = bound.step(logits, 1.0, sample).committed[0]
    order = entropy.argsort()
    assert chosen[order[0]] and chosen[order[1]]  # 0.17 + 0.75 − 0.75 ≤ 0.8
    assert not chosen[order[2]]  # 0.17 + 0.75 + 1.25 − 1.25 > 0.8
    assert DiscreteDiffusionScheduler(sampler="entropy-bound", mask_token_id=MASK, entropy_bound=1e-6).adaptive


def test_editing_replaces_confidently_wrong_tokens():
    logits = torch.full((1, 3, VOCAB), -10.0)
    logits[0, :, 1] = 10.0  # the model is sure every position is token 1
    scheduler = DiscreteDiffusionScheduler(sampler="low-confidence", mask_token_id=MASK, editing_threshold=0.9)
    scheduler.set_timesteps(2)
    out = scheduler.step(logits, 0.5, torch.tensor([[2, 1, MASK]]), active=torch.tensor([[False, True, True]]))
    assert out.prev_sample.tolist() == [[2, 1, 1]]  # the inactive (prompt) token stays
    out = scheduler.step(logits, 0.5, torch.tensor([[2, 3, MASK]]))
    assert out.prev_sample.tolist() == [[1, 1, 1]] and out.committed.all()
    plain = DiscreteDiffusionScheduler(sampler="low-confidence", mask_token_id=MASK)
    plain.set_timesteps(2)
    assert plain.step(logits, 0.5, torch.tensor([[2, 3, MASK]])).prev_sample.tolist() == [[2, 3, 1]]


def test_uniform_commit_samplers_remember_and_renoise():
    scheduler = DiscreteDiffusionScheduler(corruption="uniform", sampler="low-confidence", temperature=0.0)
    scheduler.set_timesteps(4)
    logits = torch.randn(2, 8, 11, generator=torch.Generator().manual_seed(0))
    canvas = scheduler.initial_sample((2, 8), 11, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for i in range(4):
        out = scheduler.step(logits, i, canvas, generator=generator)  # an int timestep: a step index
        assert int(scheduler.committed_positions.sum()) == 4 * (i + 1)
        committed = scheduler.committed_positions
        assert torch.equal(out.prev_sample[committed], logits.argmax(-1)[committed])
        canvas = out.prev_sample
    assert torch.equal(canvas, logits.argmax(-1))
    scheduler.set_timesteps(4)
    assert scheduler.committed_positions is None


def test_old_name_and_saved_configs(tmp_path):
    scheduler = MaskedDiffusionScheduler(sampler="eb", mask_token_id=3, entropy_bound=0.5)
    assert isinstance(scheduler, DiscreteDiffusionScheduler) and scheduler.config.sampler == "entropy-bound"
    scheduler.save_pretrained(tmp_path)
    loaded = DiscreteDiffusionScheduler.from_pretrained(tmp_path)
    assert loaded.config.entropy_bound == 0.5 and loaded.config.corruption == "mask"
    with pytest.raises(ValueError, match="corruption must be one of"):
        DiscreteDiffusionScheduler(corruption="gaussian")
    with pytest.raises(ValueError, match="sampling must be one of"):
        DiscreteDiffusionScheduler(sampling="beam")


def test_guided_posterior_at_temperature_zero_is_deterministic():
    scheduler = DiscreteDiffusionScheduler(corruption="uniform", sampler="posterior", temperature=0.0)
    scheduler.set_timesteps(4)
    logits = torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(0))
    sample = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(1))
    runs = [scheduler.step(logits, 0.5, sample, unconditional_output=logits * 0.5, guidance_scale=2.0,
                           generator=torch.Generator().manual_seed(seed)).prev_sample for seed in (0, 1)]
    assert torch.equal(*runs)


def test_refused_configurations():
    with pytest.raises(ValueError, match="editing_threshold: the posterior sampler"):
        DiscreteDiffusionScheduler(sampler="posterior", editing_threshold=0.9)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 2\]"):
        DiscreteDiffusionScheduler(corruption="hybrid", gamma=3.0)
    uniform = DiscreteDiffusionScheduler(corruption="uniform", sampler="threshold")
    assert not uniform.adaptive  # uniform noise keeps to the step grid


def test_fill_masks_with_more_steps_than_cells():
    from fastdiff.schedulers.fill import fill_masks

    logits = torch.full((1, 6, VOCAB), -5.0)
    logits[..., 2] = 5.0
    canvas = torch.tensor([[MASK, 1, MASK, MASK, 0, MASK]])
    for sampler in ("mdlm", "posterior", "low-confidence"):
        scheduler = DiscreteDiffusionScheduler(sampler=sampler, mask_token_id=MASK, noise_schedule="linear")
        filled, calls = fill_masks(lambda rows: logits.expand(rows.shape[0], -1, -1), canvas, scheduler, steps=64,
                                   generator=torch.Generator().manual_seed(0))
        assert filled.tolist() == [[2, 1, 2, 2, 0, 2]] and 1 <= int(calls[0]) <= 64, sampler
