"""The command line: generate writes a PNG, bench writes JSON, bad input exits with a message."""

import json
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from fastdiff.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_generate_writes_png(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny-sd", "--steps", "4", "--method", "deepcache:interval=2",
                 "--out", str(out), "--show-plan"]) == 0
    image = Image.open(out)
    image.verify()
    assert Image.open(out).size == (64, 64)
    printed = capsys.readouterr().out
    assert "Plan:" in printed and "saved" in printed and "ideal speedup" in printed


def test_generate_class_conditional(tmp_path):
    out = tmp_path / "dit.png"
    assert main(["generate", "--model", "tiny-dit", "--prompt", "1", "--steps", "2", "--out", str(out)]) == 0
    assert out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--method", "deepcache:interval"], "expected key=value"),
    (["--method", "warp:speed=9"], "unknown method 'warp'"),
    (["--model", "no-such-model-here"], "model"),
    (["--height", "30"], "argument --height: must be a multiple of 8"),
    (["--method", "deepcache:branch=40"], "branch=40 is deeper than this UNet has"),
    (["--method", "earlyexit:schedule=99/9"], "keeps 99 units but this UNet2DConditionModel is only"),
    (["--method", "earlyexit:schedule=1/2"], "may only stay or fall"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--steps", "2", "--out", str(tmp_path / "x.png"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bench_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-sd", "--steps", "6", "--method", "deepcache:interval=3",
                 "--warmup", "0", "--repeats", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["methods"] == ["deepcache:interval=3,branch=0"]
    for key in ("speedup", "flop_ratio", "denoiser_flop_ratio", "max_abs_diff", "psnr_db"):
        assert isinstance(result[key], float)
    assert result["flop_ratio"] > 1.0 and result["denoiser_flop_ratio"] > result["flop_ratio"]
    assert result["vanilla"]["pipeline_flops"] > result["accelerated"]["pipeline_flops"]
    assert 0 < result["max_abs_diff"] < 1
    assert "speedup" in capsys.readouterr().out


def test_bench_interval_one_is_exact(tmp_path):
    path = tmp_path / "bench.json"
    main(["bench", "--model", "tiny-sd", "--steps", "3", "--method", "deepcache:interval=1",
          "--warmup", "0", "--repeats", "1", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["max_abs_diff"] == 0.0 and result["flop_ratio"] == 1.0


def test_calibrate_then_generate_with_the_saved_calibration(tmp_path, capsys):
    calibration, plot = tmp_path / "calibration.json", tmp_path / "change.png"
    assert main(["calibrate", "--model", "tiny-sd", "--steps", "4", "--budget", "0.5", "--out", str(calibration),
                 "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "Plan:" in printed and "keeps" in printed and plot.stat().st_size > 1000
    assert json.loads(calibration.read_text())["num_steps"] == 4
    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny-sd", "--steps", "4", "--out", str(out),
                 "--method", f"blockcache:calibration={calibration},budget=0.5"]) == 0
    assert "blockcache:budget=0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", "tiny-sd", "--steps", "6", "--out", str(out),
              "--method", f"blockcache:calibration={calibration},budget=0.5"])
    assert exc.value.code == 2 and "calibrated for 4 steps" in capsys.readouterr().err


def test_calibrate_bad_option_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", "tiny-sd", "--steps", "3", "--granularity", "pixel",
              "--out", str(tmp_path / "c.json")])
    assert exc.value.code == 2 and "argument --granularity: invalid choice: 'pixel'" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_encoder_propagation_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny-sd", "--steps", "6", "--out", str(out), "--show-plan",
                 "--method", "encoder:key_steps=0/3,batch_decoders=true"]) == 0
    assert "conv_in [encoder]" in capsys.readouterr().out


def test_early_exit_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny-pixart", "--steps", "10", "--out", str(out), "--show-plan",
                 "--method", "earlyexit", "--method", "tgate:gate_step=5"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"transformer_blocks\.1 \[earlyexit\] +--########\n", printed)
    assert "earlyexit:schedule=demo" in printed
    # a calibrated schedule is measured before the timed runs
    assert main(["bench", "--model", "tiny-dit", "--steps", "4", "--repeats", "1", "--json", str(tmp_path / "b.json"),
                 "--method", "earlyexit:schedule=calibrated,tolerance=1e9"]) == 0
    assert "earlyexit:schedule=calibrated" in capsys.readouterr().out


def test_readme_quick_start_command_runs(tmp_path, monkeypatch):
    """The README's first command, minus the install, runs as written."""
    text = README.read_text()
    match = re.search(r"^pip install [^\n]*&& (fastdiff generate[^\n]*)$", text, re.MULTILINE)
    assert match, "README quick start must have: pip install ... && fastdiff generate ..."
    argv = shlex.split(match.group(1))[1:]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    out = argv[argv.index("--out") + 1]
    assert Image.open(tmp_path / out).format == "PNG"
