"""``FASTDIFF_CHECK_ONLY=1``: every command line validates its request as for real, then stops
with status 0 before loading a model or writing anything; a bad request still fails with 2."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff import check_only
from fastdiff.cli import main as fastdiff_main

ROOT = Path(__file__).resolve().parents[1]
SUDOKU = "000083001073000980002000030080000007000000520094510000007009000000027806900000002"


@pytest.fixture
def check_mode(monkeypatch):
    """Check-only mode on; loading any model is a test failure."""
    import fastdiff.runner

    def no_loading(*args, **kwargs):
        raise AssertionError("check-only mode loaded a model")

    # A module importing ``load`` by name holds its own reference: import it before the patch (or
    # it would keep the stand-in for the rest of the session) and patch it there as well.
    import fastdiff.evals.parallel_bench

    monkeypatch.setenv(check_only.ENV_VAR, "1")
    monkeypatch.setattr(fastdiff.runner, "load", no_loading)
    monkeypatch.setattr(fastdiff.evals.parallel_bench, "load", no_loading)


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _exit_code(call) -> int:
    with pytest.raises(SystemExit) as stopped:
        call()
    return stopped.value.code


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("", False), ("0", False), ("false", False),
                                       ("off", False)])
def test_the_variable(monkeypatch, value, on):
    monkeypatch.setenv(check_only.ENV_VAR, value)
    assert check_only.check_only() is on


def test_off_it_returns(monkeypatch):
    monkeypatch.delenv(check_only.ENV_VAR, raising=False)
    assert check_only.exit_if_check_only("fastdiff generate") is None


def _fastdiff_commands(tmp: Path) -> dict[str, list[str]]:
    prompts = tmp / "prompts.txt"
    prompts.write_text("a handwritten digit seven\n")
    real, fake = tmp / "real", tmp / "fake"
    for folder in (real, fake):
        folder.mkdir()
        for k in range(2):
            from PIL import Image

            Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(folder / f"{k}.png")
    return {
        "generate": ["generate", "--model", "digits", "--method", "deepcache:interval=3", "--out", str(tmp / "a.png")],
        "bench": ["bench", "--model", "tiny-sd", "--steps", "2", "--json", str(tmp / "b.json")],
        "bench --quality": ["bench", "--model", "digits", "--quality", "--method", "deepcache:interval=3",
                            "--json", str(tmp / "q.json")],
        "bench --parallel": ["bench", "--model", "tiny-sd", "--parallel", "2", "--threads", "1",
                             "--method", "patch:mode=pcpp", "--json", str(tmp / "p.json")],
        "calibrate": ["calibrate", "--model", "digits", "--steps", "10", "--out", str(tmp / "c.json")],
        "fid paired": ["fid", "--model", "digits", "--prompts", str(prompts), "--seeds", "0-3", "--method",
                       "deepcache:interval=3", "--out-dir", str(tmp / "runs"), "--features", "digits",
                       "--json", str(tmp / "f.json")],
        "fid folders": ["fid", str(real), str(fake), "--features", "digits", "--json", str(tmp / "g.json")],
        "text": ["text", "--prompt", "x", "--gen-length", "8", "--json", str(tmp / "t.json")],
    }


@pytest.mark.parametrize("name", ["generate", "bench", "bench --quality", "bench --parallel", "calibrate",
                                  "fid paired", "fid folders", "text"])
def test_fastdiff_valid_request_exits_0_and_writes_nothing(check_mode, tmp_path, capsys, name):
    argv = _fastdiff_commands(tmp_path)[name]
    before = _files(tmp_path)
    assert _exit_code(lambda: fastdiff_main(argv)) == 0
    assert _files(tmp_path) == before
    captured = capsys.readouterr()
    assert captured.err == f"fastdiff {argv[0]}: check only: the request is valid\n"
    assert captured.out == ""


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "digits", "--out", "x.txt"], "--out"),
    (["generate", "--model", "digits", "--method", "deepcache:interval=0"], "--method"),
    (["bench", "--model", "tiny-sd", "--threads", "1"], "--threads: only with --parallel"),
    (["calibrate", "--model", "digits", "--out", "c.txt"], "--out"),
    (["text", "--gen-length", "10", "--block-length", "3"], "--block-length"),
    (["fid", "--model", "digits", "--seeds", "0-3", "--features", "digits"], "--prompts"),
])
def test_fastdiff_invalid_request_still_exits_2(check_mode, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert _exit_code(lambda: fastdiff_main(argv)) == 2
    assert message in capsys.readouterr().err
    assert _files(tmp_path) == set()


def test_modules_valid_request(check_mode, tmp_path, capsys):
    from fastdiff.evals import text_bench
    from fastdiff.models import pydoc_text, sudoku_mdlm, train

    calls = {
        "python -m fastdiff.models.train": lambda: train.main(["digits", "--out", str(tmp_path / "d"), "--steps", "5"]),
        "python -m fastdiff.models.sudoku_mdlm": lambda: sudoku_mdlm.main(["solve", "--puzzle", SUDOKU]),
        "python -m fastdiff.models.pydoc_text": lambda: pydoc_text.main(["snapshot", "--out", str(tmp_path / "s")]),
        "python -m fastdiff.evals.text_bench": lambda: text_bench.main(["--prompts", "2", "--json",
                                                                        str(tmp_path / "t.json")]),
    }
    for prog, call in calls.items():
        assert _exit_code(call) == 0, prog
        assert capsys.readouterr().err == f"{prog}: check only: the request is valid\n"
    for argv in (["train", "--out", str(tmp_path / "m")], ["evaluate", "--puzzles", "3"]):
        assert _exit_code(lambda: sudoku_mdlm.main(argv)) == 0
    assert _files(tmp_path) == set()


def test_modules_invalid_request_still_exits_2(check_mode, capsys):
    from fastdiff.evals import text_bench
    from fastdiff.models import sudoku_mdlm, train

    for call in (lambda: sudoku_mdlm.main(["solve", "--puzzle", "123"]),
                 lambda: sudoku_mdlm.main(["train", "--minutes", "0"]),
                 lambda: sudoku_mdlm.main(["evaluate", "--puzzles", "0"]),
                 lambda: text_bench.main(["--seeds", "0"]),
                 lambda: train.main(["digits", "--steps", "many"])):
        assert _exit_code(call) == 2
    assert "check only" not in capsys.readouterr().err


def test_benchmark_script(check_mode, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["early_exit_dit.py", "--steps", "4"])
    assert _exit_code(lambda: runpy.run_path(str(ROOT / "benchmarks" / "early_exit_dit.py"),
                                             run_name="__main__")) == 0
    assert capsys.readouterr().err == "early_exit_dit.py: check only: the request is valid\n"


def test_importing_it_imports_nothing_heavy():
    code = "import sys, fastdiff.check_only; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
