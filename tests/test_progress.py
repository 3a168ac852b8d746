"""Progress bars over long work: calibration, the quality bench and paired FID generation.

Each shows one diffusers tqdm bar on stderr that says what it is doing, is silenced by
``show_progress=False`` and by ``diffusers.utils.logging.disable_progress_bar()``, and leaves
the pipeline's own progress-bar configuration exactly as it found it.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

import fastdiff
from fastdiff import BlockCache, EarlyExit
from fastdiff.evals.fidelity import paired_fidelity
from fastdiff.runner import GenerationRequest

SMALL = {"height": 32, "width": 32}
BAR = "%|"  # every tqdm bar line: "desc:  50%|█████     | 2/4 [...]"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """tiny-sd's kernels are too small to gain from threads; on a shared 2-core machine the pool's
    spin-waiting only slows every call down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bars_disabled():
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()


@pytest.fixture
def configured(sd_pipe):
    """tiny-sd with a progress-bar configuration of the user's own, to be found intact afterwards."""
    config = {"disable": True, "leave": False}
    sd_pipe._progress_bar_config = config
    return sd_pipe, config


def test_blockcache_calibration_shows_one_bar(configured, capsys):
    pipe, config = configured
    BlockCache.calibrate(pipe, ["a red circle", "a blue square"], steps=3, budget=0.5, **SMALL)
    err = capsys.readouterr().err
    assert "calibrating blockcache on 2 prompts × 3 steps" in err
    assert BAR in err and "6/6" in err and ("step/s" in err or "s/step" in err)
    assert pipe._progress_bar_config is config and config == {"disable": True, "leave": False}


def test_aligned_calibration_counts_both_passes(sd_pipe, capsys):
    BlockCache.calibrate(sd_pipe, "a red circle", steps=2, budget=0.5, align=True, **SMALL)
    err = capsys.readouterr().err
    assert "calibrating blockcache on 1 prompt × 2 steps, 2 passes" in err and "4/4" in err


def test_early_exit_calibration_shows_one_bar(configured, capsys):
    pipe, config = configured
    EarlyExit.calibrate(pipe, "a red circle", steps=3, buckets=2, **SMALL)
    err = capsys.readouterr().err
    assert "calibrating earlyexit on 1 prompt × 3 steps" in err and BAR in err and "3/3" in err
    assert pipe._progress_bar_config is config


def test_calibration_silenced(sd_pipe, capsys, bars_disabled):
    BlockCache.calibrate(sd_pipe, "a red circle", steps=2, budget=0.5, show_progress=True, **SMALL)
    diffusers_logging.enable_progress_bar()
    BlockCache.calibrate(sd_pipe, "a red circle", steps=2, budget=0.5, show_progress=False, **SMALL)
    EarlyExit.calibrate(sd_pipe, "a red circle", steps=2, buckets=2, show_progress=False, **SMALL)
    err = capsys.readouterr().err
    assert "calibrating" not in err and BAR not in err


def test_inner_bars_stay_off_and_config_comes_back(sd_pipe, capsys):
    """A pipeline that shows its own bar shows none during calibration, and shows it again after."""
    del sd_pipe._progress_bar_config  # never configured: diffusers' defaults, bar on
    BlockCache.calibrate(sd_pipe, "a red circle", steps=2, budget=0.5, show_progress=False, **SMALL)
    assert capsys.readouterr().err.count(BAR) == 0
    assert "_progress_bar_config" not in vars(sd_pipe)
    sd_pipe("a red circle", num_inference_steps=2, output_type="np", **SMALL)
    assert BAR in capsys.readouterr().err


@pytest.mark.parametrize("method", ["blockcache", "earlyexit"])
def test_config_restored_when_calibration_fails(configured, capsys, method):
    pipe, config = configured
    with pytest.raises(ValueError, match="divisible by 8"):  # raised inside the pipeline call
        if method == "blockcache":
            BlockCache.calibrate(pipe, "a red circle", steps=2, budget=0.5, height=36, width=36)
        else:
            EarlyExit.calibrate(pipe, "a red circle", steps=2, height=36, width=36)
    assert pipe._progress_bar_config is config and config == {"disable": True, "leave": False}
    assert f"calibrating {method}" in capsys.readouterr().err


def _paired(pipe, methods, out_dir, show_progress=True):
    return paired_fidelity(pipe, methods, "0-2", ["a red car"], out_dir, request=GenerationRequest(steps=2, **SMALL),
                           features="digits", batch_size=2, show_progress=show_progress)


def test_paired_generation_bar_per_setting(configured, capsys, tmp_path):
    pipe, config = configured
    result = _paired(pipe, [BlockCache(budget=0.5)], tmp_path)  # calibrated on the way, with its own bar
    assert result.generated == 6
    err = capsys.readouterr().err
    assert "vanilla 2 steps" in err and "blockcache:budget=0.5" in err and "3/3" in err and "img" in err
    assert "calibrating blockcache on 1 prompt × 2 steps" in err
    assert err.index("vanilla 2 steps") < err.index("calibrating") < err.index("blockcache:budget=0.5")
    assert pipe._progress_bar_config is config


def test_paired_generation_silenced(sd_pipe, capsys, tmp_path):
    _paired(sd_pipe, [BlockCache(budget=0.5)], tmp_path, show_progress=False)
    err = capsys.readouterr().err
    assert BAR not in err and "vanilla" not in err and "calibrating" not in err


def test_quality_bench_bar_per_setting(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("torchmetrics")
    from fastdiff.evals.quality import evaluate_quality
    from fastdiff.models import build_builtin

    pipe = build_builtin("digits")
    before = vars(pipe).get("_progress_bar_config")
    variants = {"deepcache:interval=2": [fastdiff.DeepCache(interval=2)]}
    evaluate_quality(pipe, variants, steps=2, baseline_steps=[1], samples=2, batch_size=1)
    err = capsys.readouterr().err
    for desc in ("vanilla 2 steps", "vanilla 1 step", "deepcache:interval=2"):
        assert f"{desc}: 100%|" in err
    assert "2/2" in err and ("img/s" in err or "s/img" in err)
    assert vars(pipe).get("_progress_bar_config") == before

    evaluate_quality(pipe, variants, steps=2, baseline_steps=[], samples=2, batch_size=2, show_progress=False)
    assert BAR not in capsys.readouterr().err
