"""One definition of saved FLOPs everywhere: vanilla's denoiser FLOPs for the same pipeline call
minus the denoiser FLOPs run, and the ideal speedup is their ratio.

Every number is checked against counts taken independently, around the denoiser module's own
calls (outside every hook fastdiff installs): once on the untouched pipeline (vanilla), once on
the accelerated one (what really ran). Methods that move work at the denoiser boundary (T-GATE
drops the guidance half of the batch; batched decoders compute later steps inside an earlier
step's call) are where a sum over hooked modules went wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastdiff
from fastdiff import BlockCache, DeepCache, EarlyExit, EncoderPropagation, TGate
from fastdiff.core.ledger import _flops
from fastdiff.core.method import Method
from fastdiff.evals.bench import benchmark
from fastdiff.runner import GenerationRequest, call_kwargs

STEPS = 5
REQUEST = GenerationRequest(prompt="a red circle", steps=STEPS, height=32, width=32)
CLASS_REQUEST = GenerationRequest(prompt="1", steps=STEPS)  # DiT: a class label, its own size
EXITS = [2] * 5 + [1] * 5  # one depth per tenth of the noise range: the noisiest steps drop a block


def _block_cache(pipe) -> list[Method]:
    return [BlockCache.calibrate(pipe, ["a red circle"], steps=STEPS, threshold=0.3, height=32, width=32)]


# the benchmark is checked on the methods that change the denoiser call itself (the rest share its code path)
BENCHED = {"tgate", "encoder-batched", "earlyexit+tgate-pixart"}

CASES: dict[str, tuple[str, Callable[..., list[Method]]]] = {
    "deepcache-unet": ("sd", lambda pipe: [DeepCache(interval=3)]),
    "deepcache-dit": ("dit", lambda pipe: [DeepCache(interval=2)]),
    "blockcache": ("sd", _block_cache),
    "encoder-stepwise": ("sd", lambda pipe: [EncoderPropagation(key_steps=[0, 3])]),
    # steps 1 and 2 in one call made at step 1; step 4 alone
    "encoder-batched": ("sd", lambda pipe: [EncoderPropagation(key_steps=[0, 3], batch_decoders=True)]),
    "tgate": ("sd", lambda pipe: [TGate(gate_step=3)]),
    "earlyexit-dit": ("dit", lambda pipe: [EarlyExit(schedule=EXITS)]),
    "deepcache+tgate": ("sd", lambda pipe: [DeepCache(interval=2), TGate(gate_step=3)]),
    # skipped blocks behind a halved batch: the inner shadow pass has another shape than the outer
    "earlyexit+tgate-pixart": ("pixart", lambda pipe: [EarlyExit(schedule=EXITS), TGate(gate_step=3)]),
}


@pytest.fixture
def pipes(request):
    """The tiny pipelines by short name, each built only when a case asks for it."""
    names = {"sd": "sd_pipe", "dit": "dit_pipe", "pixart": "pixart_pipe"}
    return lambda name: request.getfixturevalue(names[name])


def request_for(pipe) -> GenerationRequest:
    return CLASS_REQUEST if type(pipe).__name__ == "DiTPipeline" else REQUEST


def generate(pipe) -> None:
    pipe(**call_kwargs(pipe, request_for(pipe)), output_type="np")


@contextlib.contextmanager
def per_call_flops(denoiser: torch.nn.Module) -> Iterator[list[int]]:
    """FLOPs of each call made to ``denoiser``, in order, counted by a FlopCounterMode opened and
    closed around the module's own ``__call__`` (so around every hook on it, not inside them)."""
    counts: list[int] = []
    open_counters: list[FlopCounterMode] = []

    def before(module: torch.nn.Module, args: tuple) -> None:
        counter = FlopCounterMode(display=False, depth=0)
        counter.__enter__()
        open_counters.append(counter)

    def after(module: torch.nn.Module, args: tuple, output: object) -> None:
        counter = open_counters.pop()
        counter.__exit__(None, None, None)
        counts.append(counter.get_total_flops())

    handles = [denoiser.register_forward_pre_hook(before), denoiser.register_forward_hook(after)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def denoiser_of(pipe) -> torch.nn.Module:
    return getattr(pipe, "unet", None) or pipe.transformer


@pytest.mark.parametrize("case", list(CASES))
def test_saved_is_vanilla_minus_run_for_every_method(case, pipes):
    pipe_name, make = CASES[case]
    pipe = pipes(pipe_name)
    methods = make(pipe)
    with per_call_flops(denoiser_of(pipe)) as vanilla:
        generate(pipe)  # nothing applied: the reference
    assert len(vanilla) == STEPS and all(f > 0 for f in vanilla)

    acc = fastdiff.apply(pipe, *methods, count_flops=True)
    with per_call_flops(denoiser_of(pipe)) as really_run:
        generate(pipe)
    report = acc.report()
    acc.remove()

    assert [s.flops_vanilla for s in report.steps] == vanilla
    assert [s.flops_run for s in report.steps] == really_run
    assert report.flops_vanilla == sum(vanilla)
    assert report.flops_run == sum(really_run)
    assert report.flops_saved == report.flops_vanilla - report.flops_run > 0
    assert [s.flops_saved for s in report.steps] == [v - r for v, r in zip(vanilla, really_run)]
    assert report.flop_ratio == report.flops_vanilla / report.flops_run
    assert f"ideal speedup {report.flop_ratio:.2f}x" in report.summary()
    table = str(report).splitlines()
    assert "vanilla" in table[1] and all(_flops(s.flops_saved) in row for s, row in zip(report.steps, table[2:]))

    if case not in BENCHED:
        return
    result = benchmark(pipe, methods, request_for(pipe), warmup=0, repeats=1)
    assert result.denoiser_flop_ratio == report.flop_ratio
    assert result.vanilla.denoiser_flops == report.flops_vanilla  # counted on the pipeline with nothing applied
    assert result.accelerated.denoiser_flops == report.flops_run
    assert f"ideal speedup {result.denoiser_flop_ratio:.2f}x" in result.report
    # the rest of the pipeline (text encoder, VAE) is the same work in both: the ledger's shadow
    # passes are not in the benchmark's whole-pipeline count
    rest = result.vanilla.pipeline_flops - result.vanilla.denoiser_flops
    assert result.accelerated.pipeline_flops - result.accelerated.denoiser_flops == rest > 0


def test_work_moved_between_steps_shows_per_step(sd_pipe):
    """Batched decoders: the step that computes its successors costs more than vanilla (a negative
    saving, kept as it is); the step it served costs nothing."""
    acc = fastdiff.apply(sd_pipe, EncoderPropagation(key_steps=[0, 3], batch_decoders=True), count_flops=True)
    generate(sd_pipe)
    steps = acc.report().steps
    assert steps[0].flops_saved == steps[3].flops_saved == 0  # key steps run as vanilla
    assert steps[1].flops_saved < 0  # the decoders of steps 1 and 2 in one call
    assert steps[2].flops_run == 0 and steps[2].flops_saved == steps[2].flops_vanilla
    assert 0 < steps[4].flops_saved < steps[4].flops_vanilla  # a decoder alone


def test_tgate_saving_counts_the_dropped_guidance_half(sd_pipe):
    acc = fastdiff.apply(sd_pipe, TGate(gate_step=3), count_flops=True)
    generate(sd_pipe)
    report = acc.report()
    # after the gate the UNet runs one half of the batch, so each step saves more than half of vanilla
    assert all(s.flops_saved > s.flops_vanilla / 2 for s in report.steps[3:])
    attributed = sum(m.flops_saved for m in report.modules)
    assert 0 < attributed < report.flops_saved  # per-module attribution does not see the batch drop


def _calls_of(module: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(1))
    return seen


def test_vanilla_is_measured_once_per_shape_and_only_when_counting(sd_pipe, pixart_pipe):
    seen = _calls_of(sd_pipe.unet.conv_in)
    acc = fastdiff.apply(sd_pipe, TGate(gate_step=3))
    generate(sd_pipe)
    assert len(seen) == STEPS  # not counting: no shadow pass at all
    acc.remove()
    seen.clear()
    # T-GATE: the pipeline's shape (the guidance batch) is measured once for the handle's life
    acc = fastdiff.apply(sd_pipe, TGate(gate_step=3), count_flops=True)
    generate(sd_pipe)
    generate(sd_pipe)
    assert len(seen) == 2 * STEPS + 1
    acc.remove()
    # early exit behind T-GATE: the halved batch is measured too (what a skipped block saves there)
    seen = _calls_of(pixart_pipe.transformer.pos_embed)
    acc = fastdiff.apply(pixart_pipe, EarlyExit(schedule=EXITS), TGate(gate_step=3), count_flops=True)
    generate(pixart_pipe)
    generate(pixart_pipe)
    assert len(seen) == 2 * STEPS + 2
    acc.remove()


def test_nothing_applied_measures_nothing_extra(sd_pipe):
    seen = _calls_of(sd_pipe.unet.conv_in)
    acc = fastdiff.apply(sd_pipe, count_flops=True)
    generate(sd_pipe)
    report = acc.report()
    assert len(seen) == STEPS
    assert report.flops_vanilla == report.flops_run and report.flops_saved == 0 and report.flop_ratio == 1.0

