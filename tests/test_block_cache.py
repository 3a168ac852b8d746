"""Block Caching: schedules from change profiles, calibration, alignment, files, bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import run

import fastdiff
from fastdiff import BlockCache, BlockCacheCalibration, Decision
from fastdiff.anatomy import BlockIO, anatomy_of
from fastdiff.caching.block_cache import BlockRule
from fastdiff.caching.block_calibration import _Moments
from fastdiff.caching.block_schedule import kept_fraction, schedule_from_changes, schedule_row, threshold_for_budget
from fastdiff.caching.blocks import block_paths
from fastdiff.core.method import parse_method
from fastdiff.core.rules import input_signature

PROMPTS = ["a red circle", "a blue square"]


def symbols(row):
    return "".join(d.symbol for d in row)


def calibrate(pipe, steps=6, **options):
    options.setdefault("threshold", 0.2)
    return BlockCache.calibrate(pipe, PROMPTS, steps=steps, height=32, width=32, **options)


# -- schedules from synthetic profiles (worked by hand) -------------------------------------
def test_schedule_accumulates_change_until_threshold():
    # sums since the last computed step: .05, .10, .15 > .12 -> compute (reset), .20 > .12 -> compute
    assert symbols(schedule_row([0, 0.05, 0.05, 0.05, 0.2], 0.12)) == "#..##"
    # equal to the threshold is still reuse; the first value is never read
    assert symbols(schedule_row([9.0, 0.1, 0.1, 0.0, 0.1], 0.2)) == "#...#"  # .1 .2 .2 then .3
    assert symbols(schedule_row([0, 1, 1, 1], 0.5)) == "####"
    assert symbols(schedule_row([0, 0.01, 0.01, 0.01], 10)) == "#..."


def test_budget_picks_the_smallest_threshold_that_meets_it():
    changes = {"a": [0, 0.1, 0.1, 0.1, 0.1, 0.1], "b": [0, 0.4, 0.4, 0.4, 0.4, 0.4]}
    delta = threshold_for_budget(changes, 0.5)
    assert kept_fraction(schedule_from_changes(changes, delta)) <= 0.5
    assert kept_fraction(schedule_from_changes(changes, delta * 0.99)) > 0.5
    # weighting by FLOPs: b is expensive, so the same budget lets a compute more often
    weights = {"a": 1.0, "b": 9.0}
    weighted = schedule_from_changes(changes, threshold_for_budget(changes, 0.5, weights))
    assert kept_fraction(weighted, weights) <= 0.5
    with pytest.raises(ValueError, match=r"budget=0.1 is below 0.1667"):
        threshold_for_budget(changes, 0.1)
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
            threshold_for_budget(changes, bad)


def test_least_squares_scale_shift_recovers_an_affine_map():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y = 2.0 * x + torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
    dims = (0, 2, 3)
    moments = _Moments(torch.full((3,), 32.0, dtype=torch.float64), x.sum(dims), y.sum(dims),
                       (x * x).sum(dims), (x * y).sum(dims))
    scale, shift = moments.fit()
    assert np.allclose(scale, [2.0, 2.0, 2.0]) and np.allclose(shift, [1.0, -1.0, 0.5])


def test_residual_rule_adds_the_kept_residual_to_the_fresh_input():
    rule = BlockRule(residual=True, alignment={3: ([2.0, 2.0], [0.0, 1.0])})
    x0, out0 = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    kept = rule.keep((x0,), {}, out0, step=0)
    x1 = torch.full((1, 2, 2, 2), 5.0)
    sig = input_signature((x1,), {})
    assert torch.equal(rule.restore(kept, (x1,), {}, 1, sig, sig), x1 + 1)
    aligned = rule.restore(kept, (x1,), {}, 3, sig, sig)  # residual 1 -> 2*1 + shift per channel
    assert torch.equal(aligned[:, 0], torch.full((1, 2, 2), 7.0)) and torch.equal(aligned[:, 1], torch.full((1, 2, 2), 8.0))
    other = input_signature((torch.zeros(2, 2, 2, 2),), {})
    assert rule.restore(kept, (x1,), {}, 1, other, sig) is None  # another batch: compute instead
    output_rule = BlockRule(residual=False, alignment=None)
    kept = output_rule.keep((x0,), {}, (out0,), step=0)
    assert output_rule.restore(kept, (x1,), {}, 1, sig, sig)[0] is out0


def test_dual_stream_rule_aligns_both_token_streams():
    """An MMDiT block returns (text, image) token tensors (B, N, C); each stream gets its residual
    back with its own per-channel scale and shift."""
    io = BlockIO(text_arg="encoder_hidden_states", image_out=1, text_out=0)
    rule = BlockRule(residual=True, alignment={2: ([2.0, 3.0], [0.0, 1.0])}, io=io,
                     text_alignment={2: ([0.5, 1.0], [1.0, 0.0])})
    image0, text0 = torch.zeros(1, 4, 2), torch.zeros(1, 3, 2)
    kept = rule.keep((), {"hidden_states": image0, "encoder_hidden_states": text0}, (text0 + 2, image0 + 1), step=0)
    image1, text1 = torch.full((1, 4, 2), 10.0), torch.full((1, 3, 2), 20.0)
    inputs = {"hidden_states": image1, "encoder_hidden_states": text1}
    sig = input_signature((), inputs)
    text, image = rule.restore(kept, (), inputs, 1, sig, sig)  # unfitted step: residuals as kept
    assert torch.equal(text, text1 + 2) and torch.equal(image, image1 + 1)
    text, image = rule.restore(kept, (), inputs, 2, sig, sig)  # channels last: scale·residual + shift
    assert torch.equal(image, image1 + torch.tensor([2.0, 4.0]))
    assert torch.equal(text, text1 + torch.tensor([2.0, 2.0]))


# -- calibration on real pipelines ----------------------------------------------------------
def test_block_paths_follow_execution_order(sd_pipe, dit_pipe):
    paths = block_paths(sd_pipe.unet, "layer")
    assert paths[:3] == ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.1"]
    assert "mid_block.resnets.0" in paths and paths.index("mid_block.attentions.0") == paths.index("mid_block.resnets.0") + 1
    assert all(".attentions." in p for p in block_paths(sd_pipe.unet, "attention"))
    assert block_paths(sd_pipe.unet, "block") == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert block_paths(dit_pipe.transformer, "layer") == [
        f"transformer_blocks.{i}" for i in range(len(dit_pipe.transformer.transformer_blocks))]
    with pytest.raises(ValueError, match="granularity must be one of"):
        block_paths(sd_pipe.unet, "pixel")
    with pytest.raises(TypeError, match="does not know the denoiser class Linear"):
        block_paths(torch.nn.Linear(2, 2), "layer")


def test_calibration_profiles_every_block_and_round_trips(sd_pipe, tmp_path):
    method = calibrate(sd_pipe)
    calibration = method.calibration
    assert calibration.num_steps == 6 and calibration.modules == block_paths(sd_pipe.unet, "layer")
    assert all(len(v) == 6 and v[0] == 0 and all(c > 0 for c in v[1:]) for v in calibration.change.values())
    assert all(f > 0 for f in calibration.flops.values())
    path = tmp_path / "calibration.json"
    calibration.save(path)
    loaded = BlockCacheCalibration.load(path)
    assert loaded == calibration
    again = BlockCache(threshold=0.2, calibration=str(path))
    assert again.rows() == method.rows()
    assert str(again.plan()) == str(method.plan())
    calibration.plot(tmp_path / "change.png", threshold=0.2)
    assert (tmp_path / "change.png").stat().st_size > 1000
    data = json.loads(path.read_text())
    data["format"] = "something else"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a BlockCache calibration"):
        BlockCacheCalibration.load(path)
    with pytest.raises(FileNotFoundError, match="calibration: no file"):
        BlockCache(calibration=str(tmp_path / "missing.json"))


def test_reuse_nothing_is_bit_identical_and_ledger_follows_plan(sd_pipe):
    vanilla = run(sd_pipe)
    method = calibrate(sd_pipe, threshold=1e-12)
    assert all(set(row) == {Decision.COMPUTE} for row in method.rows().values())
    acc = fastdiff.apply(sd_pipe, method)
    assert np.array_equal(run(sd_pipe), vanilla)
    assert acc.report().module_calls_avoided == 0
    acc.remove()

    method = calibrate(sd_pipe, threshold=0.3)
    plan = method.plan()
    assert 0 < plan.count(Decision.REUSE) < plan.count(Decision.REUSE) + plan.count(Decision.COMPUTE)
    acc = fastdiff.apply(sd_pipe, method, count_flops=True)
    cached = run(sd_pipe)
    assert not np.array_equal(cached, vanilla)
    events = acc.ledger.modules
    for module, row in plan.rows.items():
        taken = [e.decision for e in events if e.module == module]
        assert taken == list(row)  # one call per step, exactly as planned
    report = acc.report()
    assert report.flops_saved > 0


def test_budget_meets_the_requested_share(sd_pipe):
    method = calibrate(sd_pipe, threshold=None, budget=0.5)
    assert method.kept_fraction() <= 0.5
    assert method.spec() == "blockcache:budget=0.5"
    by_flops = BlockCache(budget=0.5, budget_by="flops", calibration=method.calibration)
    assert by_flops.kept_fraction("flops") <= 0.5


def test_alignment_is_fitted_at_the_reused_steps(sd_pipe):
    method = calibrate(sd_pipe, threshold=0.3, align=True)
    calibration = method.calibration
    for module, row in method.rows().items():
        reused = {str(s) for s, d in enumerate(row) if d is Decision.REUSE}
        assert set(calibration.alignment[module]) == reused
    acc = fastdiff.apply(sd_pipe, method)
    aligned = run(sd_pipe)
    acc.remove()
    acc = fastdiff.apply(sd_pipe, BlockCache(threshold=0.3, calibration=calibration))
    plain = run(sd_pipe)
    acc.remove()
    assert not np.array_equal(aligned, plain)
    with pytest.raises(ValueError, match="fitted for another schedule"):
        fastdiff.apply(sd_pipe, BlockCache(threshold=0.05, align=True, calibration=calibration))
    assert not hasattr(sd_pipe, "acceleration")


def test_output_mode_and_block_granularity_on_sdxl(sdxl_pipe):
    vanilla = run(sdxl_pipe)
    method = calibrate(sdxl_pipe, granularity="block", cache="output")
    assert method.calibration.modules[0] == "down_blocks.0"
    acc = fastdiff.apply(sdxl_pipe, method)
    out = run(sdxl_pipe)
    assert out.shape == vanilla.shape and np.isfinite(out).all()
    assert acc.report().module_calls_avoided == method.plan().count(Decision.REUSE)


def test_transformer_denoisers(dit_pipe, pixart_pipe):
    method = BlockCache.calibrate(dit_pipe, ["1", "2"], steps=5, threshold=0.3)
    acc = fastdiff.apply(dit_pipe, method)
    dit_pipe(class_labels=[1], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    assert acc.report().module_calls_avoided == method.plan().count(Decision.REUSE) > 0
    acc.remove()
    method = calibrate(pixart_pipe, steps=5, threshold=0.3)
    acc = fastdiff.apply(pixart_pipe, method)
    run(pixart_pipe, steps=5)
    assert acc.report().module_calls_avoided == method.plan().count(Decision.REUSE)


def test_calibration_for_another_model_or_step_count_is_refused(sd_pipe, sdxl_pipe):
    method = calibrate(sd_pipe)
    with pytest.raises(ValueError, match="made for another denoiser"):
        fastdiff.apply(sdxl_pipe, method)
    assert not hasattr(sdxl_pipe, "acceleration")
    fastdiff.apply(sd_pipe, method)
    with pytest.raises(ValueError, match="calibrated for 6 steps, but the pipeline runs 8"):
        run(sd_pipe, steps=8)


def test_bad_input(sd_pipe):
    with pytest.raises(ValueError, match="at least one prompt"):
        BlockCache.calibrate(sd_pipe, [], steps=4, threshold=0.1)
    with pytest.raises(ValueError, match="at least 2 steps"):
        BlockCache.calibrate(sd_pipe, PROMPTS, steps=1, threshold=0.1)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="threshold must be > 0"):
            BlockCache(threshold=bad)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        BlockCache(budget=1.2)
    with pytest.raises(ValueError, match="threshold or budget, not both"):
        BlockCache(threshold=0.1, budget=0.5)
    with pytest.raises(ValueError, match="needs a calibration"):
        fastdiff.apply(sd_pipe, BlockCache(threshold=0.1))
    assert not hasattr(sd_pipe, "acceleration")
    for name, value in (("granularity", "pixel"), ("cache", "delta"), ("budget_by", "seconds")):
        with pytest.raises(ValueError, match=f"BlockCache: {name} must be one of"):
            BlockCache(**{name: value})
    plain = calibrate(sd_pipe, steps=3)
    with pytest.raises(ValueError, match="align=True needs a calibration made with align=True"):
        BlockCache(threshold=0.2, align=True, calibration=plain.calibration)


def test_cli_spec_calibrates_through_prepare(sd_pipe):
    from fastdiff.runner import GenerationRequest, prepare_methods

    method = parse_method("blockcache:budget=0.4,granularity=attention")
    assert isinstance(method, BlockCache) and method.calibration is None
    (ready,) = prepare_methods(sd_pipe, [method], GenerationRequest(prompt="a cat", steps=5, height=32, width=32))
    assert ready.calibration.num_steps == 5 and ready.calibration.granularity == "attention"
    assert ready.kept_fraction() <= 0.4


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_mmdit_blocks_of_every_stage_with_alignment(name):
    """Flux (dual then single stage) and SD3 (joint blocks, the last one image-only): one schedule
    per block over all stages, and the scale/shift fitted per channel of both token streams."""
    from fastdiff.models import build_builtin, builtin_info

    pipe = build_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    options = {**builtin_info(name).call_kwargs(), "num_inference_steps": 4}
    size = {k: v for k, v in options.items() if k != "num_inference_steps"}

    def call():
        return pipe(prompt=PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="np", **options).images

    vanilla = call()
    method = BlockCache.calibrate(pipe, PROMPTS[:1], steps=4, budget=0.5, align=True, show_progress=False, **size)
    calibration = method.calibration
    anatomy = anatomy_of(pipe.transformer)
    assert calibration.modules == anatomy.block_paths_in_order
    assert len(anatomy.stages) == (2 if name == "tiny-flux" else 1)
    channels = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    with_text = [b.path for b in anatomy.blocks if b.io.dual and not (name == "tiny-sd3" and b is anatomy.blocks[-1])]
    assert sorted(calibration.text_alignment) == sorted(with_text)  # SD3's last block hands on no text
    for module, row in method.rows().items():
        reused = {str(s) for s, d in enumerate(row) if d is Decision.REUSE}
        assert reused and set(calibration.alignment[module]) == reused
        assert all(len(scale) == len(shift) == channels for scale, shift in calibration.alignment[module].values())
        if module in with_text:
            assert set(calibration.text_alignment[module]) == reused
    acc = fastdiff.apply(pipe, method)
    aligned = call()
    assert [e.decision for e in acc.ledger.modules] == [
        row[step] for step in range(4) for row in method.rows().values()]
    acc.remove()
    acc = fastdiff.apply(pipe, BlockCache(budget=0.5, calibration=calibration))
    plain = call()
    acc.remove()
    # fitted on this very prompt and seed, the correction brings the output nearer to vanilla
    assert 0 < np.abs(aligned - vanilla).mean() < np.abs(plain - vanilla).mean()
