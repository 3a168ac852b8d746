"""Every subcommand against a table of wrong inputs: exit code 2, one line on stderr that names
the argument, no traceback, nothing written, no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastdiff.cli import main

INPUTS = "inputs"  # a folder of valid inputs the wrong ones sit beside; everything else must stay empty


def _children() -> set[int]:
    """Live child processes of this one (Linux). multiprocessing's resource tracker, which lives
    as long as this process once anything was spawned, is not a leftover."""
    found: set[int] = set()
    for task in Path("/proc/self/task").glob("*"):
        try:
            found |= {int(pid) for pid in (task / "children").read_text().split()}
        except OSError:
            continue
    alive = set()
    for pid in found:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"resource_tracker" not in command and state != "Z":
            alive.add(pid)
    return alive


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / INPUTS
    (inputs / "images").mkdir(parents=True)
    (inputs / "prompts.txt").write_text("a handwritten digit seven\n")
    (inputs / "not-json.json").write_text("this is not json")
    (inputs / "a-file").write_text("x")
    return tmp_path


# (subcommand and its arguments, text the one line must contain). {in} is the inputs folder.
CASES = [
    # top level
    ([], "command"),
    (["warp"], "invalid choice: 'warp'"),
    # generate: numbers, names, files to read, files to write, model-dependent values
    (["generate", "--steps", "0"], "--steps"),
    (["generate", "--steps", "many"], "--steps"),
    (["generate", "--seed", "-1"], "--seed"),
    (["generate", "--height", "30"], "--height"),
    (["generate", "--guidance-scale", "-1"], "--guidance-scale"),
    (["generate", "--dtype", "float8"], "--dtype"),
    (["generate", "--device", "tpu"], "--device"),
    (["generate", "--method", "warp:speed=9"], "--method"),
    (["generate", "--method", "deepcache:interval=0"], "--method"),
    (["generate", "--method", "deepcache:interval"], "--method"),
    (["generate", "--method", "deepcache:forecast=ab9"], "forecast"),
    (["generate", "--method", "earlyexit:forecast=ab2"], "forecast"),
    (["generate", "--model", "tiny-sd", "--steps", "4", "--method", "encoder:key_steps=0/1,forecast=ab3"], "forecast"),
    (["generate", "--method", "blockcache:calibration=missing.json"], "--method"),
    (["generate", "--method", "blockcache:calibration={in}/not-json.json"], "--method"),
    (["generate", "--method", "blockcache:calibration={in}"], "--method"),
    (["generate", "--model", "./no-such-folder"], "--model"),
    (["generate", "--model", "{in}/a-file"], "--model"),
    (["generate", "--out", "/proc/nope/x.png"], "--out"),
    (["generate", "--out", "x.txt"], "--out"),
    (["generate", "--out", "{in}"], "--out"),
    (["generate", "--model", "tiny-sd", "--steps", "2", "--method", "deepcache:branch=40"], "branch=40"),
    (["generate", "--model", "tiny-sd", "--steps", "2", "--method", "deepcache", "--method", "encoder"],
     "both claim"),
    (["generate", "--model", "tiny-sd", "--steps", "2", "--method", "earlyexit:schedule=1/2"], "schedule"),
    (["generate", "--model", "tiny-sd", "--frames", "5"], "--frames"),
    (["generate", "--model", "tiny-wan", "--frames", "0"], "--frames"),
    (["generate", "--model", "tiny-wan", "--out", "video.jpg"], "--out"),
    # requests the loaded pipeline cannot run, refused before its first call
    (["generate", "--model", "digits", "--steps", "1000"], "--steps: 1000 steps is more than"),
    (["generate", "--model", "tiny-sd", "--steps", "1000"], "--steps: 1000 steps is more than"),
    (["generate", "--model", "tiny-sd", "--steps", "1000"], "at most 999"),
    (["generate", "--model", "tiny-sd", "--height", "1000000", "--width", "1000000"], "--height/--width"),
    (["generate", "--model", "tiny-sd", "--height", "1000000", "--width", "1000000"], "at most about"),
    (["generate", "--model", "tiny-dit", "--prompt", "99999"], "--prompt: class 99999"),
    (["generate", "--model", "tiny-dit", "--prompt", "99999"], "0-999"),
    (["generate", "--model", "tiny-dit", "--prompt", "a cat"], "golden retriever (207)"),
    (["generate", "--method", "blockcache:calibration={in}/prompts.txt"], "is not a calibration file"),
    (["generate", "--model", "no-such-model"], "or a Hugging Face Hub id"),
    # an output file's folder must exist (never made); an output folder's parent must exist
    (["generate", "--out", "missing/x.png"], "--out: cannot write 'missing/x.png': folder 'missing' does not exist"),
    (["generate", "--out", "{in}/missing/deeper/x.png"], "folder '{in}/missing' does not exist"),
    (["calibrate", "--out", "missing/c.json"], "--out"),
    (["calibrate", "--plot", "missing/c.png"], "--plot"),
    (["bench", "--json", "missing/b.json"], "--json"),
    (["bench", "--quality", "--method", "deepcache", "--plot", "missing/p.png"], "--plot"),
    (["fid", "{in}/images", "{in}/images", "--json", "missing/f.json"], "--json"),
    (["fid", "--model", "digits", "--prompts", "{in}/prompts.txt", "--seeds", "0-3", "--out-dir", "missing/o"],
     "--out-dir: cannot create folder 'missing/o': folder 'missing' does not exist"),
    (["text", "--json", "missing/t.json"], "--json"),
    # refused before Block Caching's calibration would run
    (["calibrate", "--model", "tiny-sd", "--steps", "2", "--method", "deepcache"], "--method"),
    (["generate", "--model", "tiny-sd", "--steps", "2", "--method", "blockcache", "--method", "deepcache"],
     "both claim"),
    # bench
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["bench", "--json", "/proc/nope/b.json"], "--json"),
    (["bench", "--variant", "deepcache"], "--variant"),
    (["bench", "--threads", "1"], "--threads"),
    (["bench", "--samples", "10"], "--samples"),
    (["bench", "--quality", "--samples", "1"], "--samples"),
    (["bench", "--quality", "--baseline-steps", "0"], "--baseline-steps"),
    (["bench", "--quality", "--model", "tiny-sd", "--method", "deepcache"], "--quality"),
    (["bench", "--quality"], "--quality"),
    (["bench", "--quality", "--parallel", "2", "--method", "deepcache"], "--quality"),
    (["bench", "--quality", "--method", "deepcache", "--plot", "p.gif"], "--plot"),
    (["bench", "--quality", "--peer", "fastcache"], "--peer"),
    (["bench", "--quality", "--peer", "fbc:thresh=0.1"], "threshold"),
    (["bench", "--quality", "--peer", "fbc:threshold=high"], "--peer"),
    (["bench", "--quality", "--peer", "fbc:threshold"], "--peer"),
    (["bench", "--quality", "--peer", "all:threshold=1"], "--peer"),
    (["bench", "--peer", "fbc"], "--peer"),
    (["bench", "--seed-noise"], "--seed-noise"),
    (["bench", "--compile", "partial"], "--compile"),
    (["bench", "--compile", "regional", "--warmup", "0"], "--warmup: at least 1 with --compile"),
    (["bench", "--compile", "regional", "--quality", "--method", "deepcache"], "--compile: only with the timing bench"),
    (["bench", "--compile", "full", "--parallel", "2", "--method", "patch"], "--compile: only with the timing bench"),
    (["generate", "--model", "tiny-sd", "--steps", "2", "--compile", "regional", "--method", "patch"],
     "--compile regional: --method patch:mode=distrifusion"),
    (["bench", "--parallel", "2", "--threads", "1", "--method", "patch", "--variant", "patch@3"], "@steps only with --quality"),
    (["bench", "--quality", "--model", "tiny-sd3", "--peer", "fbc"], "--quality"),
    (["bench", "--parallel", "1", "--method", "patch"], "--parallel"),
    (["bench", "--parallel", "64", "--method", "patch"], "--parallel"),
    (["bench", "--parallel", "2", "--threads", "0", "--method", "patch"], "--threads"),
    (["bench", "--parallel", "2", "--threads", "1", "--method", "patch", "--method", "patch"], "--parallel"),
    (["bench", "--model", "tiny-sd", "--height", "16", "--width", "16", "--parallel", "2", "--threads", "1",
      "--method", "patch"], "--parallel"),
    # calibrate
    (["calibrate", "--budget", "1.5"], "--budget"),
    (["calibrate", "--budget", "0"], "--budget"),
    (["calibrate", "--threshold", "-1"], "--threshold"),
    (["calibrate", "--budget", "0.5", "--threshold", "0.1"], "--threshold"),
    (["calibrate", "--granularity", "pixel"], "--granularity"),
    (["calibrate", "--cache", "everything"], "--cache"),
    (["calibrate", "--out", "c.txt"], "--out"),
    (["calibrate", "--out", "/proc/nope/c.json"], "--out"),
    (["calibrate", "--plot", "c.gif"], "--plot"),
    # fid, folder mode
    (["fid", "missing-real", "{in}/images"], "REAL_DIR"),
    (["fid", "{in}/a-file", "{in}/images"], "REAL_DIR"),
    (["fid", "{in}/images", "missing-fake"], "FAKE_DIR"),
    (["fid", "{in}/images"], "FAKE_DIR"),
    (["fid", "{in}/images", "{in}/images"], "{in}/images"),  # an empty folder
    (["fid", "{in}/images", "{in}/images", "--steps", "3"], "--steps"),
    (["fid", "{in}/images", "{in}/images", "--batch-size", "0"], "--batch-size"),
    (["fid", "{in}/images", "{in}/images", "--inception-weights", "missing.pth"], "--inception-weights"),
    (["fid", "{in}/images", "{in}/images", "--json", "/proc/nope/f.json"], "--json"),
    # fid, paired mode
    (["fid", "--model", "digits", "--prompts", "missing.txt", "--seeds", "0-3", "--out-dir", "o"], "--prompts"),
    (["fid", "--model", "digits", "--prompts", "{in}/prompts.txt", "--seeds", "3-0", "--out-dir", "o"], "--seeds"),
    (["fid", "--model", "digits", "--prompts", "{in}/prompts.txt", "--seeds", "0-3", "--out-dir", "{in}/a-file"],
     "--out-dir"),
    (["fid", "--model", "digits", "--prompts", "{in}/prompts.txt", "--seeds", "0-3", "--out-dir", "/proc/nope"],
     "--out-dir"),
    (["fid", "--model", "digits", "--prompts", "{in}/prompts.txt", "--seeds", "0-3", "--out-dir", "o",
      "--real", "missing"], "--real"),
    (["fid", "--model", "digits", "--prompts", "{in}/prompts.txt", "--out-dir", "o"], "--seeds"),
    (["fid", "--model", "./no-such-folder", "--prompts", "{in}/prompts.txt", "--seeds", "0-3", "--out-dir", "o"],
     "--model"),
    # text
    (["text", "--gen-length", "0"], "--gen-length"),
    (["text", "--steps", "0"], "--steps"),
    (["text", "--block-length", "0"], "--block-length"),
    (["text", "--gen-length", "16", "--block-length", "5"], "--block-length"),
    (["text", "--gen-length", "16", "--block-length", "4", "--steps", "2"], "--steps"),
    (["text", "--temperature", "-1"], "--temperature"),
    (["text", "--cfg-scale", "-0.5"], "--cfg-scale"),
    (["text", "--sampler", "warp"], "--sampler"),
    (["text", "--sampler", "fast-dllm:threshold=high"], "--sampler"),
    (["text", "--model", "./no-such-lm"], "--model"),
    (["text", "--json", "/proc/nope/t.json"], "--json"),
]


@pytest.mark.parametrize("argv, names", CASES, ids=[" ".join(a) or "(none)" for a, _ in CASES])
def test_wrong_input_is_one_line_and_exit_2(workdir, capsys, argv, names):
    inputs = str(workdir / INPUTS)
    argv = [a.replace("{in}", inputs) for a in argv]
    before = _children()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    command = argv[0] if argv and argv[0] in ("generate", "bench", "calibrate", "fid", "text") else None
    assert lines[0].startswith(f"fastdiff {command}: error: " if command else "fastdiff: error: "), lines[0]
    assert names.replace("{in}", inputs) in lines[0]
    assert "Traceback" not in err + out
    assert sorted(p.name for p in workdir.iterdir()) == [INPUTS], "nothing may be written"
    assert not any((workdir / INPUTS / "images").iterdir())
    assert _children() <= before, "no process may be left behind"


def test_cuda_device_without_cuda_is_refused(workdir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--device", "cuda"])
    assert exc.value.code == 2 and "--device" in capsys.readouterr().err


def test_more_processes_than_memory_allows_is_refused_before_any_starts(monkeypatch):
    from fastdiff.parallel import group

    monkeypatch.setattr(group, "available_memory_bytes", lambda: 3 * 2**30)
    monkeypatch.setattr(group, "available_cores", lambda: 64)
    with pytest.raises(ValueError, match=r"--parallel: 8 processes need about 8.0 GiB .* at most 3 processes"):
        group.check_processes_fit(8, "cpu", process_bytes=2**30)
    group.check_processes_fit(2, "cpu", process_bytes=2**30)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import fastdiff.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_generate", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["generate"])
    assert exc.value.code == 130
    assert capsys.readouterr().err == "fastdiff generate: interrupted\n"


def _sleep(rank: int) -> None:
    time.sleep(120)


def test_interrupted_launch_leaves_no_process_behind():
    """Ctrl-C while the harness waits on its processes stops every one of them."""
    from fastdiff.parallel.launch import run_processes

    before = _children()
    # A shell starts background jobs with SIGINT ignored; Ctrl-C is what is tested, so restore it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_processes(2, _sleep)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    time.sleep(0.5)
    assert not (_children() - before)


def _killed_or_sleep(rank: int) -> None:
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer does
    time.sleep(120)


@pytest.mark.slow
def test_a_process_killed_from_outside_is_reported_and_the_others_stopped():
    from fastdiff.parallel.launch import run_processes

    before = _children()
    started = time.perf_counter()
    outcomes = run_processes(2, _killed_or_sleep)
    assert outcomes == [("killed", "SIGKILL"), ("lost", None)]
    assert time.perf_counter() - started < 60
    time.sleep(0.5)
    assert not (_children() - before)


@pytest.mark.slow
def test_the_installed_command_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastdiff", "generate", "--out", "/proc/nope/x.png"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fastdiff generate: error: --out: cannot write '/proc/nope/x.png': folder '/proc/nope' does not exist "
        "(create it first)"]
    assert not any(tmp_path.iterdir())


# A missing optional package is refused before any work, naming the extra that brings it; the
# package is made missing the way `import` sees it (None in sys.modules).
MISSING_EXTRAS = [
    ("matplotlib", ["calibrate", "--plot", "p.png", "--out", "c.json"],
     '--plot needs matplotlib: pip install -e ".[eval]"'),
    ("sklearn", ["bench", "--quality", "--method", "deepcache", "--json", "q.json"],
     '--quality needs scikit-learn: pip install -e ".[eval]"'),
    ("matplotlib", ["bench", "--quality", "--method", "deepcache", "--json", "q.json"],
     '--quality needs matplotlib: pip install -e ".[eval]"'),
    ("torchmetrics", ["fid", "--model", "digits", "--prompts", "{in}/prompts.txt", "--seeds", "0-3", "--features",
                      "digits", "--out-dir", "pairs"], 'FID needs torchmetrics: pip install -e ".[eval]"'),
    ("scipy", ["fid", "{in}/images", "{in}/images", "--features", "digits"],
     'FID needs scipy: pip install -e ".[eval]"'),
]


@pytest.mark.parametrize("module, argv, message", MISSING_EXTRAS,
                         ids=[f"{m}: {' '.join(a[:2])}" for m, a, _ in MISSING_EXTRAS])
def test_a_missing_extra_is_refused_before_any_work(workdir, capsys, monkeypatch, module, argv, message):
    import fastdiff.cli as cli

    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(cli, "_load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    argv = [a.replace("{in}", str(workdir / INPUTS)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.strip().splitlines() == [f"fastdiff {argv[0]}: error: {message} (or pip install "
                                        f"{'scikit-learn' if module == 'sklearn' else module})"]
    assert sorted(p.name for p in workdir.iterdir()) == [INPUTS], "nothing may be written"


def test_the_dependency_check_names_every_missing_package(monkeypatch):
    from fastdiff.cli_checks import UsageError, require_packages

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(UsageError,
                       match=r'^--quality needs scipy, scikit-learn and matplotlib: pip install -e "\.\[eval\]"'):
        require_packages("--quality", "scipy", "sklearn", "matplotlib")
    with pytest.raises(UsageError, match=r"^--features inception needs torch-fidelity: pip install torch-fidelity$"):
        require_packages("--features inception", "torch_fidelity")
