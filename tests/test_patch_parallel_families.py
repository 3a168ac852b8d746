"""Patch parallelism on SD3/SD3.5, Flux and Wan: image (video) token rows split over real gloo
processes, text held by every process, joint and rotary attention given the other patches' keys
and values.

Starting a process group costs each process its interpreter and imports (seconds of CPU), so
every 2-process check reads the results of ONE group (the module fixture ``two_processes``).
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import PatchParallel
from fastdiff.anatomy import anatomy_of
from fastdiff.models import build_builtin, builtin_info
from fastdiff.parallel import Unsplittable
from fastdiff.parallel.launch import run_processes

FAMILIES = ("tiny-sd3", "tiny-flux", "tiny-wan")
MODES = ("sync", "distrifusion", "pcpp")
STEPS = 4
WARMUP = 1  # DistriFusion: steps 1..3 use the other patches' previous-step keys/values
# (batch per denoiser call, denoiser calls per step): SD3 batches guidance; Flux is
# guidance-distilled (no unconditional branch); Wan calls the transformer twice per step
CALLS = {"tiny-sd3": (2, 1), "tiny-flux": (1, 1), "tiny-wan": (1, 2)}
UNEVEN = 48  # px: 6 latent rows = 3 token rows, so 2 processes get 2 and 1
# DeepCache reuses the middle blocks; EarlyExit skips the last ones (tokens are still gathered
# before the output norm): a block that does not run exchanges nothing
COMPOSED = {"deepcache": lambda: fastdiff.DeepCache(interval=2, branch=0),
            "earlyexit": lambda: fastdiff.EarlyExit(schedule=[1.0, 0.5])}


def quiet(name: str):
    pipe = build_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(name: str, pipe, **overrides) -> np.ndarray:
    kwargs = {**builtin_info(name).call_kwargs(), "num_inference_steps": STEPS, **overrides}
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def _run(name: str, pipe, method: PatchParallel, **overrides) -> dict:
    """One call under ``method``: the image, bytes sent per kind and per step, and the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc = fastdiff.apply(pipe, method)
        image = call(name, pipe, **overrides)
    report = acc.report()
    acc.remove()
    return {"image": image,
            "sent": {k: v.bytes_sent for k, v in report.comm_by_kind.items() if not k.startswith("vae")},
            "per_step": [s.bytes_sent for s in report.steps],
            "warnings": [str(w.message) for w in caught]}


def _families_worker(rank: int, world: int) -> dict:
    results = {}
    for name in FAMILIES:
        pipe = quiet(name)
        for mode in MODES:
            results[(name, mode)] = _run(name, pipe, PatchParallel(mode=mode, warmup_steps=WARMUP))
        # split_guidance: SD3 batches guidance (2 processes: one half each; 4: two halves of 2
        # patches); Flux and Wan have no guidance batch and fall back to patches, with a warning
        results[(name, "split")] = _run(name, pipe, PatchParallel(mode="sync", split_guidance=True))
        if world == 2:
            if name != "tiny-sd3":  # uneven patches; on Wan, rows of 2 frames put back in order
                for mode in ("sync", "pcpp"):
                    results[(name, mode, UNEVEN)] = _run(name, pipe, PatchParallel(mode=mode), height=UNEVEN)
            for label, method in COMPOSED.items():
                acc = fastdiff.apply(pipe, method(), PatchParallel(mode="sync"))
                results[(name, label)] = call(name, pipe)
                acc.remove()
    return results


def _outcomes(world: int) -> list[dict]:
    outcomes = run_processes(world, _families_worker, world, threads=1)
    for status, value in outcomes:
        assert status == "ok", value
    return [value for _, value in outcomes]


@pytest.fixture(scope="module")
def two_processes() -> list[dict]:
    return _outcomes(2)


@pytest.fixture(scope="module")
def single() -> dict:
    """One process, no method: the reference images."""
    images = {}
    for name in FAMILIES:
        pipe = quiet(name)
        images[name] = call(name, pipe)
        if name != "tiny-sd3":
            images[(name, UNEVEN)] = call(name, pipe, height=UNEVEN)
    return images


def expected_bytes(name: str, world: int, mode: str, rank: int = 0, fraction: float = 0.5) -> dict[str, int]:
    """Bytes process ``rank`` sends per step, worked out from the model's shapes alone: keys and
    values of every split attention (all others' image rows, or PCPP's neighbour share) and the
    image tokens gathered before the output norm."""
    pipe = quiet(name)
    transformer = pipe.transformer
    anatomy = anatomy_of(transformer)
    batch, calls = CALLS[name]
    modules = dict(transformer.named_modules())
    height = builtin_info(name).height // 8 // 2  # token rows
    frames = 2 if name == "tiny-wan" else 1
    rows = [len(r) for r in np.array_split(np.arange(height), world)]
    width = builtin_info(name).width // 8 // 2
    neighbours = (rank > 0) + (rank < world - 1)
    attention = 0
    for path in (*anatomy.attention_paths("joint"), *anatomy.attention_paths("self")):
        per_token = 2 * batch * modules[path].inner_dim * 4  # a key and a value, float32
        if mode == "pcpp":
            share = int(np.ceil(fraction * rows[rank]))
            attention += per_token * frames * share * width * neighbours
        else:
            attention += per_token * frames * max(rows) * width * (world - 1)
    output = batch * transformer.config.num_attention_heads * transformer.config.attention_head_dim * 4
    return {"attention": attention * calls, "output": output * frames * max(rows) * width * (world - 1) * calls}


def _check_family(name: str, results: list[dict], single: dict, world: int) -> None:
    reference = single[name]
    for rank_results in results:  # gathered to every process
        assert np.abs(rank_results[(name, "sync")]["image"] - reference).max() <= 1e-5, name
        assert np.abs(rank_results[(name, "split")]["image"] - reference).max() <= 1e-5, name
    for mode in ("distrifusion", "pcpp"):
        image = results[0][(name, mode)]["image"]
        assert 0 < np.abs(image - reference).max() < 0.1, (name, mode)  # close, not equal
    for mode in ("sync", "pcpp"):
        want = expected_bytes(name, world, mode)
        run = results[0][(name, mode)]
        assert run["sent"] == {k: v * STEPS for k, v in want.items()}, (name, mode)
        assert run["per_step"] == [sum(want.values())] * STEPS, (name, mode)
    # DistriFusion sends what sync sends, but nothing of the last step (nobody would read it)
    distri, sync = results[0][(name, "distrifusion")]["sent"], expected_bytes(name, world, "sync")
    assert distri["attention"] == sync["attention"] * (STEPS - 1) and distri["output"] == sync["output"] * STEPS
    assert expected_bytes(name, world, "pcpp")["attention"] < sync["attention"]


@pytest.mark.parametrize("name", FAMILIES)
def test_two_processes_sync_is_exact_and_stale_modes_stay_close(name, two_processes, single):
    _check_family(name, two_processes, single, 2)


@pytest.mark.slow
def test_four_processes():
    results = _outcomes(4)
    single = {name: call(name, quiet(name)) for name in FAMILIES}
    for name in FAMILIES:
        _check_family(name, results, single, 4)


def test_uneven_patches(two_processes, single):
    """3 token rows on 2 processes (2 + 1); Wan's two frames each split alike and put back in order."""
    for name in ("tiny-flux", "tiny-wan"):
        reference = single[(name, UNEVEN)]
        for rank_results in two_processes:
            assert np.abs(rank_results[(name, "sync", UNEVEN)]["image"] - reference).max() <= 1e-5, name
        assert 0 < np.abs(two_processes[0][(name, "pcpp", UNEVEN)]["image"] - reference).max() < 0.1, name


def test_split_guidance(two_processes, single):
    """SD3 batches guidance: each process takes one half. Flux (guidance-distilled) and Wan
    (guidance as two calls) have no batch to split: patches only, with a warning naming why."""
    sd3 = two_processes[0][("tiny-sd3", "split")]
    assert np.abs(sd3["image"] - single["tiny-sd3"]).max() <= 1e-5
    assert sd3["sent"].get("guidance", 0) > 0 and "attention" not in sd3["sent"] and not sd3["warnings"]
    for name, why in (("tiny-flux", "the flux family is guidance-distilled"),
                      ("tiny-wan", "the wan family's pipelines run classifier-free guidance as two denoiser calls")):
        run = two_processes[0][(name, "split")]
        assert np.abs(run["image"] - single[name]).max() <= 1e-5, name
        assert run["sent"]["attention"] > 0 and "guidance" not in run["sent"], name
        assert any("split_guidance falls back to splitting patches only" in w and why in w for w in run["warnings"]), name


def test_composes_with_deepcache_and_early_exit(two_processes):
    for name in FAMILIES:
        pipe = quiet(name)
        for label, method in COMPOSED.items():
            acc = fastdiff.apply(pipe, method())
            alone = call(name, pipe)
            acc.remove()
            for rank_results in two_processes:
                assert np.abs(rank_results[(name, label)] - alone).max() <= 1e-5, (name, label)


def test_describe_split_tells_the_truth():
    pipes = {name: quiet(name) for name in FAMILIES}
    pcpp = PatchParallel(mode="pcpp")
    assert pcpp.describe_split(pipes["tiny-sd3"], 2, height=64) == "2 row patches of a 8-row latent (pcpp)"
    assert pcpp.describe_split(pipes["tiny-flux"], 4, height=64) == "4 row patches of a 8-row latent (pcpp)"
    assert pcpp.describe_split(pipes["tiny-wan"], 2, height=64) == (
        "2 row patches of a 8-row latent, the same rows of every frame (pcpp)")
    split = PatchParallel(split_guidance=True)
    assert split.describe_split(pipes["tiny-sd3"], 2, height=64, guidance_scale=4.5).startswith("guidance split")
    for name, why in (("tiny-flux", "guidance-distilled"), ("tiny-wan", "two denoiser calls per step")):
        text = split.describe_split(pipes[name], 2, height=64, guidance_scale=5.0)
        assert text.startswith("2 row patches") and "split_guidance falls back to splitting patches only" in text
        assert why in text
    # more processes than token rows: 64 px = 4 token rows; 16 px = 1
    for name in FAMILIES:
        with pytest.raises(ValueError, match=r"more processes \(8\) than token rows: 8 latent rows make 4 token rows"):
            pcpp.describe_split(pipes[name], 8, height=64)
        with pytest.raises(ValueError, match=r"more processes \(2\) than token rows"):
            pcpp.describe_split(pipes[name], 2, height=16)


def test_the_cli_refuses_more_processes_than_token_rows(tmp_path, monkeypatch, capsys):
    """Checked before any process starts (bench) or any denoiser call (a launched generate)."""
    from fastdiff.cli import main

    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as stopped:
            main(list(argv))
        assert stopped.value.code == 2
        return capsys.readouterr().err

    err = refused("bench", "--model", "tiny-flux", "--height", "16", "--parallel", "2", "--threads", "1",
                  "--method", "patch:mode=pcpp", "--device", "cpu", "--json", str(tmp_path / "b.json"))
    assert "more processes (2) than token rows: 2 latent rows make 1 token row " in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, before joining any group
    err = refused("generate", "--model", "tiny-wan", "--height", "16", "--steps", "2", "--method", "patch",
                  "--device", "cpu", "--out", str(tmp_path / "v.gif"))
    assert "more processes (2) than token rows" in err and "use at most 1 process " in err
    assert not list(tmp_path.iterdir())


def test_families_without_a_token_layout_are_refused_by_name():
    from diffusers import SanaTransformer2DModel

    sana = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=16, sample_size=8)
    pipe = types.SimpleNamespace(transformer=sana)
    with pytest.raises(Unsplittable, match=r"SanaTransformer2DModel \(sana\) cannot be split.*no token layout for the "
                                           r"sana family"):
        PatchParallel().describe_split(pipe, 2, height=64)
    assert issubclass(Unsplittable, ValueError) and issubclass(Unsplittable, TypeError)
