"""``fastdiff --help`` answers at once: help, version and mistakes on the command line load no
torch, diffusers or transformers (seconds each), and ``import fastdiff`` loads them only when a
name that needs them is first used. Checked by what a fresh interpreter has imported, not by
timing, so the checks hold on a loaded machine too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastdiff
from fastdiff import catalog
from fastdiff.cli import build_parser

HEAVY = ("torch", "diffusers", "transformers")

_RUN_MAIN = """
import json, sys
from fastdiff.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"codes": codes, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (HEAVY,)


def _fresh(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_help_version_and_usage_errors_load_nothing_heavy():
    argvs = [["--help"], ["--version"], ["generate", "--help"], ["bench", "--help"], ["fid", "--help"],
             ["calibrate", "--help"], ["text", "--help"],
             ["generate", "--method", "nope"], ["generate", "--steps", "0"], ["bench", "--bogus"],
             ["text", "--bogus"]]
    run = _fresh("-c", _RUN_MAIN, json.dumps(argvs))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["codes"] == [0] * 7 + [2] * 4
    assert result["heavy"] == []


def test_import_fastdiff_is_lazy():
    code = ("import sys, fastdiff; assert fastdiff.__version__; dir(fastdiff); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,))
    run = _fresh("-c", code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_public_names_and_subpackages_load_on_first_use():
    for name in fastdiff.__all__:
        assert getattr(fastdiff, name) is not None, name
    assert fastdiff.DeepCache is fastdiff.caching.DeepCache
    assert fastdiff.apply is fastdiff.core.apply
    assert fastdiff.PatchParallel is fastdiff.parallel.PatchParallel
    for sub in ("models", "pipelines", "schedulers", "evals", "caching", "parallel", "core", "anatomy"):
        assert getattr(fastdiff, sub).__name__ == f"fastdiff.{sub}"
        assert sub in dir(fastdiff)
    assert callable(fastdiff.models.load_pipeline)  # the README's fastdiff.models.load_pipeline("tiny-sdxl")
    assert set(fastdiff.__all__) <= set(dir(fastdiff))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        fastdiff.nonexistent  # noqa: B018


def test_console_script_and_module_answer_help():
    script = shutil.which("fastdiff", path=str(Path(sys.executable).parent)) or shutil.which("fastdiff")
    if script is None:
        pytest.skip("the fastdiff console script is not installed")
    for command in ([script, "--help"], [sys.executable, "-m", "fastdiff", "--help"]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("usage: fastdiff") and "generate" in run.stdout


def _help(*argv: str) -> str:
    parser = build_parser()
    command = parser.commands[argv[0]] if argv else parser  # type: ignore[attr-defined]
    return " ".join(command.format_help().split())


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_help_teaches_method_specs_and_models(command):
    text = _help(command)
    for example, _ in catalog.METHOD_SPECS.values():
        assert example in text
    assert "forecast=hold|ab2|ab3" in text
    for model in catalog.BUILTIN_MODELS:
        assert model in text
    assert "(default: digits)" in text and "(default: 0)" in text  # --model, --seed


@pytest.mark.parametrize("command", ["generate", "bench", "fid", "calibrate", "text"])
def test_help_shows_every_default(command):
    parser = build_parser().commands[command]  # type: ignore[attr-defined]
    for action in parser._actions:
        if action.default is None or action.default is False or action.default == [] or action.dest == "help":
            continue
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        assert "default" in formatter.format_help(), (command, action.option_strings)
