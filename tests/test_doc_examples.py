"""Every ``bash``/``sh``/``shell``/``python`` block of README.md and docs/*.md is run as a test.

A reader copies these blocks first; a renamed flag, a moved function or a name that only exists
in the author's session must fail here, not on the reader's machine. The convention:

- A fenced block whose info string is ``bash``, ``sh``, ``shell`` or ``python`` is an example and
  is run; any other info string (``text``, ``json``, none) is output or an illustration. Look-alikes
  of a runnable language (``py``, ``console``, ``Python``, ...) are refused, so that nothing meant
  to run is silently left out.
- An HTML comment directly above the opening fence sets how a block runs:
  ``<!-- example: slow -->`` (only under ``-m slow``), ``<!-- example: check -->`` (every command
  with ``FASTDIFF_CHECK_ONLY=1``: the request is validated, no work is done),
  ``<!-- example: skip: REASON -->`` (not run; the reason is required) and
  ``<!-- example: replace: OLD => NEW -->`` (a textual substitution first; several are separated
  by ``;``). Modes combine: ``<!-- example: slow; replace: A => B -->``. Anything else is refused.
- The runnable blocks of one document run in order in one fresh working directory (a later block
  may read what an earlier one wrote), which holds a link to the repository's ``benchmarks/``
  folder (the documents run its scripts as ``python benchmarks/...``); the repository is on
  ``PYTHONPATH`` and this interpreter's ``bin`` folder (``fastdiff``, ``torchrun``, ``accelerate``)
  on ``PATH``; the hub is offline. Shell blocks run with ``bash -euo pipefail``, python blocks with
  this interpreter. A block passes when it exits 0; output is not compared.

The default suite validates every document's ``check`` blocks (about 0.1 s a command); the
``slow`` suite, which CI runs too, replays every document whole (every block that is not skipped,
in order, ``check`` blocks again in check mode), so a block may use what an earlier one wrote.
Executed blocks live in the slow suite because each one starts an interpreter that imports torch
and diffusers (8 s or more of CPU): all of them would cost several times the default suite's
budget. Untagged blocks are therefore quick to run, not free: the ``slow`` tag marks the ones of a
minute or more, so that a reader knows what to expect. A ``check`` block's fastdiff commands are validated
in this process (see ``RECORDER``): a subprocess would spend seconds importing torch per command.
``FASTDIFF_DOC_EXAMPLE_TIMEOUT`` (seconds, default 600) bounds each block.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python"}
# info strings that look meant to run but would be skipped by the rule above
LOOK_ALIKES = {"py", "py3", "python3", "pycon", "ipython", "ipython3", "console", "shell-session", "sh-session",
               "bash-session", "zsh", "fish", "ksh", "powershell", "ps1", "pwsh", "bat", "cmd", "terminal"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*example\s*:(?P<body>.*?)-->\s*$", re.IGNORECASE)
DIRECTIVE_START = re.compile(r"^\s*<!--\s*example\b", re.IGNORECASE)
STDERR_TAIL_LINES = 30
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")  # tqdm lines say nothing about a failure


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Example:
    """One runnable block and how its directive says to run it."""

    name: str  # the document, relative to the repository
    line: int  # of the opening fence, 1-based
    language: str  # "shell" or "python"
    code: str
    slow: bool = False
    check: bool = False
    skip: str | None = None
    replacements: tuple[tuple[str, str], ...] = field(default=())

    @property
    def where(self) -> str:
        return f"{self.name}:{self.line}"

    @property
    def mode(self) -> str:
        if self.skip is not None:
            return f"skip: {self.skip}"
        return "; ".join(m for m, on in (("slow", self.slow), ("check", self.check)) if on) or "default"

    def source(self) -> str:
        code = self.code
        for old, new in self.replacements:
            code = code.replace(old, new)
        return code


def parse_directive(body: str) -> dict:
    """The settings of ``<!-- example: BODY -->``; ValueError names what is not understood."""
    settings: dict = {"slow": False, "check": False, "skip": None, "replacements": []}
    items = body.split(";")
    after_replace = False
    for index, raw in enumerate(items):
        item = raw.strip()
        key, colon, value = item.partition(":")
        key = key.strip().lower()
        if not item:
            if index == len(items) - 1 and index > 0:
                continue  # a trailing ';'
            raise ValueError("empty setting")
        if key == "skip" and colon:
            reason = ";".join([value, *items[index + 1:]]).strip()
            if not reason:
                raise ValueError("skip needs a reason: <!-- example: skip: REASON -->")
            settings["skip"] = reason
            break
        if key == "skip":
            raise ValueError("skip needs a reason: <!-- example: skip: REASON -->")
        if item.lower() in ("slow", "check"):
            settings[item.lower()] = True
            after_replace = False
        elif key == "replace" and colon:
            settings["replacements"].append(_replacement(value))
            after_replace = True
        elif after_replace and "=>" in item:
            settings["replacements"].append(_replacement(item))
        else:
            raise ValueError(f"unknown setting {item!r} (known: slow, check, skip: REASON, replace: OLD => NEW)")
    return settings


def _replacement(text: str) -> tuple[str, str]:
    old, arrow, new = text.partition("=>")
    if not arrow or not old.strip():
        raise ValueError(f"replace needs OLD => NEW, got {text.strip()!r}")
    return old.strip(), new.strip()


def _dedent(line: str, indent: int) -> str:
    """A block line without the fence's own indentation (a fence inside a list item)."""
    strip = len(line) - len(line.lstrip(" "))
    return line[min(indent, strip):]


def parse_markdown(path: Path, root: Path = ROOT) -> tuple[list[Example], list[str]]:
    """The runnable blocks of one document, and every breach of the convention in it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(root).as_posix()
    examples: list[Example] = []
    errors: list[str] = []
    pending: tuple[int, dict | None] | None = None  # a directive on the previous line
    i = 0
    while i < len(lines):
        line = lines[i]
        opening = FENCE.match(line)
        if opening is None:
            if pending is not None:
                errors.append(f"{rel}:{pending[0]}: an example directive must be on the line directly above "
                              "a code fence")
                pending = None
            if DIRECTIVE_START.match(line):
                directive = DIRECTIVE.match(line)
                if directive is None:
                    errors.append(f"{rel}:{i + 1}: malformed directive {line.strip()!r}: write "
                                  "<!-- example: SETTINGS --> on one line")
                    pending = (i + 1, None)
                else:
                    try:
                        pending = (i + 1, parse_directive(directive["body"]))
                    except ValueError as exc:
                        errors.append(f"{rel}:{i + 1}: {exc}")
                        pending = (i + 1, None)
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        info = opening["info"].strip()
        language = info.split()[0] if info else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            stripped = lines[i].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.lstrip(fence[0]):
                break
            body.append(_dedent(lines[i], indent))
            i += 1
        else:
            errors.append(f"{rel}:{start + 1}: code fence is never closed")
        i += 1
        directive_line, settings = pending if pending is not None else (None, None)
        pending = None
        if language not in RUNNABLE:
            if language.lower() in RUNNABLE or language.lower() in LOOK_ALIKES:
                errors.append(f"{rel}:{start + 1}: code block language {language!r} is neither run nor plain output: "
                              "write ```bash or ```python for an example, ```text for output")
            elif directive_line is not None:
                errors.append(f"{rel}:{directive_line}: example directive above a {language or 'plain'!s} block, "
                              "which is not run")
            continue
        if directive_line is not None and settings is None:
            continue  # the malformed directive is reported; the block is not guessed at
        settings = settings or {"slow": False, "check": False, "skip": None, "replacements": []}
        code = "\n".join(body) + "\n"
        for old, _ in settings["replacements"]:
            if old not in code:
                errors.append(f"{rel}:{directive_line}: replace: {old!r} does not occur in the block")
        if settings["check"] and RUNNABLE[language] != "shell":
            errors.append(f"{rel}:{directive_line}: check applies to shell blocks (their commands), "
                          "not to a python block")
        examples.append(Example(rel, start + 1, RUNNABLE[language], code, slow=settings["slow"],
                                check=settings["check"], skip=settings["skip"],
                                replacements=tuple(settings["replacements"])))
    if pending is not None:
        errors.append(f"{rel}:{pending[0]}: an example directive must be on the line directly above a code fence")
    return examples, errors


def example_env(check: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env["HF_HUB_OFFLINE"] = "1"  # a hub id left in an example fails at once, not after retries
    env["MPLBACKEND"] = "Agg"
    env.pop("FASTDIFF_CHECK_ONLY", None)
    if check:
        env["FASTDIFF_CHECK_ONLY"] = "1"
    return env


def prepare_workdir(workdir: Path) -> None:
    link = workdir / "benchmarks"
    if not link.exists():
        link.symlink_to(ROOT / "benchmarks", target_is_directory=True)


@dataclass
class Outcome:
    returncode: int | None  # None: timed out
    seconds: float
    stdout: str
    stderr: str
    command: str | None = None  # in a check block, the command that failed


def run_example(example: Example, workdir: Path, timeout: float) -> Outcome:
    """Run one block in ``workdir``; a block that outlives ``timeout`` is killed with every
    process it started (launchers start workers in the same session)."""
    code = example.source()
    if example.check and example.language == "shell" and not os.environ.get("FASTDIFF_DOC_EXAMPLE_SUBPROCESS"):
        return _run_check_block(example, workdir, timeout)
    command = ["bash", "-euo", "pipefail", "-c", code] if example.language == "shell" else [sys.executable, "-c", code]
    return _run(command, workdir, example_env(example.check), timeout)


def _run(command: list[str], workdir: Path, env: dict[str, str], timeout: float) -> Outcome:
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        returncode = None
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return Outcome(returncode, time.perf_counter() - started, stdout, stderr)


# A check block's fastdiff commands would each spend seconds importing torch and diffusers only to
# stop at the check. Stand-ins for ``fastdiff``, ``python``, ``torchrun`` and ``accelerate`` on PATH
# record each fastdiff command (``fastdiff ...``, ``python -m fastdiff...``, ``python
# benchmarks/x.py``, a launcher's ``-m fastdiff...``) and return 0; the shell runs everything else
# as written; then each recorded command runs in this process, which has those imports already,
# with its own arguments, working directory and environment, and FASTDIFF_CHECK_ONLY=1.
# FASTDIFF_DOC_EXAMPLE_SUBPROCESS=1 runs check blocks as real processes instead.
RECORDER = """
import json, os, sys
name, args = sys.argv[1], sys.argv[2:]
REAL, BENCHMARKS = {real!r}, {benchmarks!r}

def record(kind, target, rest):
    with open(os.environ["FASTDIFF_DOC_RECORD"], "a", encoding="utf-8") as log:
        log.write(json.dumps({{"kind": kind, "target": target, "args": rest, "cwd": os.getcwd(),
                              "env": dict(os.environ), "command": [name, *args]}}) + "\\n")
    sys.exit(0)

def fastdiff_module(at):
    return len(args) > at + 1 and args[at] == "-m" and args[at + 1].split(".")[0] == "fastdiff"

if name == "fastdiff":
    record("fastdiff", None, args)
if name.startswith("python"):
    if fastdiff_module(0):
        record("module", args[1], args[2:])
    if args and args[0].endswith(".py") and os.path.realpath(args[0]).startswith(BENCHMARKS + os.sep):
        record("script", args[0], args[1:])
elif "-m" in args and (name == "torchrun" or args[:1] == ["launch"]) and fastdiff_module(args.index("-m")):
    at = args.index("-m")
    record("module", args[at + 1], args[at + 2:])
if REAL.get(name) is None:
    sys.exit(f"{{name}}: command not found")
os.execv(REAL[name], [REAL[name], *args])
"""
STAND_INS = ("fastdiff", "python", "python3", "torchrun", "accelerate")


def _install_stand_ins(folder: Path, path: str) -> None:
    real = {name: shutil.which(name, path=path) for name in STAND_INS}
    real["python"] = real["python3"] = sys.executable
    recorder = folder / "record.py"
    recorder.write_text(RECORDER.format(real=real, benchmarks=str((ROOT / "benchmarks").resolve())))
    for name in STAND_INS:
        stand_in = folder / name
        stand_in.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -S -E "{recorder}" {name} "$@"\n')
        stand_in.chmod(0o755)


def _run_check_block(example: Example, workdir: Path, timeout: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="fastdiff-doc-check-") as folder:
        env = example_env(check=True)
        _install_stand_ins(Path(folder), env["PATH"])
        env["PATH"] = os.pathsep.join((folder, env["PATH"]))
        env["FASTDIFF_DOC_RECORD"] = log = os.path.join(folder, "commands.jsonl")
        shell = _run(["bash", "-euo", "pipefail", "-c", example.source()], workdir, env, timeout)
        if shell.returncode != 0:
            return shell
        records = [json.loads(line) for line in Path(log).read_text().splitlines()] if os.path.exists(log) else []
    stdout, stderr, started = shell.stdout, shell.stderr, time.perf_counter()
    for record in records:
        status, out, err = replay(record)
        stdout, stderr = stdout + out, stderr + err
        if status != 0:
            return Outcome(status, shell.seconds + time.perf_counter() - started, stdout, stderr,
                           command=" ".join(record["command"]))
    return Outcome(0, shell.seconds + time.perf_counter() - started, stdout, stderr)


def replay(record: dict) -> tuple[int, str, str]:
    """One recorded command in this process: its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_env, saved_argv = os.getcwd(), dict(os.environ), sys.argv[:]
    os.chdir(record["cwd"])
    os.environ.clear()
    os.environ.update(record["env"])
    os.environ["FASTDIFF_CHECK_ONLY"] = "1"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # runpy's note that this process imported the module already: true, and harmless here
            warnings.filterwarnings("ignore", "'fastdiff", RuntimeWarning)
            try:
                if record["kind"] == "fastdiff":
                    from fastdiff.cli import main

                    status = main(record["args"])
                else:
                    sys.argv = [record["target"], *record["args"]]
                    if record["kind"] == "module":
                        runpy.run_module(record["target"], run_name="__main__", alter_sys=True)
                    else:
                        runpy.run_path(record["target"], run_name="__main__")
                    status = 0
            except SystemExit as stop:
                status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
                if not isinstance(stop.code, (int, type(None))):
                    print(stop.code, file=err)
            except Exception:
                traceback.print_exc(file=err)
                status = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
    return status or 0, out.getvalue(), err.getvalue()


def failure_message(example: Example, outcome: Outcome, timeout: float) -> str:
    status = f"ran past {timeout:g} s" if outcome.returncode is None else f"exit status {outcome.returncode}"
    output = outcome.stderr.strip() or outcome.stdout.strip()
    lines = [line for line in output.splitlines() if not PROGRESS_BAR.search(line)] or output.splitlines()
    tail = "\n".join(lines[-STDERR_TAIL_LINES:])
    replaced = " (after its replace: directive)" if example.replacements else ""
    command = f"--- the command that failed ---\n{outcome.command}\n" if outcome.command else ""
    return (f"{example.where}: {example.language} example failed ({status}, {example.mode})\n"
            f"--- the example{replaced} ---\n{example.source().rstrip()}\n{command}"
            f"--- last lines of its {'stderr' if outcome.stderr.strip() else 'stdout'} ---\n{tail}")


def _timeout() -> float:
    return float(os.environ.get("FASTDIFF_DOC_EXAMPLE_TIMEOUT", "600"))


def _run_document(path: Path, workdir: Path, *, checks_only: bool) -> None:
    examples, errors = parse_markdown(path)
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    prepare_workdir(workdir)
    timeout = _timeout()
    for example in examples:
        if example.skip is not None or (checks_only and not _checked_quickly(example)):
            continue
        outcome = run_example(example, workdir, timeout)
        if outcome.returncode != 0:
            pytest.fail(failure_message(example, outcome, timeout), pytrace=False)


PARSED = {path: parse_markdown(path) for path in doc_files()}


def _documents(select) -> list:
    return [pytest.param(path, id=path.name) for path, (examples, errors) in PARSED.items()
            if errors or any(select(e) for e in examples if e.skip is None)]


def test_every_directive_parses_and_every_skip_has_a_reason():
    errors = [error for _, found in PARSED.values() for error in found]
    assert not errors, "examples in the documents break the convention of tests/test_doc_examples.py:\n" + \
        "\n".join(errors)


def _checked_quickly(example: Example) -> bool:
    return example.check and not example.slow


@pytest.mark.parametrize("path", _documents(_checked_quickly))
def test_doc_examples(path: Path, tmp_path: Path):
    _run_document(path, tmp_path, checks_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", _documents(lambda e: True))
def test_doc_examples_slow(path: Path, tmp_path: Path):
    _run_document(path, tmp_path, checks_only=False)


# --- the parser itself, on small documents


def _parse(tmp_path: Path, text: str) -> tuple[list[Example], list[str]]:
    folder = tmp_path / "docs"
    folder.mkdir(exist_ok=True)
    doc = folder / "x.md"
    doc.write_text(text)
    return parse_markdown(doc, tmp_path)


def test_parser_modes_and_languages(tmp_path):
    examples, errors = _parse(tmp_path, "\n".join([
        "```bash", "echo default", "```",
        "<!-- example: slow; replace: hub/id => tiny-sd ; other => thing -->", "```python",
        "load('hub/id', 'other')", "```",
        "<!-- example: check -->", "```sh", "fastdiff generate", "```",
        "<!-- example: skip: needs a GPU; and CUDA -->", "```shell", "nvidia-smi", "```",
        "```text", "output", "```", "```", "plain", "```",
        "- in a list:", "", "  ```python", "  f(a,", "     b)", "  ```", "",
    ]))
    assert errors == []
    assert [(e.line, e.language, e.mode) for e in examples] == [
        (1, "shell", "default"), (5, "python", "slow"), (9, "shell", "check"),
        (13, "shell", "skip: needs a GPU; and CUDA"), (24, "python", "default")]
    assert examples[1].source() == "load('tiny-sd', 'thing')\n"
    assert examples[4].code == "f(a,\n   b)\n"


@pytest.mark.parametrize("text, message", [
    ("<!-- example: skip -->\n```bash\nx\n```\n", "skip needs a reason"),
    ("<!-- example: skip:   -->\n```bash\nx\n```\n", "skip needs a reason"),
    ("<!-- example: fast -->\n```bash\nx\n```\n", "unknown setting 'fast'"),
    ("<!-- example: slow\n-->\n```bash\nx\n```\n", "malformed directive"),
    ("<!-- example: slow -->\n\n```bash\nx\n```\n", "directly above"),
    ("<!-- example: slow -->\n```text\nx\n```\n", "not run"),
    ("```py\nx = 1\n```\n", "neither run nor plain output"),
    ("```console\n$ fastdiff\n```\n", "neither run nor plain output"),
    ("<!-- example: replace: a/b => c -->\n```bash\nx\n```\n", "does not occur"),
    ("<!-- example: check -->\n```python\nx = 1\n```\n", "check applies to shell blocks"),
    ("```bash\nx\n", "never closed"),
])
def test_parser_refuses(tmp_path, text, message):
    assert any(message in error for error in _parse(tmp_path, text)[1])


def test_failure_names_file_line_block_and_stderr(tmp_path):
    example = Example("README.md", 7, "shell", "echo start\nfalse_command_xyz --flag\n")
    outcome = run_example(example, tmp_path, timeout=30)
    assert outcome.returncode not in (0, None)
    message = failure_message(example, outcome, 30)
    assert message.startswith("README.md:7: shell example failed (exit status 127, default)")
    assert "false_command_xyz --flag" in message and "command not found" in message


def test_check_mode_and_environment_reach_the_block(tmp_path):
    script = (f'test -z "${{FASTDIFF_CHECK_ONLY:-}}"\n'
              f'test "$(dirname "$(command -v fastdiff)")" = "{Path(sys.executable).parent}"\n')
    outcome = run_example(Example("README.md", 1, "shell", script), tmp_path, timeout=30)
    assert outcome.returncode == 0, outcome.stderr
    outcome = run_example(Example("README.md", 1, "shell", 'test "$FASTDIFF_CHECK_ONLY" = 1\n', check=True),
                          tmp_path, timeout=30)
    assert outcome.returncode == 0, outcome.stderr


def test_check_block_validates_each_command_and_names_the_one_that_fails(tmp_path):
    prepare_workdir(tmp_path)
    script = ("printf 'a handwritten digit seven\\n' > prompts.txt\n"
              "fastdiff generate --model digits --method deepcache:interval=3 --out seven.png\n"
              "python -m fastdiff.models.train digits --out weights/digits\n"
              "python benchmarks/early_exit_dit.py --steps 3\n"
              "torchrun --nproc_per_node 2 -m fastdiff generate --model tiny-sd --method patch:mode=pcpp\n"
              "python -c 'import sys; sys.exit(0)'\n")
    outcome = run_example(Example("README.md", 3, "shell", script, check=True), tmp_path, timeout=60)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stderr.count("check only: the request is valid") == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks", "prompts.txt"]
    bad = Example("README.md", 9, "shell", "fastdiff generate --model digits --out seven.png\n"
                  "fastdiff generate --model digits --out seven.txt\n", check=True)
    outcome = run_example(bad, tmp_path, timeout=60)
    assert outcome.returncode == 2 and outcome.command == "fastdiff generate --model digits --out seven.txt"
    assert "--- the command that failed ---\nfastdiff generate --model digits --out seven.txt" in \
        failure_message(bad, outcome, 60)
