"""apply(): validation before any change, atomic install, clock behaviour across schedulers."""

import numpy as np
import pytest
import torch
from conftest import run
from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

import fastdiff
from fastdiff.core import hooks as hooks_module


def _untouched(pipe, cls):
    assert type(pipe) is cls
    assert "acceleration" not in pipe.__dict__
    for module in pipe.unet.modules():
        assert "_diffusers_hook" not in module.__dict__
        assert "forward" not in module.__dict__


def test_not_a_pipeline():
    with pytest.raises(TypeError, match="pipe: expected a diffusers DiffusionPipeline"):
        fastdiff.apply(torch.nn.Linear(2, 2), fastdiff.DeepCache())


def test_not_a_method(sd_pipe):
    with pytest.raises(TypeError, match=r"methods\[0\]: expected a fastdiff method"):
        fastdiff.apply(sd_pipe, "deepcache")
    _untouched(sd_pipe, type(sd_pipe))


@pytest.mark.parametrize("kwargs, message", [
    ({"interval": 0}, "interval must be an integer >= 1"),
    ({"branch": -1}, "branch must be an integer >= 0"),
    ({"mode": "fast"}, "mode must be one of"),
    ({"power": 1.0}, "power must be > 1"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastdiff.DeepCache(**kwargs)


def test_branch_deeper_than_unet(sd_pipe):
    cls = type(sd_pipe)
    with pytest.raises(ValueError, match=r"branch=6 is deeper than this UNet has \(2 levels: allowed 0..5\)"):
        fastdiff.apply(sd_pipe, fastdiff.DeepCache(branch=6))
    _untouched(sd_pipe, cls)


def test_unsupported_denoiser(pixart_pipe):
    with pytest.raises(TypeError, match="EncoderPropagation needs a UNet.*PixArtTransformer2DModel"):
        fastdiff.apply(pixart_pipe, fastdiff.EncoderPropagation())
    assert "acceleration" not in pixart_pipe.__dict__


def test_conflicting_methods_leave_pipeline_untouched(sd_pipe):
    cls = type(sd_pipe)
    with pytest.raises(ValueError, match=r"methods 'deepcache' and 'deepcache' both claim module 'mid_block'"):
        fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2), fastdiff.DeepCache(interval=3, branch=4))
    _untouched(sd_pipe, cls)


def test_already_accelerated(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache())
    with pytest.raises(ValueError, match="already accelerated"):
        fastdiff.apply(sd_pipe, fastdiff.DeepCache())
    acc.remove()
    fastdiff.apply(sd_pipe, fastdiff.DeepCache()).remove()


def test_failure_midway_rolls_back(sd_pipe, monkeypatch):
    cls = type(sd_pipe)
    vanilla = run(sd_pipe)
    created = []
    original = hooks_module.ReuseHook.__init__

    def flaky(self, *args, **kwargs):
        if len(created) == 3:
            raise RuntimeError("boom")
        created.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(hooks_module.ReuseHook, "__init__", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3))
    _untouched(sd_pipe, cls)
    assert np.array_equal(run(sd_pipe), vanilla)


def test_existing_diffusers_hooks_survive(sd_pipe):
    """A user's own diffusers hook on the UNet stays in place through apply/remove."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Counter(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counter.calls += 1
            return args, kwargs

    HookRegistry.check_if_exists_or_initialize(sd_pipe.unet).register_hook(Counter(), "user")
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2))
    run(sd_pipe, steps=4)
    acc.remove()
    run(sd_pipe, steps=4)
    assert Counter.calls == 8
    assert sd_pipe.unet._diffusers_hook.get_hook("user") is not None


@pytest.mark.parametrize("scheduler_cls, expected_steps", [
    (DPMSolverMultistepScheduler, 6),
    (HeunDiscreteScheduler, 11),  # second order: 2N-1 loop iterations, timesteps repeat
])
def test_clock_follows_loop_iterations(sd_pipe, scheduler_cls, expected_steps):
    sd_pipe.scheduler = scheduler_cls.from_config(sd_pipe.scheduler.config)
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2))
    run(sd_pipe, steps=6)
    report = acc.report()
    assert [s.step for s in report.steps] == list(range(expected_steps))
    assert acc.plan.num_steps == expected_steps
    assert report.modules[0].computed == (expected_steps + 1) // 2


def test_unbatched_guidance_calls_share_a_step(sd_pipe):
    """Two denoiser calls in one iteration (as pipelines without batched CFG make) are one step."""
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2))
    unet = sd_pipe.unet
    original = unet.forward

    with acc.pipeline_call():
        x = torch.randn(1, 4, 8, 8)
        e = torch.randn(1, 77, unet.config.cross_attention_dim)
        for _ in range(3):
            original(x, 10, encoder_hidden_states=e)
            original(x, 10, encoder_hidden_states=e)
            acc.clock.advance()
    steps = acc.report().steps
    assert [(s.step, s.denoiser_calls) for s in steps] == [(0, 2), (1, 2), (2, 2)]


def test_timesteps_recorded(sd_pipe):
    acc = fastdiff.apply(sd_pipe)
    run(sd_pipe, steps=4)
    assert [s.timestep for s in acc.report().steps] == [float(t) for t in sd_pipe.scheduler.timesteps]


def test_report_text_and_summary(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3), count_flops=True)
    run(sd_pipe, steps=6)
    run(sd_pipe, steps=6)
    text = str(acc.report())
    assert "FLOPs saved" in text and "down_blocks.0" in text
    assert "ideal speedup" in acc.report().summary()
    assert acc.report(call=None).calls == 2
    assert sum(m.reused for m in acc.report(call=None).modules) == 2 * sum(m.reused for m in acc.report().modules)


def test_ledger_keeps_a_bounded_history(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2))
    acc.ledger.max_calls = 2
    for _ in range(4):
        run(sd_pipe, steps=2)
    assert acc.ledger.calls == [2, 3]
    assert {e.call for e in acc.ledger.modules} == {2, 3}


def test_hooks_added_after_apply_survive_remove(sd_pipe):
    from diffusers.hooks import HookRegistry, ModelHook

    seen = []

    class Spy(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(1)
            return args, kwargs

    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2))
    HookRegistry.check_if_exists_or_initialize(sd_pipe.unet.mid_block).register_hook(Spy(), "spy")
    acc.remove()
    run(sd_pipe, steps=3)
    assert len(seen) == 3


def test_failed_call_resets_the_clock(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2))

    def stop_midway(pipe, step, timestep, kwargs):
        if step == 1:
            raise RuntimeError("interrupted")
        return kwargs

    with pytest.raises(RuntimeError, match="interrupted"):
        run(sd_pipe, steps=3, callback_on_step_end=stop_midway)
    assert acc.ledger.steps[-1].step == 1
    assert not acc.clock.active and "step" not in sd_pipe.scheduler.__dict__
    run(sd_pipe, steps=4)
    assert acc.report().modules[0].reused == 2


def test_attached_follows_apply_and_remove(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache())
    assert acc.attached
    acc.remove()
    assert not acc.attached
