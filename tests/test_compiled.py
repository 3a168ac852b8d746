"""Methods on compiled denoisers: both ways users compile, in either order with ``apply``.

What must hold: the output is the uncompiled method's; the only graph breaks are at fastdiff's
hooks (never a clock read, an ``.item()`` or a data-dependent branch); a second call compiles
nothing; ``remove`` gives the user's compiled modules back; what cannot work is refused before
any call, with the reason, and leaves the pipeline as it was.

Dynamo's ``eager`` backend traces exactly as inductor does (same graphs, breaks and guards)
without generating kernels, so these run in seconds; one inductor run is in the slow suite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import fastdiff
from fastdiff import DeepCache, EarlyExit, PatchParallel, TGate
from fastdiff.compilation import compile_pipeline, regional_block_classes
from fastdiff.core.accelerator import find_denoiser
from fastdiff.core.compiled import RECOMPILE_LIMIT, CompileError, graphs_compiled
from fastdiff.media import pipeline_outputs
from fastdiff.models import build_builtin

STEPS = 4
EAGER = {"backend": "eager"}


def _call(pipe, seed: int = 0) -> np.ndarray:
    result = pipe("3", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="np")
    return np.asarray(pipeline_outputs(result), dtype=np.float32)


def _pipe(name: str):
    pipe = build_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compile(pipe, way: str) -> None:
    if way == "wrap":  # what a user who writes torch.compile(model) gets: an OptimizedModule in its place
        name, denoiser = find_denoiser(pipe)
        setattr(pipe, name, torch.compile(denoiser, **EAGER))
    else:
        compile_pipeline(pipe, way, EAGER)


def _compiled_modules(pipe) -> dict[str, object]:
    _, denoiser = find_denoiser(pipe)
    return {path: module.__dict__.get("_compiled_call_impl") for path, module in denoiser.named_modules()
            if module.__dict__.get("_compiled_call_impl") is not None}


def _breaks() -> dict[str, int]:
    return {reason.splitlines()[0][:160]: count for reason, count in counters["graph_break"].items()}


CASES = [
    pytest.param("tiny-sd3", "regional", "before", lambda: DeepCache(interval=2), id="tiny-sd3-regional-before"),
    pytest.param("tiny-sd3", "full", "after", lambda: EarlyExit(schedule=[1.0] * 5 + [0.5] * 5),
                 id="tiny-sd3-full-after"),
    pytest.param("tiny-sd3", "wrap", "before", lambda: DeepCache(interval=2, forecast="ab2"), id="tiny-sd3-wrap-before"),
    pytest.param("tiny-sd", "regional", "after", lambda: TGate(gate_step=2, fi_interval=2),  # hooks inside compiled blocks
                 id="tiny-sd-regional-after", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, way, order, method", CASES)
def test_method_on_a_compiled_denoiser(name: str, way: str, order: str, method) -> None:
    pipe = _pipe(name)
    limit = torch._dynamo.config.recompile_limit
    acc = fastdiff.apply(pipe, method())
    expected = _call(pipe)
    acc.remove()
    torch._dynamo.reset()

    if order == "before":
        _compile(pipe, way)
    acc = fastdiff.apply(pipe, method())
    if order == "after":
        _compile(pipe, way)
    user_compiled = _compiled_modules(pipe)
    counters.clear()
    first = _call(pipe)
    assert acc.compiled
    assert torch._dynamo.config.recompile_limit == max(limit, RECOMPILE_LIMIT)  # a UNet's shapes need more
    assert graphs_compiled() > 0  # it really ran through the compiler
    reasons = _breaks()
    assert all("torch.compiler.disable" in reason for reason in reasons), reasons  # only at fastdiff's hooks
    np.testing.assert_array_equal(first, expected)  # eager backend: the very same operators

    made = graphs_compiled()
    second = _call(pipe)
    assert graphs_compiled() == made  # nothing compiles again
    np.testing.assert_array_equal(second, expected)
    acc.remove()
    assert torch._dynamo.config.recompile_limit == limit
    if way != "wrap":
        restored = _compiled_modules(pipe)
        assert set(restored) >= set(user_compiled)  # taken-over modules have their compiled calls back
        assert all(restored[path] is call for path, call in user_compiled.items())


def test_a_new_step_count_compiles_nothing() -> None:
    pipe = _pipe("tiny-sd3")
    compile_pipeline(pipe, "regional", EAGER)
    fastdiff.apply(pipe, DeepCache(interval=2))
    _call(pipe)
    made = graphs_compiled()
    pipe("3", num_inference_steps=STEPS + 3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert graphs_compiled() == made  # decisions are taken outside the graphs, by step index


def test_fullgraph_around_fastdiffs_decisions_is_refused_and_nothing_changes() -> None:
    pipe = _pipe("tiny-sd3")
    compile_pipeline(pipe, "full", {**EAGER, "fullgraph": True})
    before = _compiled_modules(pipe)
    with pytest.raises(CompileError, match=r"transformer: compiled with fullgraph=True around "
                                           r"transformer\.transformer_blocks\.\d.*compile_repeated_blocks"):
        fastdiff.apply(pipe, DeepCache(interval=2))
    assert "acceleration" not in pipe.__dict__ and _compiled_modules(pipe) == before
    assert getattr(find_denoiser(pipe)[1], "_diffusers_hook", None) is None or not \
        find_denoiser(pipe)[1]._diffusers_hook.hooks

    regional = _pipe("tiny-sd3")  # fullgraph on the blocks fastdiff decides for: their graphs stay whole
    compile_pipeline(regional, "regional", {**EAGER, "fullgraph": True})
    acc = fastdiff.apply(regional, DeepCache(interval=2))
    _call(regional)
    acc.remove()


def test_compiling_after_apply_into_fullgraph_is_refused_before_the_first_call() -> None:
    pipe = _pipe("tiny-sd3")
    acc = fastdiff.apply(pipe, DeepCache(interval=2))
    name, denoiser = find_denoiser(pipe)
    setattr(pipe, name, torch.compile(denoiser, backend="eager", fullgraph=True))
    with pytest.raises(CompileError, match=r"fullgraph=True\) around the whole denoiser"):
        _call(pipe)
    assert acc.clock.denoiser_calls == 0


def test_patch_parallelism_refuses_a_compiled_denoiser() -> None:
    pipe = _pipe("tiny-sd3")
    compile_pipeline(pipe, "regional", EAGER)
    with pytest.warns(UserWarning, match="one process"):
        with pytest.raises(CompileError, match="PatchParallel cannot run with a compiled transformer: every "
                                               "convolution"):
            fastdiff.apply(pipe, PatchParallel())
    assert "acceleration" not in pipe.__dict__


def test_regional_compile_uses_diffusers_repeated_blocks_or_the_anatomy() -> None:
    flux = _pipe("tiny-flux")
    assert regional_block_classes(flux.transformer) == tuple(flux.transformer._repeated_blocks)
    sd3 = _pipe("tiny-sd3")
    assert not getattr(sd3.transformer, "_repeated_blocks", None)  # diffusers 0.42 declares none for SD3
    assert regional_block_classes(sd3.transformer) == ("JointTransformerBlock",)
    compiled = compile_pipeline(sd3, "regional", EAGER)
    assert compiled == [f"transformer.transformer_blocks.{i}" for i in range(len(sd3.transformer.transformer_blocks))]
    with pytest.raises(ValueError, match="already compiled"):
        compile_pipeline(sd3, "full")
    with pytest.raises(ValueError, match=r"compile: must be one of \['none', 'regional', 'full'\], got 'partial'"):
        compile_pipeline(flux, "partial")
    assert compile_pipeline(flux, "none") == []


@pytest.mark.slow
def test_compiled_bench_reports_compile_time_and_graphs_apart() -> None:
    from fastdiff.evals.bench import benchmark
    from fastdiff.runner import GenerationRequest

    pipe = _pipe("tiny-sd3")
    request = GenerationRequest(prompt="3", steps=STEPS, height=32, width=32)
    result = benchmark(pipe, [DeepCache(interval=2)], request, warmup=1, repeats=1, show_progress=False,
                       compile="regional", compile_options=EAGER)
    assert result.compile == "regional"
    assert result.vanilla.graphs_first_call > 0 and result.vanilla.graphs_later == 0
    assert result.accelerated.graphs_later == 0
    assert result.vanilla.compile_s is not None and result.vanilla.compile_s >= 0
    assert result.vanilla.pipeline_flops > result.accelerated.pipeline_flops > 0  # counted eagerly, apart
    assert "compiled (regional) for both" in str(result)
    with pytest.raises(ValueError, match="warm-up"):
        benchmark(_pipe("tiny-sd3"), [], request, warmup=0, compile="regional")


# -- attention backends ------------------------------------------------------------------------------
def test_tgate_under_diffusers_attention_backends() -> None:
    """Wan's attention goes through diffusers' dispatcher: T-GATE's hooks sit on the attention
    modules, so whichever backend computes inside, the gate works and reuses nothing when told so."""
    from diffusers.models.attention_dispatch import attention_backend

    pipe = _pipe("tiny-wan")
    kwargs = dict(num_inference_steps=STEPS, num_frames=5, height=32, width=32, output_type="np")

    def call() -> np.ndarray:
        return np.asarray(pipeline_outputs(pipe("3", generator=torch.Generator().manual_seed(0), **kwargs)))

    vanilla = call()
    gated = {}
    for backend in ("native", "_native_math"):
        with attention_backend(backend):
            acc = fastdiff.apply(pipe, TGate(gate_step=STEPS, sp_interval=1))  # reuses nothing
            np.testing.assert_allclose(call(), vanilla, atol=1e-5)
            acc.remove()
            acc = fastdiff.apply(pipe, TGate(gate_step=2))
            gated[backend] = call()
            assert acc.report().module_calls_avoided > 0
            acc.remove()
    np.testing.assert_allclose(gated["native"], gated["_native_math"], atol=1e-5)
    assert not np.array_equal(gated["native"], vanilla)


def test_patch_parallel_refuses_a_backend_whose_kernel_it_cannot_reach() -> None:
    from fastdiff.parallel.patch_parallel import check_attention_backends

    pipe = _pipe("tiny-flux")
    paths = [path for path, module in pipe.transformer.named_modules() if hasattr(module, "processor")][:2]
    check_attention_backends(pipe.transformer, paths)  # native: fine
    processor = dict(pipe.transformer.named_modules())[paths[0]].processor
    processor._attention_backend = "flash"  # what set_attention_backend("flash") records on a GPU
    with pytest.raises(ValueError, match=rf"attention '{paths[0]}' runs on the 'flash' attention backend.*"
                                         r"'native'"):
        check_attention_backends(pipe.transformer, paths)


# -- every family × every method, both ways of compiling (slow) --------------------------------------
def _matrix_cases() -> list[tuple[str, str]]:
    from test_family_matrix import BUILTINS

    return [(name, way) for names in BUILTINS.values() for name in names for way in ("regional", "full")]


@pytest.mark.slow
@pytest.mark.parametrize("name, way", _matrix_cases(), ids=[f"{n}-{w}" for n, w in _matrix_cases()])
def test_every_method_compiled(name: str, way: str) -> None:
    from test_family_matrix import METHODS, Subjects, refusal, reusing

    subject = Subjects()[name]
    methods = {m: reusing(m, subject) for m in METHODS if not refusal(m, subject.anatomy)}
    eager = {}
    for label, method in methods.items():
        acc = fastdiff.apply(subject.pipe, method)
        eager[label] = subject.call()
        acc.remove()
    torch._dynamo.reset()
    for index, (label, method) in enumerate(methods.items()):
        acc = fastdiff.apply(subject.pipe, method)
        if index == 0:  # the first method is applied before compiling, the others after
            compile_pipeline(subject.pipe, way, EAGER)
        counters.clear()
        np.testing.assert_array_equal(subject.call(), eager[label], err_msg=label)
        assert all("torch.compiler.disable" in reason for reason in _breaks()), (label, _breaks())
        made = graphs_compiled()
        subject.call()
        assert graphs_compiled() == made, label
        acc.remove()


@pytest.mark.slow
def test_inductor_output_matches_eager() -> None:
    pipe = _pipe("tiny-sd3")
    methods = [DeepCache(interval=2, forecast="ab2"), EarlyExit(schedule=[1.0] * 5 + [0.5] * 5)]
    eager = []
    for method in methods:
        acc = fastdiff.apply(pipe, method)
        eager.append(_call(pipe))
        acc.remove()
    compile_pipeline(pipe, "regional")  # torch.compile's defaults: inductor
    for method, expected in zip(methods, eager):
        acc = fastdiff.apply(pipe, method)
        output = _call(pipe)
        made = graphs_compiled()
        _call(pipe)
        assert graphs_compiled() == made
        acc.remove()
        assert np.abs(output - expected).max() <= 1e-4 * np.abs(expected).max(), method


def test_flops_are_counted_eagerly_on_a_compiled_denoiser() -> None:
    pipe = _pipe("tiny-sd3")
    acc = fastdiff.apply(pipe, DeepCache(interval=2), count_flops=True)
    _call(pipe)
    eager = acc.report()
    acc.remove()
    compile_pipeline(pipe, "regional", EAGER)
    acc = fastdiff.apply(pipe, DeepCache(interval=2), count_flops=True)
    _call(pipe)
    compiled = acc.report()
    acc.remove()
    assert compiled.flops_run == eager.flops_run > 0 and compiled.flops_vanilla == eager.flops_vanilla
