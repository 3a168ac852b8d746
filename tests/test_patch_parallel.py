"""Patch parallelism on real gloo process groups (2 and 4 CPU processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import PatchParallel
from fastdiff.models import build_builtin
from fastdiff.parallel import row_partition
from fastdiff.parallel.launch import run_processes

SIZE = 64
STEPS = 6
MODELS = ["tiny-sd", "tiny-sdxl"]
MODES = ["sync", "distrifusion", "pcpp"]


def call(pipe, prompt="a red circle", steps=STEPS, size=SIZE, **kwargs):
    return pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def quiet(name):
    pipe = build_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _modes_worker(rank, models, modes, size, split=False):
    """Each (model, mode): the image and this process's bytes sent per kind."""
    import torch.distributed as dist

    all_gather, sent_async = dist.all_gather, []

    def counting(*args, **kwargs):
        sent_async.append(bool(kwargs.get("async_op")))
        return all_gather(*args, **kwargs)

    dist.all_gather = counting
    results = {}
    for name in models:
        pipe = quiet(name)
        for mode in modes:
            # DistriFusion twice: one stale buffer per step, then one per payload (tiny buckets)
            for attempt, bucket_mb in enumerate([0, 1e-6] if mode == "distrifusion" else [0]):
                acc = fastdiff.apply(pipe, PatchParallel(mode=mode, warmup_steps=2, split_guidance=split,
                                                         bucket_mb=bucket_mb))
                sent_async.clear()
                image = call(pipe, size=size)
                report = acc.report()
                acc.remove()
                results[(name, mode, attempt)] = (  # the VAE decode's exchanges are counted apart
                    image, {k: v.bytes_sent for k, v in report.comm_by_kind.items() if not k.startswith("vae")},
                    len(report.steps), sum(sent_async))
    dist.all_gather = all_gather
    return results


def _outcomes(world, target, *args):
    outcomes = run_processes(world, target, *args, threads=1)
    for status, value in outcomes:
        assert status == "ok", value
    return [value for _, value in outcomes]


def _layer_shapes(pipe, size):
    """Input shapes of every layer the patches exchange for, in one vanilla single-process call."""
    from diffusers.models.attention_processor import Attention

    shapes, handles = [], []
    for module in pipe.unet.modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] > 1:
            kind = "conv"
        elif isinstance(module, torch.nn.GroupNorm):
            kind = "groupnorm"
        elif isinstance(module, Attention) and not module.is_cross_attention:
            kind = "attention"
        else:
            continue
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k=kind: shapes.append((k, m, tuple(a[0].shape)))))
    call(pipe, steps=1, size=size)
    for handle in handles:
        handle.remove()
    return shapes


def expected_bytes(pipe, size, world, mode, rank=0, fraction=0.5):
    """Bytes process ``rank`` sends in one step, counted from the layer shapes alone."""
    shapes = _layer_shapes(pipe, size)
    latent = size // pipe.vae_scale_factor
    unit = 2 ** sum(1 for b in pipe.unet.down_blocks if getattr(b, "downsamplers", None))
    partition = row_partition(latent, world, unit)
    neighbours = (rank > 0) + (rank < world - 1)
    others = world - 1
    sent = {"conv": 0, "groupnorm": 0, "attention": 0}
    for kind, module, shape in shapes:
        if kind == "conv":
            batch, channels, height, width = shape
            rows = module.padding[0]
            sent["conv"] += (batch * channels * rows * width * 4) * (neighbours if mode == "pcpp" else 2 * others)
        elif kind == "groupnorm":
            sent["groupnorm"] += shape[0] * module.num_groups * 3 * 8 * others
        else:
            batch, tokens, channels = shape
            factor = int(round((latent * latent / tokens) ** 0.5))
            rows = [(b - a) // factor for a, b in partition]
            width = latent // factor
            if mode == "pcpp":
                share = max(1, int(np.ceil(fraction * rows[rank] - 1e-9)))
                sent["attention"] += batch * share * width * channels * 4 * neighbours
            else:
                sent["attention"] += batch * max(rows) * width * channels * 4 * others
    out_channels = pipe.unet.config.out_channels
    batch = shapes[0][2][0]
    sent["output"] = batch * out_channels * max(b - a for a, b in partition) * latent * 4 * others
    return sent


@pytest.fixture(scope="module")
def sd_reference():
    return call(quiet("tiny-sd"))


@pytest.mark.slow  # the default run keeps one two-process check: test_patch_parallel_families
@pytest.mark.parametrize("world", [2, 4])
def test_sync_equals_single_process_and_bytes_match_the_count(world, sd_reference, request):
    size = SIZE if world == 2 else 128  # tiny-sd splits into 8-row... 2x-downsampled units: 4 processes need 16 rows
    models = MODELS
    results = ([runs["modes"] for runs in request.getfixturevalue("shared_runs")] if world == 2
               else _outcomes(world, _modes_worker, models, MODES, size))
    for name in models:
        single = sd_reference if (name == "tiny-sd" and size == SIZE) else call(quiet(name), size=size)
        for rank_results in results:
            image = rank_results[(name, "sync", 0)][0]
            assert np.abs(image - single).max() <= 1e-5, name  # gathered to every process
        (stale, _, steps, buffers), (again, _, _, bucketed) = (results[0][(name, "distrifusion", a)] for a in (0, 1))
        # the bucket size changes when stale data travels, never which data a layer uses
        assert np.array_equal(stale, again)
        assert buffers == (steps - 1 - 2) * 2  # per stale step but the last (warm-up 2): float32 + float64 (GroupNorm)
        assert bucketed > 10 * buffers
        assert 0 < np.abs(stale - single).max() < 0.1  # stale activations: close, not equal
        pcpp = results[0][(name, "pcpp", 0)][0]
        assert 0 < np.abs(pcpp - single).max() < 0.1
    pipe = quiet("tiny-sd")
    for mode in ("sync", "pcpp"):
        want = expected_bytes(pipe, size, world, mode)
        got, steps = results[0][("tiny-sd", mode, 0)][1], results[0][("tiny-sd", mode, 0)][2]
        assert got == {k: v * steps for k, v in want.items()}, mode
    # DistriFusion moves what sync moves, except the last step's (nobody would read it)
    distri, steps = results[0][("tiny-sd", "distrifusion", 0)][1], results[0][("tiny-sd", "distrifusion", 0)][2]
    sync = expected_bytes(pipe, size, world, "sync")
    assert {k: v for k, v in distri.items() if k != "wait"} == {
        k: v * steps if k == "output" else v * (steps - 1) for k, v in sync.items()}
    if world == 4:
        pcpp_total = sum(expected_bytes(pipe, size, world, "pcpp").values())
        assert pcpp_total <= 0.35 * sum(sync.values())


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_split_guidance_equals_single_process(world, sd_reference, request):
    """Half the processes take the unconditional branch, half the conditional one."""
    size = SIZE if world == 2 else 128
    single = sd_reference if size == SIZE else call(quiet("tiny-sd"), size=size)
    results = ([runs["split"] for runs in request.getfixturevalue("shared_runs")] if world == 2
               else _outcomes(world, _modes_worker, ["tiny-sd"], ["sync"], size, True))
    for rank_results in results:
        image, sent, _, _ = rank_results[("tiny-sd", "sync", 0)]
        assert np.abs(image - single).max() <= 1e-5
        assert sent["guidance"] > 0 and (sent.get("attention", 0) > 0) == (world == 4)


def _uneven_worker(rank):
    """3 processes: uneven patches (2, 1, 1 units of 2 rows), and the two documented fallbacks."""
    import warnings

    pipe = quiet("tiny-sd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc = fastdiff.apply(pipe, PatchParallel(mode="distrifusion", warmup_steps=STEPS, split_guidance=True))  # odd
        image = call(pipe)
        acc.remove()
    return image, [str(w.message) for w in caught]


@pytest.mark.slow
def test_uneven_patches_and_fallbacks_on_three_processes(sd_reference):
    for image, messages in _outcomes(3, _uneven_worker):
        assert np.abs(image - sd_reference).max() <= 1e-5  # warm-up covering every step = synchronous
        assert any("split_guidance falls back" in m and "3 processes" in m for m in messages)
        assert any(f"warmup_steps={STEPS} covers all {STEPS} steps" in m for m in messages)


def _deepcache_results():
    pipe = quiet("tiny-sd")
    acc = fastdiff.apply(pipe, fastdiff.DeepCache(interval=2), PatchParallel(mode="sync", split_guidance=False))
    image = call(pipe)
    report = acc.report()
    acc.remove()
    acc = fastdiff.apply(pipe, fastdiff.EarlyExit(schedule=[1.0, 0.5]), PatchParallel(mode="sync", split_guidance=False))
    exited = call(pipe)
    acc.remove()
    return image, [s.bytes_sent for s in report.steps], exited


def _shared_worker(rank):
    """One 2-process group for every check that only needs the results of exact runs: starting
    a group costs each process its interpreter and imports, several seconds of CPU."""
    return {"modes": _modes_worker(rank, MODELS, MODES, SIZE), "split": _modes_worker(rank, ["tiny-sd"], ["sync"], SIZE, True),
            "deepcache": _deepcache_results(), "transformers": _transformer_results(),
            "compositions": _transformer_composition_results()}


@pytest.fixture(scope="module")
def shared_runs():
    return _outcomes(2, _shared_worker)


def test_guidance_split_refuses_tgate(monkeypatch):
    """T-GATE keeps the mean of both guidance halves' cross-attention; a process holding one half
    cannot, so the combination is refused, leaving the pipeline as it was."""
    import fastdiff.parallel.patch_parallel as patch_parallel
    from fastdiff.parallel.group import ProcessGroup

    monkeypatch.setattr(patch_parallel, "process_group",
                        lambda timeout, requested: ProcessGroup(0, 2, torch.device("cpu"), "gloo"))
    pipe = quiet("tiny-sd")
    with pytest.raises(ValueError, match=r"split_guidance=True\) and TGate cannot be combined"):
        fastdiff.apply(pipe, fastdiff.TGate(gate_step=3), PatchParallel(split_guidance=True))
    assert "acceleration" not in pipe.__dict__ and not hasattr(pipe.unet, "_diffusers_hook")


def test_composes_with_deepcache_and_early_exit(shared_runs):
    pipe = quiet("tiny-sd")
    acc = fastdiff.apply(pipe, fastdiff.DeepCache(interval=2))
    single = call(pipe)
    acc.remove()
    acc = fastdiff.apply(pipe, fastdiff.EarlyExit(schedule=[1.0, 0.5]))
    single_exited = call(pipe)
    acc.remove()
    image, per_step, exited = shared_runs[0]["deepcache"]
    assert np.abs(image - single).max() <= 1e-5
    assert np.abs(exited - single_exited).max() <= 1e-5
    full, cached = per_step[0::2], per_step[1::2]
    assert all(c < f for f, c in zip(full, cached))  # cached blocks skip their exchanges


def _crash_worker(rank):
    pipe = quiet("tiny-sd")
    fastdiff.apply(pipe, PatchParallel(mode="sync", timeout=30, split_guidance=False))

    def stop(pipeline, step, timestep, kwargs):
        if rank == 1 and step == 1:
            os._exit(0)  # a process dying mid-call, without a word to the others
        return kwargs

    call(pipe, callback_on_step_end=stop)
    return "finished"


@pytest.mark.slow
def test_a_crashed_process_makes_the_others_fail():
    outcomes = run_processes(2, _crash_worker, threads=1)
    status, message = outcomes[0]
    assert status == "error" and "PeerLost" in message and "lost contact with the others" in message
    assert outcomes[1][0] == "lost"


def _mismatch_worker(rank):
    pipe = quiet("tiny-sd")
    fastdiff.apply(pipe, PatchParallel(mode="sync", split_guidance=False))
    call(pipe, prompt="a red circle" if rank == 0 else "a blue square")


@pytest.mark.slow
def test_processes_with_different_prompts_are_refused():
    for status, message in run_processes(2, _mismatch_worker, threads=1):
        assert status == "error" and "makes a different call" in message and "prompt embedding sum" in message


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_launchers_run_the_cli(tmp_path, launcher):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *LAUNCHERS[launcher], "-m", "fastdiff", "generate", "--model", "tiny-sd", "--steps", "3",
               "--method", "patch:mode=pcpp", "--device", "cpu",  # gloo on the CPU also where a GPU is present
               "--out", str(tmp_path / "out.png")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and "sent" in done.stdout  # only the main process writes
    assert "split across 2 processes: 2 row patches of a 8-row latent (pcpp)" in done.stdout
    # dividing the work among processes is not saving it: the report says split, with this process's share
    assert "denoiser FLOPs split across 2 processes: this one ran" in done.stdout and "saved" not in done.stdout
    assert (tmp_path / "out.png").exists()


@pytest.mark.filterwarnings("ignore:PatchParallel. one process")
def test_bad_input():
    with pytest.raises(ValueError, match="mode must be one of"):
        PatchParallel(mode="fast")
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        PatchParallel(warmup_steps=-1)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"neighbor_fraction must be in \(0, 1\]"):
            PatchParallel(mode="pcpp", neighbor_fraction=fraction)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        PatchParallel(timeout=0)
    with pytest.raises(ValueError, match=r"bucket_mb must be a number >= 0 \(0: one buffer per step\)"):
        PatchParallel(bucket_mb=-1)
    from fastdiff.evals.parallel_bench import parallel_benchmark
    from fastdiff.runner import GenerationRequest

    request = GenerationRequest(prompt="x", steps=2)
    with pytest.raises(ValueError, match="needs at least 2 processes"):
        parallel_benchmark("tiny-sd", request, {"a": ["patch"]}, 1)
    with pytest.raises(ValueError, match="--threads: must be >= 1"):
        parallel_benchmark("tiny-sd", request, {"a": ["patch"]}, 2, threads=0)
    with pytest.raises(ValueError, match=r"has 0 patch:\.\.\. methods"):
        parallel_benchmark("tiny-sd", request, {"a": ["deepcache"]}, 2)
    with pytest.raises(ValueError, match="more processes"):
        row_partition(8, 8, unit=2)
    assert row_partition(24, 3, unit=4) == [(0, 8), (8, 16), (16, 24)]
    assert row_partition(20, 3, unit=4) == [(0, 8), (8, 16), (16, 20)]  # uneven: the first take one unit more
    # one process: a no-op, bit-identical to vanilla
    pipe = quiet("tiny-sd")
    vanilla = call(pipe)
    acc = fastdiff.apply(pipe, PatchParallel())
    assert np.array_equal(call(pipe), vanilla)
    acc.remove()


def _transformer_call(pipe):
    if type(pipe).__name__.startswith("DiT"):
        return pipe(class_labels=[1], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
    return call(pipe, size=256)


def _transformer_results():
    results = {}
    for name in ("tiny-dit", "tiny-pixart"):
        pipe = quiet(name)
        for mode in ("sync", "distrifusion", "pcpp"):
            acc = fastdiff.apply(pipe, PatchParallel(mode=mode, warmup_steps=2, split_guidance=False))
            image = _transformer_call(pipe)
            results[(name, mode)] = (image, {k: v.bytes_sent for k, v in acc.report().comm_by_kind.items()})
            acc.remove()
    return results


def test_transformers_split_into_token_rows(shared_runs):
    results = [runs["transformers"] for runs in shared_runs]
    for name in ("tiny-dit", "tiny-pixart"):
        single = _transformer_call(quiet(name))
        for rank_results in results:
            assert np.abs(rank_results[(name, "sync")][0] - single).max() <= 1e-5, name
        for mode in ("distrifusion", "pcpp"):
            image, sent = results[0][(name, mode)]
            assert 0 < np.abs(image - single).max() < 0.1 and sent["attention"] > 0, (name, mode)


def _transformer_methods():
    # DeepCache reuses the middle blocks; EarlyExit skips the last ones (the tokens are still
    # gathered before the output norm)
    return {"deepcache": lambda: fastdiff.DeepCache(interval=2, branch=0),
            "earlyexit": lambda: fastdiff.EarlyExit(schedule=[1.0, 0.5])}


def _transformer_composition_results():
    results = {}
    for name in ("tiny-dit", "tiny-pixart"):
        pipe = quiet(name)
        for label, method in _transformer_methods().items():
            acc = fastdiff.apply(pipe, method(), PatchParallel(mode="sync", split_guidance=False))
            results[(name, label)] = _transformer_call(pipe)
            acc.remove()
    return results


def test_transformers_compose_with_caching_and_early_exit(shared_runs):
    results = [runs["compositions"] for runs in shared_runs]
    for name in ("tiny-dit", "tiny-pixart"):
        pipe = quiet(name)
        for label, method in _transformer_methods().items():
            acc = fastdiff.apply(pipe, method())
            single = _transformer_call(pipe)
            acc.remove()
            assert not np.array_equal(single, _transformer_call(pipe)), (name, label)  # the method changed something
            for rank_results in results:
                assert np.abs(rank_results[(name, label)] - single).max() <= 1e-5, (name, label)


@pytest.mark.slow  # two full bench runs in processes; the CLI's parallel checks stay in the default run
def test_bench_parallel_compares_with_one_process(tmp_path, capsys):
    import json

    from fastdiff.cli import main

    path = tmp_path / "parallel.json"
    assert main(["bench", "--model", "tiny-sd", "--steps", "3", "--parallel", "2", "--threads", "1", "--repeats", "1",
                 "--device", "cpu", "--method", "patch:mode=sync,split_guidance=false", "--variant", "patch:mode=pcpp,split_guidance=false", "--json", str(path)]) == 0
    runs = json.loads(path.read_text())["runs"]
    assert [r["processes"] for r in runs] == [1, 2, 2]
    sync, pcpp = runs[1], runs[2]
    assert sync["max_abs_diff"] <= 1e-5 and pcpp["max_abs_diff"] > 0
    assert sync["bytes_sent_per_step"]["attention"] > pcpp["bytes_sent_per_step"]["attention"] > 0
    assert "MiB sent per step by layer type" in capsys.readouterr().out


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from fastdiff.parallel.group import process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert process_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # NCCL would fail with "Duplicate GPU detected"
    with pytest.raises(ValueError, match=r"no GPU of its own: 1 GPU\(s\) here.*--device cpu"):
        process_device()
    assert process_device("cpu") == torch.device("cpu")  # a CPU pipeline runs over gloo instead

    from fastdiff.evals.parallel_bench import parallel_benchmark
    from fastdiff.runner import GenerationRequest

    with pytest.raises(ValueError, match=r"--parallel: 2 processes on GPUs: 1 GPU\(s\) here"):
        parallel_benchmark("tiny-sd", GenerationRequest(prompt="a"), {"p": ["patch"]}, 2)


def test_the_group_is_joined_on_the_denoisers_side(monkeypatch):
    """A CPU pipeline on a CUDA machine must exchange over gloo, not claim a GPU for NCCL."""
    import fastdiff.parallel.patch_parallel as patch_parallel

    with pytest.raises(RuntimeError, match="no process group yet"):
        fastdiff.PatchParallel().group  # nothing to choose a backend by before a denoiser is known
    asked = []
    monkeypatch.setattr(patch_parallel, "process_group", lambda timeout, requested: asked.append(requested) or requested)
    assert fastdiff.PatchParallel()._join(torch.nn.Linear(2, 2)) == "cpu"
    assert fastdiff.PatchParallel()._join(torch.nn.Linear(2, 2, device="meta")) == "auto"  # any accelerator
    method = fastdiff.PatchParallel()
    method._join(torch.nn.Linear(2, 2))
    method._join(torch.nn.Linear(2, 2))
    assert asked == ["cpu", "auto", "cpu"]  # joined once per method
