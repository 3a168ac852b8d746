"""Encoder propagation: key steps, exactness, batched decoders, noise injection, pipelines, bad input."""

import numpy as np
import pytest
import torch
from conftest import run
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
)
from PIL import Image

import fastdiff
from fastdiff import Decision, EncoderPropagation
from fastdiff.caching.encoder_propagation import PAPER_KEY_STEPS, scale_key_steps
from fastdiff.core.method import parse_method


def symbols(row):
    return "".join(d.symbol for d in row)


def decoder_batches(pipe):
    """Batch sizes the first up block sees: one entry per decoder evaluation (the vanilla shadow pass
    that measures FLOPs when counting is not one)."""
    seen: list[int] = []

    def record(module, args, kwargs):
        accelerator = pipe.__dict__.get("acceleration")
        if accelerator is None or accelerator.measuring is None:
            seen.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    handle = pipe.unet.up_blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    return seen, handle


def test_key_step_presets():
    assert EncoderPropagation().key_steps_for(50) == list(PAPER_KEY_STEPS)
    assert EncoderPropagation().key_steps_for(20) == [0, 1, 2, 4, 6, 10, 14]
    assert scale_key_steps([0, 25, 49], 50, 10) == [0, 5, 9]
    assert EncoderPropagation(interval=4).key_steps_for(10) == [0, 4, 8]
    assert EncoderPropagation(key_steps=[0, 3, 7]).key_steps_for(10) == [0, 3, 7]
    method = parse_method("encoder:key_steps=0/2/5,batch_decoders=true")
    assert method.key_steps == (0, 2, 5) and method.batch_decoders
    assert method.spec() == "encoder:key_steps=0/2/5,batch_decoders=True"


def test_every_step_a_key_step_is_bit_identical(sd_pipe):
    vanilla = run(sd_pipe)
    for method in (EncoderPropagation(interval=1), EncoderPropagation(key_steps=range(6), batch_decoders=True)):
        acc = fastdiff.apply(sd_pipe, method)
        assert np.array_equal(run(sd_pipe), vanilla)
        assert acc.report().module_calls_avoided == 0
        acc.remove()


def test_plan_claims_the_encoder_and_ledger_follows_it(sd_pipe):
    acc = fastdiff.apply(sd_pipe, EncoderPropagation(key_steps=[0, 1, 4]), count_flops=True)
    plan = acc.plan_for(6)
    assert plan.modules == ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block"]
    assert all(symbols(row) == "##..#." for row in plan.rows.values())
    seen, handle = decoder_batches(sd_pipe)
    out = run(sd_pipe)
    handle.remove()
    assert seen == [2] * 6  # the decoder runs every step (batch 2: guidance)
    for module, row in plan.rows.items():
        assert [e.decision for e in acc.ledger.modules if e.module == module] == list(row)
    assert acc.report().flops_saved > 0
    assert np.isfinite(out).all()


def test_batched_decoders_equal_step_by_step(sd_pipe):
    method = EncoderPropagation(key_steps=[0, 1, 5])
    acc = fastdiff.apply(sd_pipe, method)
    seen, handle = decoder_batches(sd_pipe)
    stepwise = run(sd_pipe, steps=8)
    acc.remove()
    assert seen == [2] * 8
    seen.clear()
    acc = fastdiff.apply(sd_pipe, EncoderPropagation(key_steps=[0, 1, 5], batch_decoders=True))
    batched = run(sd_pipe, steps=8)
    acc.remove()
    # steps 0, 1, 5 alone; 2-4 in one call; 6-7 in one call
    assert seen == [2, 2, 6, 2, 4]
    assert np.abs(batched - stepwise).max() < 1e-5
    seen.clear()
    fastdiff.apply(sd_pipe, EncoderPropagation(key_steps=[0, 1, 5], batch_decoders=True, max_batch_steps=2))
    capped = run(sd_pipe, steps=8)
    handle.remove()
    assert seen == [2, 2, 4, 2, 2, 4]
    assert np.abs(capped - stepwise).max() < 1e-5


def test_batched_decoders_on_sdxl_added_conditioning(sdxl_pipe):
    acc = fastdiff.apply(sdxl_pipe, EncoderPropagation(key_steps=[0, 3]))
    stepwise = run(sdxl_pipe)
    acc.remove()
    fastdiff.apply(sdxl_pipe, EncoderPropagation(key_steps=[0, 3], batch_decoders=True))
    assert np.abs(run(sdxl_pipe) - stepwise).max() < 1e-5


def test_noise_injection_adds_initial_noise_in_late_steps(sd_pipe):
    acc = fastdiff.apply(sd_pipe, EncoderPropagation(interval=2))
    plain = run(sd_pipe, steps=10)
    acc.remove()
    acc = fastdiff.apply(sd_pipe, EncoderPropagation(interval=2, noise_injection=True, injection_below=0.0))
    assert np.array_equal(run(sd_pipe, steps=10), plain)  # no timestep is below 0
    acc.remove()
    acc = fastdiff.apply(sd_pipe, EncoderPropagation(interval=2, noise_injection=True))
    injected = run(sd_pipe, steps=10)
    assert not np.array_equal(injected, plain)

    # the same by hand: latents after every step whose next timestep is < 500 get 0.003 z_T
    acc.remove()
    fastdiff.apply(sd_pipe, EncoderPropagation(interval=2))
    scheduler = sd_pipe.scheduler
    initial = {}

    def inject(pipe, i, t, callback_kwargs):
        latents = callback_kwargs["latents"]
        if i == 0:
            initial["z"] = first_latents["z"]
        timesteps = scheduler.timesteps
        if i + 1 < len(timesteps) and timesteps[i + 1] < 500:
            latents = latents + 0.003 * initial["z"]
        return {"latents": latents}

    first_latents = {}
    generator = torch.Generator("cpu").manual_seed(0)
    shape = (1, sd_pipe.unet.config.in_channels, 32 // sd_pipe.vae_scale_factor, 32 // sd_pipe.vae_scale_factor)
    first_latents["z"] = torch.randn(shape, generator=generator)
    by_hand = sd_pipe("a red circle", num_inference_steps=10, height=32, width=32, latents=first_latents["z"].clone(),
                      output_type="np", callback_on_step_end=inject).images
    assert np.abs(by_hand - injected).max() < 1e-6


def test_img2img_and_controlnet_keep_working(sd_pipe):
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    acc = fastdiff.apply(img2img, EncoderPropagation(interval=2, batch_decoders=True))
    out = img2img("a cat", image=image, strength=0.5, num_inference_steps=10,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(out).all()
    assert len(acc.report().steps) == 5  # strength 0.5: the second half of 10 steps
    with pytest.raises(ValueError, match="already accelerated through another pipeline"):
        fastdiff.apply(sd_pipe, EncoderPropagation())  # shares the UNet
    acc.remove()

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd_pipe.unet, conditioning_embedding_out_channels=(4, 4, 8, 8))
    pipe = StableDiffusionControlNetPipeline(**sd_pipe.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    outputs = []
    for batch in (False, True):
        acc = fastdiff.apply(pipe, EncoderPropagation(interval=3, batch_decoders=batch))
        outputs.append(pipe("a cat", image=image, num_inference_steps=6, height=32, width=32,
                            generator=torch.Generator().manual_seed(0), output_type="np").images)
        assert acc.report().module_calls_avoided == 4 * 4  # 4 encoder modules reused at 4 of 6 steps
        acc.remove()
    # per-step ControlNet residuals cannot be known ahead: batching falls back to step by step
    assert np.array_equal(outputs[0], outputs[1])


def test_bad_input(sd_pipe, dit_pipe):
    with pytest.raises(ValueError, match="must include step 0"):
        EncoderPropagation(key_steps=[1, 2])
    with pytest.raises(ValueError, match="must be >= 0"):
        EncoderPropagation(key_steps=[0, -1])
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        EncoderPropagation(interval=0)
    with pytest.raises(ValueError, match="max_batch_steps must be an integer >= 1"):
        EncoderPropagation(max_batch_steps=0)
    with pytest.raises(ValueError, match="injection_strength must be >= 0"):
        EncoderPropagation(injection_strength=-0.1)
    with pytest.raises(ValueError, match=r"injection_below must be in \[0, 1\]"):
        EncoderPropagation(injection_below=1.5)
    with pytest.raises(ValueError, match="key_steps or interval, not both"):
        EncoderPropagation(key_steps=[0, 2], interval=2)
    with pytest.raises(ValueError, match="key_steps must be 'paper' or step indices"):
        parse_method("encoder:key_steps=often")
    with pytest.raises(ValueError, match=r"key_steps \[7\] are outside \[0, 6\)"):
        fastdiff.apply(sd_pipe, EncoderPropagation(key_steps=[0, 7])).plan_for(6)
    with pytest.raises(TypeError, match="needs a UNet .* DiTTransformer2DModel"):
        fastdiff.apply(dit_pipe, EncoderPropagation())
    assert not hasattr(dit_pipe, "acceleration")


def test_conflicts_with_deepcache_are_refused(sd_pipe):
    with pytest.raises(ValueError, match="'deepcache' and 'encoder' both claim module 'down_blocks.0' of the unet"):
        fastdiff.apply(sd_pipe, fastdiff.DeepCache(interval=2), EncoderPropagation())
    assert not hasattr(sd_pipe, "acceleration")
    assert Decision.REUSE  # the enum is importable from the package root
