"""The dependency bounds in pyproject.toml are the ones CI tests: every lower bound is pinned in
.ci/lowest-constraints.txt (installed and tested by .ci/run's second stage), and the fast-moving
packages carry an upper bound, so a new release cannot reach a fresh install untested."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
FAST_MOVING = ("torch", "diffusers", "transformers", "accelerate")


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    listed = project["dependencies"] + extras["eval"] + [r for r in extras["test"] if r.startswith("pytest")]
    return [Requirement(r) for r in listed]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = Version(version.strip())
    return pins


def test_every_lower_bound_is_the_pinned_tested_one():
    pins = _pins()
    lower = {}
    for requirement in _requirements():
        bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert len(bounds) == 1, f"{requirement}: one tested lower bound (>=)"
        lower[requirement.name.lower()] = bounds[0]
    assert lower == pins


def test_fast_moving_packages_stop_below_the_next_untested_release():
    for requirement in _requirements():
        caps = [Version(s.version) for s in requirement.specifier if s.operator == "<"]
        if requirement.name.lower() in FAST_MOVING:
            assert len(caps) == 1, f"{requirement}: an upper bound below the next untested release"
            assert caps[0] > _pins()[requirement.name.lower()]


def test_ci_installs_both_ends():
    script = (ROOT / ".ci" / "run").read_text()
    newest, lowest = script.split("-c .ci/lowest-constraints.txt")
    assert "python -m pytest\n" in newest and "\npython -m pytest" in lowest
