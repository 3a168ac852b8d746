"""Checks a command line runs on its whole request before any work starts.

A user's mistake found after a model has loaded, a process group has started or an image has
been generated costs them that time and may leave half-written output behind. So every
argument that can be judged without running the model (numbers, paths to read, paths to
write) is judged here, and each failure names the argument it is about. Argument types raise
``argparse.ArgumentTypeError`` (argparse adds the option's name); the rest raise
:class:`UsageError`, which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = [
    "UsageError",
    "check_input_file",
    "check_input_folder",
    "check_output_file",
    "check_output_folder",
    "float_range",
    "int_at_least",
    "multiple_of_8",
    "one_line",
    "require_packages",
]


class UsageError(ValueError):
    """A request the user can fix; the message names the argument and what is allowed."""


def one_line(message: object) -> str:
    """A message on one line: tracebacks and multi-line library messages folded, so that an
    error is exactly one line of the terminal's output."""
    return " ".join(str(message).split())


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def float_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """A float within bounds; ``*_open`` excludes the bound itself."""
    left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    allowed = " and ".join(part for part in (left, right) if part) or "a number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number ({allowed}), got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or value != value:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    parse.__name__ = f"number {allowed}"
    return parse


def multiple_of_8(text: str) -> int:
    """Image sides: the VAE and the UNet halve the size three times."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8, got {text!r}") from None
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 and >= 8, got {value}")
    return value


def _probe_folder(folder: Path, argument: str, target: Path) -> None:
    """Whether a file can be created in ``folder``: try it (permission bits do not tell, for
    root or on special file systems such as /proc); the probe is removed at once."""
    if not folder.is_dir():
        raise UsageError(f"{argument}: cannot write {str(target)!r}: {str(folder)!r} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fastdiff-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"{argument}: cannot write {str(target)!r}: folder {str(folder)!r} does not take new "
                         f"files ({reason})") from None


def check_output_file(argument: str, path: str | os.PathLike | None,
                      suffixes: Iterable[str] | None = None, kind: str | None = None) -> None:
    """``path`` can be written (its folder exists and takes files) and, if ``suffixes`` is given,
    has one of them (``kind`` names them when the list is long). A missing folder is refused,
    not made: a mistyped path would otherwise leave a tree of folders the user did not mean.
    Nothing is left behind by the check."""
    if path is None:
        return
    target = Path(os.path.expanduser(os.fspath(path)))
    if suffixes is not None:
        allowed = sorted({s.lower() for s in suffixes})
        if target.suffix.lower() not in allowed:
            raise UsageError(f"{argument}: {str(path)!r} must end in {kind or 'one of ' + ', '.join(allowed)}")
    if target.is_dir():
        raise UsageError(f"{argument}: {str(path)!r} is a folder; give a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{argument}: cannot write {str(path)!r}: the file is read-only")
    _check_parent(argument, target, "cannot write")
    _probe_folder(target.parent, argument, target)


def check_output_folder(argument: str, path: str | os.PathLike | None) -> None:
    """``path`` is a folder that exists and takes files, or one whose parent exists: a command
    makes the last level of an output folder, never a tree of missing parents (as for files)."""
    if path is None:
        return
    target = Path(os.path.expanduser(os.fspath(path)))
    if target.exists() and not target.is_dir():
        raise UsageError(f"{argument}: {str(path)!r} is a file, not a folder")
    if target.is_dir():
        _probe_folder(target, argument, target)
        return
    _check_parent(argument, target, "cannot create folder",
                  "; fastdiff creates only the last level of an output folder")
    _probe_folder(target.parent, argument, target)


def _check_parent(argument: str, target: Path, action: str, note: str = "") -> None:
    parent = target.parent
    if not parent.exists():
        missing = next(p for p in reversed((parent, *parent.parents)) if not p.exists())
        raise UsageError(f"{argument}: {action} {str(target)!r}: folder {str(missing)!r} does not exist"
                         f" (create it first{note})")


def check_input_file(argument: str, path: str | os.PathLike | None) -> None:
    _check_input(argument, path, folder=False)


def check_input_folder(argument: str, path: str | os.PathLike | None) -> None:
    _check_input(argument, path, folder=True)


def _check_input(argument: str, path: str | os.PathLike | None, folder: bool) -> None:
    if path is None:
        return
    target = Path(os.path.expanduser(os.fspath(path)))
    kind = "folder" if folder else "file"
    if not target.exists():
        raise UsageError(f"{argument}: no such {kind} {str(path)!r}")
    if target.is_dir() != folder:
        raise UsageError(f"{argument}: {str(path)!r} is not a {kind}")
    if not os.access(target, os.R_OK | (os.X_OK if folder else 0)):
        raise UsageError(f"{argument}: cannot read {kind} {str(path)!r} (permission denied)")


# Optional packages by import name: what pip calls them, and the extra of pyproject.toml that
# brings them (None: in no extra, installed on its own).
OPTIONAL_PACKAGES: dict[str, tuple[str, str | None]] = {
    "matplotlib": ("matplotlib", "eval"),
    "scipy": ("scipy", "eval"),
    "sklearn": ("scikit-learn", "eval"),
    "torchmetrics": ("torchmetrics", "eval"),
    "torch_fidelity": ("torch-fidelity", None),
}


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (some take seconds). A name set
    to None in ``sys.modules`` counts as missing, as ``import`` treats it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_packages(argument: str, *modules: str) -> None:
    """Refuse, before any work, a request whose ``argument`` needs optional packages that are
    not installed, naming them and the pip command that installs them (the extra, where one
    has them all). Every command checks its optional dependencies here, so that none of them
    computes for an hour and then fails on a missing import while writing its result."""
    missing = [m for m in dict.fromkeys(modules) if not _installed(m)]
    if not missing:
        return
    names = [OPTIONAL_PACKAGES.get(m, (m, None))[0] for m in missing]
    extras = {OPTIONAL_PACKAGES.get(m, (m, None))[1] for m in missing}
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if len(extras) == 1 and None not in extras:
        install = f'pip install -e ".[{extras.pop()}]" (or pip install {" ".join(names)})'
    else:
        install = f"pip install {' '.join(names)}"
    raise UsageError(f"{argument} needs {listed}: {install}")


def run_subcommand(parser: argparse.ArgumentParser, prog: str,
                   run: Callable[[argparse.ArgumentParser, argparse.Namespace], int],
                   argv: Sequence[str] | None = None) -> int:
    """The ``python -m`` command lines share one contract: a bad argument is one line and exit 2
    before any work (``run`` gets the subcommand's own parser to blame), Ctrl-C one line and 130."""
    args = parser.parse_args(argv)
    try:
        return run(parser.commands[args.command], args)  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        parser.exit(130, f"{prog} {args.command}: interrupted\n")
