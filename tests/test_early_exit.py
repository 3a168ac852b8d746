"""Early exiting: time-dependent plans, exact FLOP accounting, consistent UNet exits, composition,
calibration, fine-tuning and bad input."""

import numpy as np
import pytest
import torch
from conftest import run
from diffusers import StableDiffusionImg2ImgPipeline

import fastdiff
from fastdiff import Decision, EarlyExit, TGate
from fastdiff.caching.early_exit import DEMO_BLOCKS, bucket_of, finetune
from fastdiff.caching.exit_ladder import exit_ladder, exiting


def dit_call(pipe, steps=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(class_labels=[1], num_inference_steps=steps, generator=generator, output_type="np").images


def expected_skips(scheduler, steps, depths, depth):
    """Per step, whether the last block is dropped, from the scheduler's own timesteps."""
    scheduler.set_timesteps(steps)
    total = scheduler.config.num_train_timesteps
    return [depths[min(int(float(t) / total * len(depths)), len(depths) - 1)] < depth for t in scheduler.timesteps]


def test_demo_schedule_follows_the_timesteps(dit_pipe):
    method = EarlyExit()  # the authors' demo: fractions of 28 blocks per timestep decile
    assert method.depths(dit_pipe.transformer) == [2] * 8 + [1, 1]  # ceil(2 * k / 28) for k in DEMO_BLOCKS
    assert [bucket_of(t / 1000, 10) for t in (0, 99, 100, 899, 900, 999, 1000)] == [0, 0, 1, 8, 9, 9, 9]
    acc = fastdiff.apply(dit_pipe, method, count_flops=True)
    for steps in (8, 20):
        dit_call(dit_pipe, steps)
        want = expected_skips(type(dit_pipe.scheduler).from_config(dit_pipe.scheduler.config), steps, [2] * 8 + [1, 1], 2)
        row = acc.plan.rows["transformer_blocks.1"]
        assert [d is Decision.SKIP for d in row] == want and any(want) and not all(want)
        assert acc.plan_for(steps).rows == acc.plan.rows  # planned ahead = what the call used
        skipped = [e.step for e in acc.ledger.modules if e.call == acc.clock.call_index and e.decision is Decision.SKIP]
        assert skipped == [s for s, w in enumerate(want) if w]
    acc.remove()


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_ledger_shows_the_planned_flop_reduction_exactly(name, dit_pipe, pixart_pipe):
    pipe = dit_pipe if name == "dit" else pixart_pipe
    call = (lambda: dit_call(pipe, 10)) if name == "dit" else (lambda: run(pipe, steps=10))
    vanilla_acc = fastdiff.apply(pipe, count_flops=True)
    call()
    vanilla = vanilla_acc.report()
    vanilla_acc.remove()
    acc = fastdiff.apply(pipe, EarlyExit(schedule=[2, 2, 2, 2, 2, 1, 1, 1, 1, 1]), count_flops=True)
    call()
    report = acc.report()
    events = [e for e in acc.ledger.modules if e.call == acc.clock.call_index]
    block = next(e.flops for e in events if e.decision is Decision.COMPUTE)
    assert block > 0
    plan_row = acc.plan.rows["transformer_blocks.1"]
    for ours, theirs, decision in zip(report.steps, vanilla.steps, plan_row):
        skipped = decision is Decision.SKIP
        assert ours.flops_saved == (block if skipped else 0)
        assert ours.flops_run + ours.flops_saved == theirs.flops_run
    assert report.flops_saved == plan_row.count(Decision.SKIP) * block
    assert report.flops_run + report.flops_saved == vanilla.flops_run
    acc.remove()


def test_full_depth_reproduces_vanilla(sd_pipe, dit_pipe):
    vanilla = run(sd_pipe)
    depth = exit_ladder(sd_pipe.unet).depth
    for schedule in ([1.0], [depth] * 3):
        acc = fastdiff.apply(sd_pipe, EarlyExit(schedule=schedule))
        assert np.array_equal(run(sd_pipe), vanilla)
        acc.remove()
    vanilla = dit_call(dit_pipe)
    acc = fastdiff.apply(dit_pipe, EarlyExit(schedule=[2]))
    assert np.array_equal(dit_call(dit_pipe), vanilla)
    acc.remove()


def _first_up_resnet_after(unet, dropped):
    for u, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            if f"up_blocks.{u}.resnets.{j}" not in dropped:
                return f"up_blocks.{u}.resnets.{j}"
    raise AssertionError("no up layer after the piece")


def _hidden_channels(unet, resume):
    """Channels of the hidden state (before the skip connection) the up resnet ``resume`` receives
    in the full network: the output channels of the layer before it."""
    previous = unet.mid_block.resnets[-1].out_channels
    for u, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            if f"up_blocks.{u}.resnets.{j}" == resume:
                return previous
            previous = resnet.out_channels
    raise AssertionError(resume)


@pytest.mark.parametrize("fixture", ["sd_pipe", "sdxl_pipe"])
def test_unet_exits_keep_skip_connections_consistent(fixture, request):
    """The up layer after a dropped piece gets the piece's input as its hidden state and the same
    skip connection as in the full network; nothing inside the piece runs."""
    pipe = request.getfixturevalue(fixture)
    unet = pipe.unet
    ladder = exit_ladder(unet)
    assert len(ladder.allowed) > 2
    modules = dict(unet.named_modules())
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, dim, generator=generator),
                                      "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]])}

    def capture(kept, resume, entry=None, dropped=()):
        seen, called, handles = {}, set(), []
        handles.append(modules[resume].register_forward_pre_hook(lambda m, a: seen.__setitem__("resume", a[0])))
        if entry is not None:
            handles.append(modules[entry].register_forward_pre_hook(
                lambda m, a, kw: seen.__setitem__("entry", (a or (kw["hidden_states"],))[0]), with_kwargs=True))
        for path in dropped:  # a dropped module's own pre-hooks still fire; its submodules must not run
            for name, child in modules[path].named_modules():
                if name:
                    handles.append(child.register_forward_pre_hook(lambda m, a, p=path: called.add(p)))
        with torch.no_grad():
            if kept is None:
                out = unet(sample, 500, context, **extra).sample
            else:
                with exiting(unet, kept):
                    out = unet(sample, 500, context, **extra).sample
        for handle in handles:
            handle.remove()
        return out, seen, called

    for kept, dropped in ladder.skipped.items():
        resume = _first_up_resnet_after(unet, set(dropped))
        full, reference, _ = capture(None, resume)
        out, seen, called = capture(kept, resume, ladder.entries[kept], dropped)
        assert not called, f"kept={kept}: {sorted(called)} ran inside the dropped piece"
        hidden = seen["entry"]
        assert hidden.shape[1] == _hidden_channels(unet, resume)
        assert torch.equal(seen["resume"][:, :hidden.shape[1]], hidden)
        assert torch.equal(seen["resume"][:, hidden.shape[1]:], reference["resume"][:, hidden.shape[1]:])
        assert torch.isfinite(out).all() and not torch.equal(out, full)
    assert not hasattr(modules[ladder.skipped[min(ladder.skipped)][0]], "_diffusers_hook")


def test_img2img_uses_the_timesteps_it_runs(sd_pipe):
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(sd_pipe)
    acc = fastdiff.apply(pipe, EarlyExit(schedule="linear", min_depth=0.1))
    image = torch.rand(1, 3, 32, 32)
    pipe("a red circle", image=image, strength=0.5, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
         output_type="np")
    plan = acc.plan
    assert plan.num_steps == 5
    levels = [float(t) / 1000 for t in pipe.scheduler.timesteps[-5:]]
    depths = acc.methods[0].depths(pipe.unet)
    ladder = exit_ladder(pipe.unet)
    for step, level in enumerate(levels):
        dropped = set(ladder.skipped.get(depths[bucket_of(level, 10)], []))
        assert {p for p, row in plan.rows.items() if row[step] is Decision.SKIP} == dropped
    acc.remove()


def test_composes_with_tgate_and_refuses_deepcache(sd_pipe, pixart_pipe):
    for pipe in (sd_pipe, pixart_pipe):
        acc = fastdiff.apply(pipe, EarlyExit(schedule="demo"), TGate(gate_step=3), count_flops=True)
        run(pipe, steps=6)
        methods = {e.method for e in acc.ledger.modules}
        decisions = {e.decision for e in acc.ledger.modules}
        assert methods == {"earlyexit", "tgate"} and decisions == set(Decision)
        acc.remove()
    with pytest.raises(ValueError, match="'deepcache' and 'earlyexit' both claim module 'mid_block'"):
        fastdiff.apply(sd_pipe, fastdiff.DeepCache(), EarlyExit(schedule="demo"))
    assert "acceleration" not in sd_pipe.__dict__ and not hasattr(sd_pipe.unet, "_diffusers_hook")


def test_calibrated_schedule(sd_pipe):
    ladder = exit_ladder(sd_pipe.unet)
    strict = EarlyExit.calibrate(sd_pipe, ["a red circle"], steps=6, tolerance=0.0, height=32, width=32)
    assert strict.depths(sd_pipe.unet) == [ladder.depth] * 10
    assert set(strict.calibration.change) == set(ladder.skipped)
    assert all(v > 0 for row in strict.calibration.change.values() for v in row)
    vanilla = run(sd_pipe)
    acc = fastdiff.apply(sd_pipe, strict)
    assert np.array_equal(run(sd_pipe), vanilla)
    acc.remove()
    loose = EarlyExit.calibrate(sd_pipe, "a red circle", steps=6, tolerance=1e9, height=32, width=32)
    assert loose.depths(sd_pipe.unet) == [0] * 10
    middle_tolerance = sorted(v for row in strict.calibration.change.values() for v in row)[20]
    middle = EarlyExit.calibrate(sd_pipe, ["a red circle"], steps=6, tolerance=middle_tolerance, height=32, width=32)
    depths = middle.depths(sd_pipe.unet)
    assert depths == sorted(depths, reverse=True) and all(d in ladder.allowed for d in depths)
    # each chosen exit really was within tolerance at every calibration step of its bucket
    cal = middle.calibration
    for step, level in enumerate(cal.noise_levels):
        kept = depths[bucket_of(level, 10)]
        if kept < ladder.depth:
            assert cal.change[kept][step] <= middle_tolerance


def test_finetune_trains_the_exited_network_only(sd_pipe):
    method = EarlyExit(schedule=[5])  # always drops the mid block
    mid = [p.detach().clone() for p in sd_pipe.unet.mid_block.parameters()]
    first = [p.detach().clone() for p in sd_pipe.unet.down_blocks[0].parameters()]
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    losses = finetune(sd_pipe, method, images, ["a red circle", "a blue square"] * 3, steps=3, batch_size=4, lr=1e-3)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(torch.equal(a, b) for a, b in zip(mid, sd_pipe.unet.mid_block.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(first, sd_pipe.unet.down_blocks[0].parameters()))
    assert not hasattr(sd_pipe.unet.mid_block, "_diffusers_hook") and not sd_pipe.unet.training
    with pytest.raises(TypeError, match="finetune: supports"):
        finetune(object(), method, images, ["x"] * 6)


def test_spec_round_trip():
    method = fastdiff.parse_method("earlyexit:schedule=28/28/24/24")
    assert method.schedule == (28, 28, 24, 24) and method.spec() == "earlyexit:schedule=28/28/24/24"
    assert fastdiff.parse_method("earlyexit:schedule=linear,min_depth=0.3").min_depth == 0.3
    assert fastdiff.parse_method(EarlyExit(schedule=[1.0, 0.5]).spec()).schedule == (1.0, 0.5)
    assert EarlyExit().spec() == "earlyexit:schedule=auto" and len(DEMO_BLOCKS) == 10


def test_default_is_the_demo_on_transformers_and_measured_on_unets(sd_pipe, dit_pipe):
    """DiT's demo schedule wrecks UNets, so a UNet's default is calibrated on the pipeline, and
    refused where no calibration can be made (the Python API, without prepare)."""
    assert EarlyExit().depths(dit_pipe.transformer) == EarlyExit(schedule="demo").depths(dit_pipe.transformer)
    assert EarlyExit().prepare(dit_pipe, steps=4, prompts=["1"]).spec() == "earlyexit:schedule=demo"
    with pytest.raises(ValueError, match="EarlyExit on a UNet .* has no fixed default schedule"):
        fastdiff.apply(sd_pipe, EarlyExit())
    assert "acceleration" not in sd_pipe.__dict__
    ready = EarlyExit(tolerance=0.0).prepare(sd_pipe, steps=4, prompts=["a red circle"], height=32, width=32,
                                             show_progress=False)
    assert ready.schedule == "calibrated" and ready.calibration is not None
    assert ready.depths(sd_pipe.unet) == [exit_ladder(sd_pipe.unet).depth] * 10  # nothing is within 0


def test_bad_input(sd_pipe, dit_pipe):
    with pytest.raises(ValueError, match="may only stay or fall"):
        EarlyExit(schedule=[1, 2])
    with pytest.raises(ValueError, match=r"fractions of depth must be in \(0, 1\]"):
        EarlyExit(schedule=[1.5])
    with pytest.raises(ValueError, match="buckets must be an integer >= 1"):
        EarlyExit(schedule="linear", buckets=0)
    with pytest.raises(ValueError, match="min_depth"):
        EarlyExit(schedule="linear", min_depth=0.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        EarlyExit(schedule="fast")
    with pytest.raises(ValueError, match="keeps 28 units but this DiTTransformer2DModel is only 2 deep"):
        fastdiff.apply(dit_pipe, EarlyExit(schedule=list(DEMO_BLOCKS)))
    with pytest.raises(ValueError, match=r"3 is not an exit of this UNet2DConditionModel.*allowed: \[0, 1, 4, 5, 6\]"):
        fastdiff.apply(sd_pipe, EarlyExit(schedule=[6, 3]))
    with pytest.raises(ValueError, match="needs a calibration"):
        fastdiff.apply(sd_pipe, EarlyExit(schedule="calibrated"))
    with pytest.raises(ValueError, match="not an exit"):
        with exiting(sd_pipe.unet, 3):
            pass
    for pipe in (sd_pipe, dit_pipe):
        assert "acceleration" not in pipe.__dict__


# -- flow matching: SD3, Flux, Wan -------------------------------------------------------------
def _flow_pipe(name):
    from fastdiff.models import build_builtin

    pipe = build_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flow_call(pipe, name, steps, **kwargs):
    from fastdiff.models import builtin_info

    options = {**builtin_info(name).call_kwargs(), "num_inference_steps": steps, **kwargs}
    result = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), output_type="np", **options)
    return result.frames if hasattr(result, "frames") else result.images


def _expected_rows(method, denoiser, levels):
    """Per claimed module, SKIP where the bucket of the step's noise level drops it."""
    ladder = exit_ladder(denoiser)
    depths = method.depths(denoiser)
    claimed = ladder.skipped[min(depths)]
    return {path: tuple(Decision.SKIP if path in ladder.skipped.get(depths[bucket_of(level, len(depths))], ())
                        else Decision.COMPUTE for level in levels) for path in claimed}


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-wan"])
def test_flow_matching_noise_levels_are_the_sigmas(name):
    """Shifted (SD3), dynamically shifted (Flux: the shift depends on the image size) and UniPC
    flow (Wan) schedules: one plan step per loop iteration, each bucketed by its sigma."""
    pipe = _flow_pipe(name)
    method = EarlyExit(schedule="linear", min_depth=0.2)
    acc = fastdiff.apply(pipe, method)
    _flow_call(pipe, name, 6)
    sigmas = [float(s) for s in pipe.scheduler.sigmas[:6]]
    assert acc.plan.num_steps == 6 == len(pipe.scheduler.timesteps)
    assert acc.plan.rows == _expected_rows(method, pipe.transformer, sigmas)
    assert len({bucket_of(s, 10) for s in sigmas}) >= 4  # the steps spread over the buckets
    skipped = sorted({e.step for e in acc.ledger.modules if e.decision is Decision.SKIP})
    assert skipped == [s for s in range(6) if any(row[s] is Decision.SKIP for row in acc.plan.rows.values())]
    assert acc.plan_for(6).rows == acc.plan.rows  # planned ahead from the scheduler as the call left it
    acc.remove()


def test_flux_exit_skips_into_the_single_stream_stage():
    """Keeping one of Flux's five blocks drops the second dual-stream block and every single-stream
    one; the skipped dual block hands on its (text, image) inputs in its own tuple order, so the
    output layer sees exactly what the first block produced."""
    pipe = _flow_pipe("tiny-flux")
    vanilla = _flow_call(pipe, "tiny-flux", 4)
    method = EarlyExit(schedule=[5] * 5 + [1] * 5)
    acc = fastdiff.apply(pipe, method)
    transformer = pipe.transformer
    assert acc.plan.modules == ["transformer_blocks.1"] + [f"single_transformer_blocks.{i}" for i in range(3)]
    seen = {"first": [], "skipped": [], "norm": [], "single": []}
    handles = [
        transformer.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen["first"].append(out)),
        transformer.transformer_blocks[1].register_forward_hook(
            lambda m, a, kw, out: seen["skipped"].append((kw["encoder_hidden_states"], kw["hidden_states"], out)),
            with_kwargs=True),
        transformer.norm_out.register_forward_pre_hook(lambda m, args: seen["norm"].append(args[0])),
        transformer.single_transformer_blocks[0].attn.register_forward_pre_hook(
            lambda m, args: seen["single"].append(1)),
    ]
    try:
        out = _flow_call(pipe, "tiny-flux", 4)
    finally:
        for handle in handles:
            handle.remove()
    row = acc.plan.rows["transformer_blocks.1"]
    skipped = [s for s, d in enumerate(row) if d is Decision.SKIP]
    assert skipped and len(skipped) < 4
    assert acc.plan.rows == _expected_rows(method, transformer, [float(s) for s in pipe.scheduler.sigmas[:4]])
    assert len(seen["single"]) == 4 - len(skipped)  # the single stage ran only where nothing was dropped
    for step in skipped:
        text_in, image_in, (text_out, image_out) = seen["skipped"][step]
        assert text_out is text_in and image_out is image_in
        assert torch.equal(seen["norm"][step], seen["first"][step][1])  # block 0's image, straight to the output
    events = [(e.module, e.step, e.decision) for e in acc.ledger.modules]
    assert events == [(m, s, r[s]) for s in range(4) for m, r in acc.plan.rows.items()]
    assert np.isfinite(out).all() and not np.array_equal(out, vanilla)
    acc.remove()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_flow_matching_img2img_starts_part_way(name):
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    base = _flow_pipe(name)
    pipe = (StableDiffusion3Img2ImgPipeline if name == "tiny-sd3" else FluxImg2ImgPipeline).from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    method = EarlyExit(schedule="linear", min_depth=0.2)
    acc = fastdiff.apply(pipe, method)
    given = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: given.append(float(kwargs["timestep"].reshape(-1)[0])), with_kwargs=True)
    try:
        pipe("a cat", image=torch.rand(1, 3, 64, 64), strength=0.5, num_inference_steps=10, height=64, width=64,
             generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        handle.remove()
    scale = 1000.0 if name == "tiny-flux" else 1.0  # Flux gives its transformer t / 1000
    run_levels = [t * scale / 1000 for t in given]
    assert acc.plan.num_steps == len(given) == 5
    sigmas = [float(s) for s in pipe.scheduler.sigmas[5:10]]
    assert np.allclose(run_levels, sigmas, atol=1e-4)  # the tail of the schedule, as run
    assert acc.plan.rows == _expected_rows(method, pipe.transformer, sigmas)
    assert any(d is Decision.SKIP for row in acc.plan.rows.values() for d in row)
    acc.remove()


def test_calibration_on_flux_buckets_by_the_schedule_not_the_denoiser_input():
    """Flux's pipeline gives its transformer t / 1000; the calibration's noise levels are the
    scheduler's own, so its buckets are the noise the steps really had."""
    pipe = _flow_pipe("tiny-flux")
    method = EarlyExit.calibrate(pipe, ["a cat"], steps=4, tolerance=1e9, height=64, width=64, guidance_scale=3.5,
                                 show_progress=False)
    sigmas = [float(s) for s in pipe.scheduler.sigmas[:4]]
    assert np.allclose(method.calibration.noise_levels, sigmas, atol=1e-4) and max(sigmas) == 1.0
    visited = {bucket_of(s, 10) for s in sigmas}
    assert 0 not in visited and len(visited) == 4  # (read from the denoiser's input, all would fall in bucket 0)
    depths = method.depths(pipe.transformer)
    assert all(depths[b] == 1 for b in visited)  # everything within tolerance: the shallowest exit
    assert depths[0] == 5  # no step was that little noisy: full depth there
