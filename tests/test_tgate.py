"""T-GATE: the schedule, the guidance drop, processors kept, the authors' release, composition, bad input."""

import numpy as np
import pytest
import torch
from conftest import run
from diffusers.models.attention_processor import AttnProcessor

import fastdiff
from fastdiff import Decision, TGate
from fastdiff.caching.tgate import gate_rows

tgate_release = pytest.importorskip("tgate")


def symbols(row):
    return "".join(d.symbol for d in row)


def release_rows(num_steps, **params):
    """The release's own scheduler, step by step: compute unless it says reuse."""
    from tgate.tgate_utils import tgate_scheduler

    self_row, cross_row = [], []
    for step in range(num_steps):
        ca, sa, _ = tgate_scheduler(cur_step=step, **params)
        cross_row.append(Decision.REUSE if ca["reuse"] else Decision.COMPUTE)
        self_row.append(Decision.REUSE if sa["reuse"] else Decision.COMPUTE)
    return tuple(self_row), tuple(cross_row)


@pytest.mark.parametrize("params", [
    dict(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2),
    dict(gate_step=6, sp_interval=2, fi_interval=3, warm_up=0),
    dict(gate_step=1, sp_interval=1, fi_interval=2, warm_up=4),
])
def test_rows_match_the_release_scheduler(params):
    assert gate_rows(20, **params) == release_rows(20, **params)
    self_row, cross_row = gate_rows(20, 10, 5, 1, 2)
    assert symbols(self_row) == "###..#...###########" and symbols(cross_row) == "#" * 10 + "." * 10


def denoiser_batches(pipe):
    seen = []

    def record(module, args):
        accelerator = pipe.__dict__.get("acceleration")
        if accelerator is None or accelerator.measuring is None:  # not the shadow pass that measures FLOPs
            seen.append(args[0].shape[0])

    # conv_in: inside the denoiser, so it sees the batch after the guidance drop
    handle = pipe.unet.conv_in.register_forward_pre_hook(record)
    return seen, handle


@pytest.mark.parametrize("params", [dict(gate_step=4), dict(gate_step=3, sp_interval=2, fi_interval=2, warm_up=0)])
def test_same_images_as_the_authors_release(sd_pipe, params):
    ours_method = TGate(**params)
    acc = fastdiff.apply(sd_pipe, ours_method, count_flops=True)
    seen, handle = denoiser_batches(sd_pipe)
    ours = run(sd_pipe, steps=8)
    handle.remove()
    acc.remove()
    # guidance drop: one half-batch pass per step from the gate on
    assert seen == [2] * ours_method.gate_step + [1] * (8 - ours_method.gate_step)
    release = tgate_release.TgateSDLoader(sd_pipe)
    full = dict(sp_interval=5, fi_interval=1, warm_up=2) | params
    theirs = release.tgate("a red circle", num_inference_steps=8, height=32, width=32, output_type="np",
                           generator=torch.Generator("cpu").manual_seed(0), **full).images
    assert np.array_equal(ours, theirs)


def test_ledger_follows_the_plan_and_reuse_nothing_is_exact(sd_pipe):
    vanilla = run(sd_pipe)
    acc = fastdiff.apply(sd_pipe, TGate(gate_step=6, sp_interval=1))  # gate at the last step: nothing reused
    assert np.array_equal(run(sd_pipe), vanilla)
    assert acc.report().module_calls_avoided == 0
    acc.remove()
    acc = fastdiff.apply(sd_pipe, TGate(gate_step=3, sp_interval=2, warm_up=0, fi_interval=2))
    run(sd_pipe)
    plan = acc.plan_for(6)
    for module, row in plan.rows.items():
        assert [e.decision for e in acc.ledger.modules if e.module == module] == list(row)
    assert any(m.endswith("attn2") for m in plan.modules) and any(m.endswith("attn1") for m in plan.modules)


def test_user_attention_processors_are_kept(sd_pipe):
    calls = []

    class Counting(AttnProcessor):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            calls.append(attn)
            return super().__call__(attn, hidden_states, *args, **kwargs)

    processor = Counting()
    sd_pipe.unet.set_attn_processor(processor)
    before = dict(sd_pipe.unet.attn_processors)
    acc = fastdiff.apply(sd_pipe, TGate(gate_step=3))
    run(sd_pipe)
    assert all(p is processor for p in sd_pipe.unet.attn_processors.values())
    assert calls  # the user's processor did the computing
    acc.remove()
    assert sd_pipe.unet.attn_processors == before


def test_sdxl_and_pixart(sdxl_pipe, pixart_pipe):
    for pipe, denoiser in ((sdxl_pipe, "unet"), (pixart_pipe, "transformer")):
        seen = []
        first = pipe.unet.conv_in if denoiser == "unet" else pipe.transformer.pos_embed
        handle = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
        acc = fastdiff.apply(pipe, TGate(gate_step=3))
        out = run(pipe, steps=5)
        handle.remove()
        assert np.isfinite(out).all() and seen == [2, 2, 2, 1, 1]
        assert acc.report().module_calls_avoided > 0
        acc.remove()


def test_sdxl_keep_half_uncond_matches_the_release(sdxl_pipe):
    acc = fastdiff.apply(sdxl_pipe, TGate(gate_step=3, keep_half="uncond"))
    ours = run(sdxl_pipe, steps=5)
    acc.remove()
    acc = fastdiff.apply(sdxl_pipe, TGate(gate_step=3))
    cond = run(sdxl_pipe, steps=5)
    acc.remove()
    release = tgate_release.TgateSDXLLoader(sdxl_pipe)
    theirs = release.tgate("a red circle", num_inference_steps=5, height=32, width=32, gate_step=3, output_type="np",
                           generator=torch.Generator("cpu").manual_seed(0)).images
    assert np.abs(ours - theirs).max() < 1e-5
    assert not np.array_equal(cond, ours)  # the pooled text embedding differs between halves


def test_composes_with_deepcache(sd_pipe):
    results = {}
    for name, methods in {"deepcache": [fastdiff.DeepCache(interval=2)], "tgate": [TGate(gate_step=3)],
                          "both": [fastdiff.DeepCache(interval=2), TGate(gate_step=3)]}.items():
        acc = fastdiff.apply(sd_pipe, *methods, count_flops=True)
        out = run(sd_pipe, steps=8)
        results[name] = (acc.report().flops_run, out)
        acc.remove()
    assert results["both"][0] < min(results["deepcache"][0], results["tgate"][0])
    assert np.isfinite(results["both"][1]).all()


def test_bad_input(sd_pipe, dit_pipe):
    for name in ("gate_step", "sp_interval", "fi_interval"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            TGate(**{name: 0})
    with pytest.raises(ValueError, match="warm_up must be an integer >= 0"):
        TGate(warm_up=-1)
    with pytest.raises(ValueError, match="keep_half must be one of"):
        TGate(keep_half="both")
    with pytest.raises(ValueError, match=r"gate_step=30 is outside the 20 steps"):
        fastdiff.apply(sd_pipe, TGate(gate_step=30)).plan_for(20)
    with pytest.raises(TypeError, match=r"DiTTransformer2DModel \(dit\) has none"):
        fastdiff.apply(dit_pipe, TGate())
    assert not hasattr(dit_pipe, "acceleration")


def test_composes_with_block_caching_and_encoder_propagation(sd_pipe):
    block = fastdiff.BlockCache.calibrate(sd_pipe, ["a red circle"], steps=8, threshold=0.3, height=32, width=32)
    acc = fastdiff.apply(sd_pipe, block, TGate(gate_step=4))  # blocks contain the attention modules
    assert np.isfinite(run(sd_pipe, steps=8)).all()
    assert {m.method for m in acc.report().modules} == {"blockcache", "tgate"}
    acc.remove()
    # batched decoders must not stack steps across the gate (where T-GATE keeps its mean and
    # drops guidance) nor reuse encoder features kept for the full guidance batch after it
    for gate in (3, 4, 5):
        outputs = []
        for batch in (False, True):
            for methods in ([fastdiff.EncoderPropagation(key_steps=[0, 2, 5], batch_decoders=batch), TGate(gate_step=gate)],
                            [TGate(gate_step=gate), fastdiff.EncoderPropagation(key_steps=[0, 2, 5], batch_decoders=batch)]):
                acc = fastdiff.apply(sd_pipe, *methods)
                outputs.append(run(sd_pipe, steps=8))
                acc.remove()
        assert all(np.abs(out - outputs[0]).max() < 1e-5 for out in outputs), gate


# -- Wan: guidance as two separate transformer calls per step ------------------------------------
WAN_STEPS = 4


@pytest.fixture(scope="module")
def wan_pipe():
    from fastdiff.models import build_builtin

    pipe = build_builtin("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_call(pipe, seed=0, **kwargs):
    from fastdiff.models import builtin_info

    options = {**builtin_info("tiny-wan").call_kwargs(), "num_inference_steps": WAN_STEPS, **kwargs}
    return pipe(prompt="a cat walking on the grass", generator=torch.Generator().manual_seed(seed), output_type="np",
                **options).frames


def accelerated_wan_call(pipe, method, count_flops=False, **call):
    """One ``wan_call`` with ``method`` applied (and removed after): its output, the batch sizes of
    the transformer calls that really ran (the patch embedding is inside it; a call T-GATE answers
    from the step's first call never reaches it), and the handle."""
    seen = []
    acc = fastdiff.apply(pipe, method, count_flops=count_flops)
    handle = pipe.transformer.patch_embedding.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[0]))
    try:
        out = wan_call(pipe, **call)
    finally:
        handle.remove()
        acc.remove()
    return out, seen, acc


def test_wan_gate_at_the_last_step_is_exact(wan_pipe):
    vanilla = wan_call(wan_pipe)
    out, seen, acc = accelerated_wan_call(wan_pipe, TGate(gate_step=WAN_STEPS, sp_interval=1))
    assert np.array_equal(out, vanilla)
    assert len(seen) == 2 * WAN_STEPS and acc.report().module_calls_avoided == 0


def test_wan_drops_the_unconditional_call_after_the_gate(wan_pipe):
    vanilla = wan_call(wan_pipe)
    out, seen, acc = accelerated_wan_call(wan_pipe, TGate(gate_step=2), count_flops=True)
    assert len(seen) == 1 + 2 + 2 + 1 + 1  # the FLOP count's one vanilla pass, then 2, 2, 1, 1 calls
    report = acc.report()
    # the pipeline still made both calls; after the gate the second is answered without running
    assert [(s.denoiser_calls, s.answered) for s in report.steps] == [(2, 0), (2, 0), (1, 1), (1, 1)]
    assert "2 more answered without running it" in report.summary()
    steps = report.steps
    assert steps[0].flops_saved == steps[1].flops_saved == 0
    assert all(s.flops_saved > s.flops_vanilla / 2 for s in steps[2:])  # the whole second call, and more
    # every planned decision, once per call that ran: twice before the gate, once after it
    for module, row in acc.plan.rows.items():
        events = [(e.step, e.decision) for e in acc.ledger.modules if e.module == module]
        assert events == [(s, d) for s, d in enumerate(row) for _ in range(2 if s < 2 else 1)]
    difference = np.abs(out - vanilla).mean()
    assert 0 < difference < 0.2 * np.abs(wan_call(wan_pipe, seed=1) - vanilla).mean()


def test_wan_keeps_the_mean_of_both_calls_at_the_gate(wan_pipe):
    outputs = []
    handle = wan_pipe.transformer.blocks[0].attn2.register_forward_hook(lambda m, args, out: outputs.append(out))
    acc = fastdiff.apply(wan_pipe, TGate(gate_step=2))
    try:
        wan_call(wan_pipe)
    finally:
        handle.remove()
        acc.remove()
    # steps 0 and 1: cond and uncond computed; steps 2 and 3: one call each, given the mean
    assert len(outputs) == 6
    cond, uncond = outputs[2], outputs[3]
    assert not torch.equal(cond, uncond)
    assert torch.equal(outputs[4], (cond + uncond) / 2) and torch.equal(outputs[5], outputs[4])


def test_wan_layout_is_read_from_the_calls(wan_pipe):
    # two videos per prompt: a batch of 2 in each of the two calls is not a guidance batch
    _, seen, _ = accelerated_wan_call(wan_pipe, TGate(gate_step=2), num_videos_per_prompt=2)
    assert seen == [2, 2, 2, 2, 2, 2]
    # without guidance there is one call per step and nothing to drop
    _, seen, acc = accelerated_wan_call(wan_pipe, TGate(gate_step=2), guidance_scale=1.0)
    assert seen == [1] * WAN_STEPS
    assert not any(s.answered for s in acc.report().steps)


def test_wan_refuses_to_keep_the_unconditional_call(wan_pipe):
    acc = fastdiff.apply(wan_pipe, TGate(gate_step=2, keep_half="uncond"))
    try:
        with pytest.raises(ValueError, match=r"keep_half='uncond'.*WanPipeline.*two separate denoiser calls.*"
                                             r"conditional one first.*use keep_half='cond'"):
            wan_call(wan_pipe)
    finally:
        acc.remove()
    assert np.isfinite(wan_call(wan_pipe)).all()  # the pipeline still works after the refused call


@pytest.mark.parametrize("name, family, count", [("tiny-sd3", "sd3", 3), ("tiny-flux", "flux", 5)])
def test_joint_attention_is_refused(name, family, count):
    from fastdiff.models import build_builtin

    pipe = build_builtin(name)
    with pytest.raises(TypeError, match=rf"TGate needs a denoiser with cross-attention .* \({family}\) has none: its "
                                        rf"{count} attention modules are joint attention"):
        fastdiff.apply(pipe, TGate())
    assert "acceleration" not in pipe.__dict__
