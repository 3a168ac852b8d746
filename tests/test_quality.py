"""The speed-quality evaluation on the trained digits model (small N: the machinery, not the numbers)."""

import json
import math

import pytest
from PIL import Image

import fastdiff
from fastdiff.cli import main

pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")


@pytest.fixture(scope="module")
def report():
    from fastdiff.evals.quality import evaluate_quality
    from fastdiff.models import build_builtin

    pipe = build_builtin("digits")
    variants = {"dc3": [fastdiff.DeepCache(interval=3)], "dc1": [fastdiff.DeepCache(interval=1)]}
    return evaluate_quality(pipe, variants, steps=10, baseline_steps=[5], samples=20, batch_size=10)


def test_settings_and_reference(report):
    assert [p.label for p in report.points] == ["vanilla", "vanilla 5 steps", "dc3", "dc1"]
    vanilla, fewer, dc3, dc1 = report.points
    assert vanilla.fid_vs_reference is None and vanilla.psnr_vs_reference is None
    assert dc1.psnr_vs_reference == math.inf and dc1.fid_vs_reference < 1e-6  # reuses nothing
    assert math.isfinite(dc3.psnr_vs_reference)
    assert dc1.fid_real == pytest.approx(vanilla.fid_real)
    assert all(0.0 <= p.adherence <= 1.0 for p in report.points)


def test_costs_are_counted(report):
    vanilla, fewer, dc3, dc1 = report.points
    assert fewer.denoiser_gflops_per_image == pytest.approx(vanilla.denoiser_gflops_per_image / 2)
    assert dc1.denoiser_gflops_per_image == pytest.approx(vanilla.denoiser_gflops_per_image)
    assert dc3.denoiser_gflops_per_image < 0.8 * vanilla.denoiser_gflops_per_image
    assert "adherence" in str(report)


def test_plot(report, tmp_path):
    from fastdiff.evals.quality import plot_speed_quality

    path = tmp_path / "plot.png"
    plot_speed_quality(report, path)
    assert Image.open(path).format == "PNG"


def test_cli_quality(tmp_path):
    out = tmp_path / "q.json"
    assert main(["bench", "--model", "digits", "--quality", "--steps", "6", "--baseline-steps", "3",
                 "--samples", "10", "--batch-size", "10", "--method", "deepcache:interval=2",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [p["label"] for p in data["points"]] == ["vanilla", "vanilla 3 steps", "deepcache:interval=2,branch=0"]
    assert out.with_suffix(".png").exists()


def test_cli_quality_on_the_transformer_with_a_variant_at_fewer_steps(tmp_path):
    out = tmp_path / "q.json"
    assert main(["bench", "--model", "digits-sd3", "--quality", "--steps", "6", "--baseline-steps", "3",
                 "--samples", "4", "--batch-size", "4", "--variant", "deepcache:interval=2@4",
                 "--json", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [(p["label"], p["steps"]) for p in points] == [("vanilla", 6), ("vanilla 3 steps", 3),
                                                         ("deepcache:interval=2,branch=0@4", 4)]
    assert points[2]["denoiser_gflops_per_image"] < points[1]["denoiser_gflops_per_image"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-sd", "--method", "deepcache"], "use --model digits or digits-sd3"),
    (["--model", "digits"], "needs at least one --method, --variant or --peer"),
    (["--model", "digits", "--variant", "deepcache@0"], "the step count must be >= 1"),
    (["--model", "digits", "--variant", "deepcache@x"], "expected a step count"),
    (["--model", "digits", "--method", "deepcache", "--baseline-steps", "0"], "expected step counts >= 1"),
])
def test_cli_quality_bad_input(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quality", "--json", str(tmp_path / "q.json"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
