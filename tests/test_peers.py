"""Peers in the quality harness: other projects' caches on the same pipeline, prompts and seeds."""

import copy
import importlib.util
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.evals.fidelity import batch_call_kwargs
from fastdiff.evals.peers import PEERS, PeerContext, parse_peer
from fastdiff.evals.quality import SEED_CHECK, denoiser_flops, evaluate_quality
from fastdiff.models import build_builtin
from fastdiff.models.digits_mmdit import DIGITS_SD3_CALL
from fastdiff.runner import GenerationRequest

pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")
if importlib.util.find_spec("cache_dit") is None:  # not imported here: importing it turns diffusers' logging down
    pytest.skip("cache-dit is not installed (pip install -e '.[test]')", allow_module_level=True)


def _hooks(module: torch.nn.Module) -> list[str]:
    return [name for sub in module.modules() if getattr(sub, "_diffusers_hook", None) is not None
            for name in sub._diffusers_hook.hooks]


@pytest.fixture(scope="module")
def sd3():
    pipe = build_builtin("digits-sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _requests(n: int, steps: int = 8, **kwargs):
    return [GenerationRequest(prompt=f"a handwritten digit {w}", steps=steps, seed=i, height=8, width=8, **kwargs)
            for i, w in enumerate(["zero", "one", "two", "three"][:n])]


def _images(pipe, requests, call=None) -> np.ndarray:
    return (call or pipe)(**batch_call_kwargs(pipe, requests), output_type="np").images


def test_specs_expand_to_sweeps_and_name_their_options():
    assert [s.spec() for s in parse_peer("fbc")] == ["fbc:threshold=0.05", "fbc:threshold=0.1", "fbc:threshold=0.2"]
    (one,) = parse_peer("magcache:threshold=0.1,max_skip=2")
    assert one.options == {"threshold": 0.1, "max_skip": 2, "retention": 0.2}
    assert len(parse_peer("all")) == sum(len(p.sweep) for p in PEERS.values())
    assert all(2 <= len(p.sweep) <= 3 for p in PEERS.values())
    with pytest.raises(ValueError, match="unknown peer 'fastcache'; choose one of: all, fbc"):
        parse_peer("fastcache")
    with pytest.raises(ValueError, match="unknown option 'thresh'; allowed: threshold"):
        parse_peer("fbc:thresh=1")
    with pytest.raises(ValueError, match="is not an integer"):
        parse_peer("taylorseer:interval=2.5")
    with pytest.raises(ValueError, match="interval='0' is below 1"):
        parse_peer("taylorseer:interval=0")
    with pytest.raises(ValueError, match="needs a value"):
        parse_peer("pab:spatial")


def test_a_missing_peer_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs cache-dit, which is not installed: pip install -e \"\.\[peers\]\""):
        parse_peer("dbcache")
    with pytest.raises(ValueError, match="cache-dit"):
        parse_peer("all")


def test_the_flop_counter_is_the_ledgers(sd3):
    """Peers are counted by a hook around the denoiser; fastdiff's methods by the Ledger: the same numbers."""
    (request,) = _requests(1)
    request = GenerationRequest(**{**request.__dict__, "call_options": DIGITS_SD3_CALL})
    accelerator = fastdiff.apply(sd3, fastdiff.DeepCache(interval=3), count_flops=True)
    try:
        sd3(**batch_call_kwargs(sd3, [request]), output_type="np")
        ledger = accelerator.report().flops_run
    finally:
        accelerator.remove()
    assert denoiser_flops(sd3, [fastdiff.DeepCache(interval=3)], request) == ledger
    assert denoiser_flops(sd3, [fastdiff.DeepCache(interval=3)], [request] * 3) == ledger  # per image


@pytest.mark.parametrize("spec", ["taylorseer:interval=2,warmup=2", "pab:spatial=2", "dbcache:threshold=0.5,warmup=1"])
def test_a_peer_runs_repeatably_and_leaves_nothing_behind(sd3, spec):
    """The context opener resets a stateful cache at each new call: two calls give the same images."""
    requests = [GenerationRequest(**{**r.__dict__, "call_options": DIGITS_SD3_CALL}) for r in _requests(2, guidance_scale=1.0)]
    vanilla = _images(sd3, requests)
    pipe = copy.deepcopy(sd3)
    (setting,) = parse_peer(spec)
    enabled = setting.enable(pipe, PeerContext(steps=8, guidance_scale=1.0))
    first, second = _images(pipe, requests, enabled.call), _images(pipe, requests, enabled.call)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, vanilla)  # it did reuse something
    assert denoiser_flops(pipe, [], requests) < denoiser_flops(sd3, [], requests)
    enabled.remove()
    assert np.array_equal(_images(pipe, requests), vanilla) and _hooks(pipe.transformer) == []


@pytest.mark.slow
def test_harness_scores_peers_and_lists_those_that_cannot_run(sd3):
    peers = (parse_peer("pab:spatial=2") + parse_peer("magcache:threshold=0.5,retention=0.1")
             + parse_peer("fbc:threshold=0.1") + parse_peer("deepcache-release:interval=2"))
    report = evaluate_quality(sd3, {"dc": [fastdiff.DeepCache(interval=2)]}, steps=8, baseline_steps=[4], samples=4,
                              batch_size=4, guidance_scale=1.0, size=8, model="digits-sd3", call_options=DIGITS_SD3_CALL,
                              peers=peers, seed_noise=True, show_progress=False)
    assert [(p.label, p.kind) for p in report.points] == [
        ("vanilla", "vanilla"), ("vanilla 4 steps", "vanilla"), (SEED_CHECK, "vanilla"), ("dc", "method"),
        ("pab:spatial=2", "peer"), ("magcache:threshold=0.5,max_skip=3,retention=0.1", "peer")]
    vanilla, _, seeds, _, pab, magcache = report.points
    assert magcache.denoiser_gflops_per_image < vanilla.denoiser_gflops_per_image  # calibrated, then skipping
    assert seeds.fid_vs_reference is None and report.seed_noise == pytest.approx(abs(seeds.fid_real - vanilla.fid_real))
    assert pab.methods == ["pab:spatial=2"] and math.isfinite(pab.psnr_vs_reference)
    assert pab.denoiser_gflops_per_image < vanilla.denoiser_gflops_per_image
    fbc, release = report.notes
    assert fbc.startswith("fbc:threshold=0.1: cannot run on StableDiffusion3Pipeline: ")  # diffusers' own error
    assert "needs a UNet denoiser" in release
    assert _hooks(sd3.transformer) == []  # peers ran on copies


@pytest.mark.slow  # two quality runs on the UNet
def test_authors_deepcache_release_equals_fastdiffs_deepcache():
    pipe = build_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    peers = parse_peer("deepcache-release:interval=3") + parse_peer("tgate-release:gate_step=4")
    report = evaluate_quality(pipe, {"fastdiff": [fastdiff.DeepCache(interval=3)]}, steps=10, baseline_steps=[],
                              samples=4, batch_size=4, guidance_scale=2.0, peers=peers, show_progress=False)
    _, ours, release, tgate = report.points
    assert release.psnr_vs_reference == ours.psnr_vs_reference and release.fid_real == ours.fid_real
    assert release.denoiser_gflops_per_image == ours.denoiser_gflops_per_image
    assert tgate.kind == "peer" and tgate.denoiser_gflops_per_image < report.points[0].denoiser_gflops_per_image


@pytest.mark.parametrize("spec", ["pab:spatial=2", "fastercache:spatial=2"])
def test_a_cache_mixin_denoiser_takes_peers_through_enable_cache(spec):
    """Flux's pipeline opens the cache context and keeps the timestep itself: the peer uses those."""
    pipe = build_builtin("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    requests = [GenerationRequest(prompt="a red circle", steps=8, seed=0, height=32, width=32)]
    vanilla, vanilla_flops = _images(pipe, requests), denoiser_flops(pipe, [], requests)
    (setting,) = parse_peer(spec)
    enabled = setting.enable(pipe, PeerContext(steps=8, guidance_scale=3.5))
    try:
        assert denoiser_flops(pipe, [], requests) < vanilla_flops
    finally:
        enabled.remove()
    assert np.array_equal(_images(pipe, requests), vanilla) and _hooks(pipe.transformer) == []
