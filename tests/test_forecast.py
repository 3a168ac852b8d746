"""Forecasting reuse: exact on polynomials in time, bit-identical when holding, refused where it cannot apply."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.caching import DeepCache
from fastdiff.caching.block_cache import BlockCache
from fastdiff.caching.encoder_propagation import EncoderPropagation
from fastdiff.caching.tgate import TGate
from fastdiff.core.forecast import combine, extrapolation_weights, forecast
from fastdiff.core.method import parse_method
from fastdiff.core.plan import Decision
from fastdiff.models import build_builtin

from conftest import run


def test_evenly_spaced_weights_are_adams_bashforth() -> None:
    assert extrapolation_weights([2.0, 1.0], 3.0) == pytest.approx([2.0, -1.0])
    assert extrapolation_weights([3.0, 2.0, 1.0], 4.0) == pytest.approx([3.0, -3.0, 1.0])


@pytest.mark.parametrize("points", [2, 3, 4])
def test_uneven_times_are_exact_for_polynomials_below_the_order(points: int) -> None:
    rng = random.Random(points)
    for _ in range(20):
        times = sorted((rng.uniform(0.05, 1.0) for _ in range(points)), reverse=True)
        at = times[-1] - rng.uniform(0.01, 0.2)
        coefficients = [rng.uniform(-2, 2) for _ in range(points)]  # degree points - 1

        def poly(t: float, c: list[float] = coefficients) -> float:
            return sum(a * t ** i for i, a in enumerate(c))

        weights = extrapolation_weights(times, at)
        assert sum(w * poly(t) for w, t in zip(weights, times)) == pytest.approx(poly(at), rel=1e-9, abs=1e-9)


def test_forecast_uses_distinct_times_and_holds_with_one_point() -> None:
    a, b = torch.tensor([1.0]), torch.tensor([3.0])
    assert forecast([(0.5, a)], 0.4, 3) is a
    assert forecast([(0.5, a), (0.5, b)], 0.4, 2) is a  # a repeated time (Heun's second call) adds nothing
    assert torch.allclose(forecast([(0.5, a), (0.6, b)], 0.4, 2), torch.tensor([-1.0]))


def test_combine_keeps_structure_flags_and_half_precision() -> None:
    @dataclass
    class Out:
        sample: torch.Tensor
        flag: bool

    values = [(Out(torch.full((2,), 2.0, dtype=torch.float16), True), torch.tensor([4]), None),
              (Out(torch.full((2,), 1.0, dtype=torch.float16), False), torch.tensor([7]), None)]
    out = combine(values, [2.0, -1.0])
    assert out[0].sample.dtype == torch.float16 and torch.equal(out[0].sample, torch.full((2,), 3.0, dtype=torch.float16))
    assert out[0].flag is True and torch.equal(out[1], torch.tensor([4])) and out[2] is None


def _with_polynomial_blocks(pipe, degree: int) -> None:
    """Every transformer block of tiny-sd3 adds to both streams a fixed direction times a
    polynomial of degree ``degree`` in the current timestep: what a forecast of that order
    must reproduce exactly, and holding cannot."""
    now: dict[str, float] = {}
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: now.__setitem__("t", float(kwargs["timestep"].reshape(-1)[0]) / 1000),
        with_kwargs=True)
    generator = torch.Generator().manual_seed(0)
    for block in pipe.transformer.transformer_blocks:
        original = block.forward

        def poly(t: float) -> float:
            return sum((0.8 - 0.3 * i) * t ** i for i in range(degree + 1))

        text_direction = torch.randn(1, 1, block.norm1.linear.in_features, generator=generator)
        image_direction = torch.randn(1, 1, block.norm1.linear.in_features, generator=generator)

        def forward(hidden_states, encoder_hidden_states, temb, *args, _original=original, _text=text_direction,
                    _image=image_direction, **kwargs):
            text, image = _original(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
            scale = poly(now["t"])
            # the block's own result stays in, but not as a function of the step: the
            # forecast is exact only for what is polynomial in time
            text = None if text is None else encoder_hidden_states + scale * _text
            return text, hidden_states + scale * _image

        block.forward = forward


class _FullSteps(DeepCache):
    """DeepCache with full passes at given steps (not registered as a spec name)."""

    spec_name = ""
    steps: tuple[int, ...] = ()

    def full_steps(self, num_steps: int) -> list[int]:
        return list(self.steps)


def _sd3():
    pipe = build_builtin("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("degree,forecast_name,full", [(1, "ab2", (0, 1, 3, 5)), (2, "ab3", (0, 1, 2, 4, 6))])
def test_forecast_is_exact_on_blocks_polynomial_in_time_on_uneven_flow_matching_steps(degree, forecast_name, full):
    pipe = _sd3()
    _with_polynomial_blocks(pipe, degree)
    sigmas = pipe.scheduler.set_timesteps(7) or pipe.scheduler.sigmas[:-1]
    gaps = [float(a - b) for a, b in zip(sigmas[:-1], sigmas[1:])]
    assert max(gaps) - min(gaps) > 0.02  # shift 3: the spacing is uneven
    vanilla = run(pipe, steps=7)
    results = {}
    for name in ("hold", forecast_name):
        method = _FullSteps(branch=1, forecast=name)
        method.steps = full  # every reuse comes after as many full passes as the forecast has points
        acc = fastdiff.apply(pipe, method)
        results[name] = run(pipe, steps=7)
        reused = [e for e in acc.ledger.modules if e.decision is Decision.REUSE]
        acc.remove()
        assert reused
    assert np.abs(results["hold"] - vanilla).max() > 1e-3
    assert np.abs(results[forecast_name] - vanilla).max() < 1e-4


def test_hold_is_bit_identical_to_the_default(sd_pipe, pixart_pipe):
    for pipe, method in ((sd_pipe, DeepCache(interval=3)), (sd_pipe, EncoderPropagation(interval=3)),
                         (sd_pipe, TGate(gate_step=3)), (pixart_pipe, DeepCache(interval=2))):
        fastdiff.apply(pipe, method)
        default = run(pipe)
        pipe.acceleration.remove()
        fastdiff.apply(pipe, dataclasses.replace(method, forecast="hold"))
        assert np.array_equal(run(pipe), default)
        pipe.acceleration.remove()


def test_forecast_with_nothing_reused_is_vanilla(sd_pipe):
    vanilla = run(sd_pipe)
    for method in (DeepCache(interval=1, forecast="ab3"), EncoderPropagation(interval=1, forecast="ab2")):
        fastdiff.apply(sd_pipe, method)
        assert np.array_equal(run(sd_pipe), vanilla)
        sd_pipe.acceleration.remove()


def test_forecast_changes_reused_steps_and_keeps_the_plan(sd_pipe):
    outputs = {}
    for name in ("hold", "ab2"):
        acc = fastdiff.apply(sd_pipe, DeepCache(interval=3, forecast=name))
        outputs[name] = run(sd_pipe, steps=9)
        plan = acc.plan_for(9)
        for module, row in plan.rows.items():
            assert [e.decision for e in acc.ledger.modules if e.module == module] == list(row)
        outputs[name + " bytes"] = acc.report().peak_cache_bytes
        acc.remove()
    assert not np.array_equal(outputs["hold"], outputs["ab2"])
    assert outputs["ab2 bytes"] == 2 * outputs["hold bytes"] > 0  # two kept outputs per reused module
    assert np.isfinite(outputs["ab2"]).all()


def test_batched_decoders_forecast_each_stacked_step(sd_pipe):
    acc = fastdiff.apply(sd_pipe, EncoderPropagation(key_steps=[0, 1, 5], forecast="ab2"))
    stepwise = run(sd_pipe, steps=8)
    acc.remove()
    fastdiff.apply(sd_pipe, EncoderPropagation(key_steps=[0, 1, 5], forecast="ab2", batch_decoders=True))
    batched = run(sd_pipe, steps=8)
    sd_pipe.acceleration.remove()
    fastdiff.apply(sd_pipe, EncoderPropagation(key_steps=[0, 1, 5]))
    held = run(sd_pipe, steps=8)
    sd_pipe.acceleration.remove()
    assert np.abs(batched - stepwise).max() < 1e-5
    assert np.abs(held - stepwise).max() > 1e-4


def test_block_cache_forecasts_on_its_schedule(dit_pipe):
    calibrated = BlockCache(budget=0.6, forecast="ab2").prepare(dit_pipe, steps=6, prompts=["1", "2"])
    assert calibrated.forecast == "ab2"
    outputs = {}
    for method in (calibrated, dataclasses.replace(calibrated, forecast="hold")):
        acc = fastdiff.apply(dit_pipe, method)
        outputs[method.forecast] = dit_pipe(class_labels=[1], num_inference_steps=6,
                                            generator=torch.Generator().manual_seed(0), output_type="np").images
        plan = acc.plan_for(6)
        for module, row in plan.rows.items():
            assert [e.decision for e in acc.ledger.modules if e.module == module] == list(row)
        acc.remove()
    assert np.isfinite(outputs["ab2"]).all() and not np.array_equal(outputs["ab2"], outputs["hold"])


def test_bad_forecasts_are_refused_with_what_is_allowed(sd_pipe):
    with pytest.raises(ValueError, match=r"DeepCache: forecast must be one of \['hold', 'ab2', 'ab3'\], got 'ab4'"):
        DeepCache(forecast="ab4")
    with pytest.raises(ValueError, match=r"earlyexit does not reuse outputs.*\['deepcache', 'blockcache', 'encoder', 'tgate'\]"):
        parse_method("earlyexit:forecast=ab2")
    with pytest.raises(ValueError, match=r"patch does not reuse outputs"):
        parse_method("patch:forecast=ab2")
    before = dict(sd_pipe.unet.named_modules())
    # key steps 0 and 1 only: never 3 computed outputs before a reuse, at any step count
    with pytest.raises(ValueError, match=r"EncoderPropagation: forecast='ab3' extrapolates from 3 computed outputs, "
                                         r"but in a \d+-step call the plan computes at most 2 before a reuse; "
                                         r"allowed here: \['hold', 'ab2'\]"):
        fastdiff.apply(sd_pipe, EncoderPropagation(key_steps=[0, 1], forecast="ab3"))
    assert "acceleration" not in sd_pipe.__dict__ and dict(sd_pipe.unet.named_modules()) == before
    assert not hasattr(sd_pipe.unet, "_diffusers_hook")
    # full passes at 0 and 2 of a 4-step call: refused when the call's plan is made, before the denoiser runs
    fastdiff.apply(sd_pipe, DeepCache(interval=2, forecast="ab3"))
    with pytest.raises(ValueError, match=r"in a 4-step call the plan computes at most 2 before a reuse"):
        run(sd_pipe, steps=4)
    assert sd_pipe.acceleration.ledger.modules == []
    assert np.isfinite(run(sd_pipe, steps=6)).all()  # still usable at a step count that fits


def test_tgate_forecasts_self_attention_and_holds_the_gate_mean(sd_pipe):
    outputs, rules = {}, {}
    for name in ("hold", "ab2"):
        acc = fastdiff.apply(sd_pipe, TGate(gate_step=6, sp_interval=3, warm_up=1, forecast=name))
        outputs[name] = run(sd_pipe, steps=9)
        plan = acc.plan_for(9)
        for module, row in plan.rows.items():
            assert [e.decision for e in acc.ledger.modules if e.module == module] == list(row)
        rules[name] = {hook.path: hook.order for hook in acc._reuse_hooks}
        acc.remove()
    assert not np.array_equal(outputs["hold"], outputs["ab2"]) and np.isfinite(outputs["ab2"]).all()
    # self-attention forecasts (2 points); the cross-attention kept at the gate is held
    assert {path: order for path, order in rules["ab2"].items() if path.endswith("attn1")} and all(
        order == 2 for path, order in rules["ab2"].items() if path.endswith("attn1"))
    assert all(order == 1 for path, order in rules["ab2"].items() if path.endswith("attn2"))
