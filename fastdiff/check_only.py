"""``FASTDIFF_CHECK_ONLY=1``: check a command's whole request, then stop before any work.

Every command line of fastdiff (``fastdiff generate``, ``bench``, ``calibrate``, ``fid``,
``text``, the training and evaluation modules, the scripts in ``benchmarks/``) calls
:func:`exit_if_check_only` once, after everything it checks before loading weights. With the
variable set the command parses and validates its arguments exactly as for real and exits 0
with one line on stderr, in seconds. The documentation's hour-long commands are run this way by
the test suite, so a renamed flag or a stale value in them fails a test instead of a reader.

This module is imported by command lines before their heavy imports: keep it free of them.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "FASTDIFF_CHECK_ONLY"


def check_only() -> bool:
    """Whether ``FASTDIFF_CHECK_ONLY`` asks for a check only (set, and not 0/false/no/off)."""
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")


def exit_if_check_only(prog: str) -> None:
    """End the process with status 0 and ``PROG: check only: the request is valid`` on stderr
    when check-only mode is on; otherwise return and let the command do its work.

    Call it where a command has checked everything it can without loading a model: whatever it
    would refuse later is then refused in check mode too only if it is checked before this call.
    """
    if check_only():
        print(f"{prog}: check only: the request is valid", file=sys.stderr, flush=True)
        raise SystemExit(0)
