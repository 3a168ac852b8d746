"""DeepCache on real diffusers pipelines: exactness, the plan, the ledger, and the authors' release."""

import numpy as np
import pytest
import torch
from conftest import run
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

import fastdiff
from fastdiff import Decision
from fastdiff.caching.deepcache import centered_full_steps


def test_interval_one_is_bit_identical(sd_pipe):
    vanilla = run(sd_pipe)
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=1))
    assert np.array_equal(run(sd_pipe), vanilla)
    assert acc.report().module_calls_avoided == 0


def test_no_method_is_bit_identical(sd_pipe):
    vanilla = run(sd_pipe)
    acc = fastdiff.apply(sd_pipe)
    assert np.array_equal(run(sd_pipe), vanilla)
    assert [s.step for s in acc.report().steps] == list(range(6))


def test_plan_matches_interval_and_branch(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3, branch=0))
    plan = acc.plan_for(10)
    # tiny-sd has two levels; branch 0 keeps conv_in + the last up block's final layer live
    assert plan.modules == [
        "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
        "up_blocks.1.resnets.0", "up_blocks.1.attentions.0",
        "up_blocks.1.resnets.1", "up_blocks.1.attentions.1",
    ]
    assert plan.full_steps() == [0, 3, 6, 9]
    assert all("".join(d.symbol for d in row) == "#..#..#..#" for row in plan.rows.values())
    assert "#..#..#..#" in str(acc.plan_for(10))


def test_deeper_branch_claims_fewer_modules(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2, branch=3))
    # level 1, layer 0: the whole deepest down block, the mid block, and the up block's first two
    # resnets; its last resnet (fed by the level's first skip) and upsampler stay live
    assert acc.plan.modules == ["down_blocks.1", "mid_block", "up_blocks.0.resnets.0", "up_blocks.0.resnets.1"]
    acc.remove()
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2, branch=1))
    assert acc.plan.modules == [
        "down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0",
        "down_blocks.1", "mid_block", "up_blocks.0",
        "up_blocks.1.resnets.0", "up_blocks.1.attentions.0",
    ]


def test_ledger_counts_exactly_the_plan(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3), count_flops=True)
    run(sd_pipe, steps=10)
    report = acc.report()
    plan = acc.plan
    assert plan.num_steps == 10
    assert len(report.steps) == 10
    for stats in report.modules:
        assert (stats.computed, stats.reused, stats.skipped) == (4, 6, 0)
    events = {(e.step, e.module): e.decision for e in acc.ledger.modules}
    assert events == {(s, m): plan.decision(m, s) for m in plan.modules for s in range(10)}
    assert report.flops_saved > 0 and report.flop_ratio > 1.5


def test_flops_run_plus_saved_equal_vanilla_flops(sd_pipe):
    acc = fastdiff.apply(sd_pipe, count_flops=True)
    run(sd_pipe, steps=7)
    vanilla = acc.report()
    acc.remove()
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3, branch=1), count_flops=True)
    run(sd_pipe, steps=7)
    accelerated = acc.report()
    assert accelerated.flops_run < vanilla.flops_run
    assert accelerated.flops_run + accelerated.flops_saved == vanilla.flops_run


def test_output_close_but_not_equal(sd_pipe):
    vanilla = run(sd_pipe, steps=10)
    fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3))
    out = run(sd_pipe, steps=10)
    assert not np.array_equal(out, vanilla)
    assert np.abs(out - vanilla).mean() < 0.05


def test_repeated_calls_are_identical_and_reset(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3))
    first, second = run(sd_pipe), run(sd_pipe)
    assert np.array_equal(first, second)
    assert acc.ledger.calls == [0, 1]
    assert [s.step for s in acc.report().steps] == list(range(6))
    assert not acc.clock.active
    assert all(not hook.kept for hook in acc._reuse_hooks)  # nothing held between calls


def test_batch_size_resolution_and_steps_change(sd_pipe):
    """Each call follows its own shapes and step count, and matches a fresh pipeline's call."""
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2))
    run(sd_pipe, steps=4)
    batch = run(sd_pipe, steps=5, num_images_per_prompt=2)
    assert batch.shape == (2, 32, 32, 3)
    assert [m.reused for m in acc.report().modules][0] == 2
    big = run(sd_pipe, steps=3, size=48)
    assert big.shape == (1, 48, 48, 3)
    assert acc.plan.num_steps == 3
    assert acc.report().modules[0].reused == 1
    acc.remove()
    fresh = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2))
    assert np.array_equal(big, run(sd_pipe, steps=3, size=48))
    fresh.remove()


def test_shape_change_inside_a_call_never_reuses_wrong_tensor(sd_pipe):
    """A reuse whose inputs changed shape must compute instead."""
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=4))
    unet = sd_pipe.unet
    with acc.pipeline_call():
        acc.denoiser_started((None, torch.tensor(10)), {})
        x = torch.randn(2, 4, 8, 8)
        e = torch.randn(2, 77, unet.config.cross_attention_dim)
        a = unet(x, 10, encoder_hidden_states=e).sample
        acc.clock.advance()
        b = unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=e[:1]).sample
        assert b.shape == (1, 4, 8, 8)
        assert a.shape == (2, 4, 8, 8)
    decisions = [e.decision for e in acc.ledger.modules if e.step == 1]
    assert decisions and all(d is Decision.COMPUTE for d in decisions)


def test_remove_restores_bit_identical_and_clean(sd_pipe):
    cls = type(sd_pipe)
    vanilla = run(sd_pipe)
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3))
    assert sd_pipe.acceleration is acc
    assert type(sd_pipe).__name__ == cls.__name__ and isinstance(sd_pipe, cls)
    run(sd_pipe)
    acc.remove()
    assert type(sd_pipe) is cls
    assert "acceleration" not in sd_pipe.__dict__
    for module in sd_pipe.unet.modules():
        assert "_diffusers_hook" not in module.__dict__
        assert "forward" not in module.__dict__
    assert "step" not in sd_pipe.scheduler.__dict__
    assert np.array_equal(run(sd_pipe), vanilla)


def test_denoiser_called_outside_a_pipeline_computes(sd_pipe):
    fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3))
    unet = sd_pipe.unet
    x = torch.randn(1, 4, 8, 8)
    e = torch.randn(1, 77, unet.config.cross_attention_dim)
    first = unet(x, 5, encoder_hidden_states=e).sample
    again = unet(x, 5, encoder_hidden_states=e).sample
    assert torch.equal(first, again)


def test_nonuniform_schedule(sd_pipe):
    steps = centered_full_steps(50, 10, 15, 1.4)
    assert len(steps) == 10 and steps[0] == 0 and steps == sorted(set(steps))
    gaps = np.diff(steps)
    near = [g for s, g in zip(steps, gaps) if abs(s - 15) < 8]
    assert min(near) < max(gaps)  # denser around the center than at the ends
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=5, mode="nonuniform", center=15))
    assert acc.plan_for(50).full_steps() == steps


@pytest.mark.parametrize("interval, branch", [(3, 0), (2, 1), (4, 2), (3, 3), (2, 4), (5, 5)])
def test_equals_authors_release(sd_pipe, interval, branch):
    deepcache = pytest.importorskip("DeepCache")
    helper = deepcache.DeepCacheSDHelper(pipe=sd_pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        reference = run(sd_pipe, steps=10)
    finally:
        helper.disable()
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=interval, branch=branch))
    ours = run(sd_pipe, steps=10)
    acc.remove()
    assert np.array_equal(ours, reference)
    assert not np.array_equal(ours, run(sd_pipe, steps=10))


def test_sdxl(sdxl_pipe):
    vanilla = run(sdxl_pipe, steps=4)
    acc = fastdiff.apply(sdxl_pipe, fastdiff.DeepCache(interval=1))
    assert np.array_equal(run(sdxl_pipe, steps=4), vanilla)
    acc.remove()
    acc = fastdiff.apply(sdxl_pipe, fastdiff.DeepCache(interval=2))
    out = run(sdxl_pipe, steps=4)
    assert out.shape == vanilla.shape and not np.array_equal(out, vanilla)
    assert sum(m.reused for m in acc.report().modules) == 2 * len(acc.plan.modules)


def _image(size=32):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_img2img_starts_mid_schedule(sd_pipe):
    pipe = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=_image(), strength=0.5, num_inference_steps=10, output_type="np")
    vanilla = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    acc = fastdiff.apply(pipe, fastdiff.DeepCache(interval=1))
    assert np.array_equal(pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images, vanilla)
    acc.remove()
    acc = fastdiff.apply(pipe, fastdiff.DeepCache(interval=2))
    pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs)
    report = acc.report()
    assert len(report.steps) == 5  # strength 0.5 of 10 steps
    assert report.modules[0].computed == 3 and report.modules[0].reused == 2


def test_inpaint(sd_pipe):
    pipe = StableDiffusionInpaintPipeline(**sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    acc = fastdiff.apply(pipe, fastdiff.DeepCache(interval=2))
    out = pipe("a cat", image=_image(), mask_image=mask, num_inference_steps=4, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3)
    assert acc.report().modules[0].reused == 2


def test_cache_memory_is_reported(sd_pipe):
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=3))
    run(sd_pipe, steps=4)
    held = acc.report().peak_cache_bytes
    assert held > 0 and "MiB" in acc.report().summary()
    run(sd_pipe, steps=4, num_images_per_prompt=2)
    assert acc.report().peak_cache_bytes == 2 * held  # caches scale with the batch
    acc.remove()
    acc = fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=1))
    run(sd_pipe, steps=4)
    assert acc.report().peak_cache_bytes == 0  # nothing reused, nothing kept


def test_transformer_denoisers_cache_the_middle_blocks(dit_pipe, pixart_pipe):
    blocks = len(dit_pipe.transformer.transformer_blocks)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    vanilla = dit_pipe(class_labels=[1], num_inference_steps=6, generator=generator(), output_type="np").images
    acc = fastdiff.apply(dit_pipe, fastdiff.DeepCache(interval=1))
    assert np.array_equal(dit_pipe(class_labels=[1], num_inference_steps=6, generator=generator(),
                                   output_type="np").images, vanilla)
    acc.remove()
    acc = fastdiff.apply(dit_pipe, fastdiff.DeepCache(interval=3, branch=0), count_flops=True)
    cached = dit_pipe(class_labels=[1], num_inference_steps=6, generator=generator(), output_type="np").images
    assert acc.plan.modules == [f"transformer_blocks.{i}" for i in range(blocks)]
    assert acc.report().module_calls_avoided == blocks * 4  # steps 1, 2, 4, 5 reuse
    assert acc.report().flops_saved > 0 and not np.array_equal(cached, vanilla) and np.isfinite(cached).all()
    acc.remove()
    with pytest.raises(ValueError, match=r"keeps \d+ of the \d+ transformer blocks live"):
        fastdiff.apply(dit_pipe, fastdiff.DeepCache(branch=(blocks + 1) // 2))
    acc = fastdiff.apply(pixart_pipe, fastdiff.DeepCache(interval=2), fastdiff.TGate(gate_step=3))
    assert np.isfinite(run(pixart_pipe, steps=5)).all()
    assert {m.method for m in acc.report().modules} == {"deepcache", "tgate"}


def test_flux_middle_blocks_reuse_what_they_add_to_both_streams():
    """On Flux the cached blocks span both stages; each returns (text, image), and at a reused step
    each stream is its fresh input plus what the block added to it at the last full step."""
    from fastdiff.models import build_builtin, builtin_info

    pipe = build_builtin("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    acc = fastdiff.apply(pipe, fastdiff.DeepCache(interval=2, branch=1))
    cached = ["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert acc.plan.modules == cached
    modules = dict(pipe.transformer.named_modules())
    seen = {path: [] for path in cached}
    handles = [modules[path].register_forward_hook(
        lambda m, args, kwargs, out, path=path: seen[path].append(
            (kwargs["encoder_hidden_states"], kwargs["hidden_states"], out)), with_kwargs=True) for path in cached]
    options = {**builtin_info("tiny-flux").call_kwargs(), "num_inference_steps": 4}
    try:
        pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), output_type="np", **options)
    finally:
        for handle in handles:
            handle.remove()
    for path in cached:
        (text0, image0, (text_out0, image_out0)), (text1, image1, (text_out1, image_out1)) = seen[path][:2]
        assert not torch.equal(text1, text0) and not torch.equal(image1, image0)  # the live block 0 moved both
        assert torch.equal(text_out1, text1 + (text_out0 - text0))  # the text residual of step 0, reused
        assert torch.equal(image_out1, image1 + (image_out0 - image0))
        assert (text_out0 - text0).abs().max() > 0
    events = {(e.module, e.step): e.decision for e in acc.ledger.modules}
    assert all(events[(path, step)] is (Decision.REUSE if step % 2 else Decision.COMPUTE)
               for path in cached for step in range(4))
    acc.remove()
