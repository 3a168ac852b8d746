"""Every denoiser family × every single-device method, generated from the anatomy's registry.

For each pair either the method works — set to reuse nothing, the output is vanilla's bit for
bit; set to reuse, the Ledger shows exactly the planned decisions and the output stays close to
vanilla without equalling it — or ``apply`` refuses with a message that names the method, the
denoiser class, its family and why, and leaves the pipeline exactly as it was.

Which pairs refuse is read from the anatomy (``REFUSALS``), so adding a family is one line in
``BUILTINS``; the README's family × method table is checked against the same rule.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import fastdiff
from fastdiff import BlockCache, Decision, DeepCache, EarlyExit, EncoderPropagation, TGate
from fastdiff.anatomy import FAMILIES, Anatomy, anatomy_of
from fastdiff.core.accelerator import find_denoiser
from fastdiff.core.method import Method
from fastdiff.media import pipeline_outputs
from fastdiff.models import build_builtin, builtin_info
from fastdiff.runner import GenerationRequest, call_kwargs

# The tiny built-ins that stand for each family.
BUILTINS: dict[str, tuple[str, ...]] = {
    "unet": ("tiny-sd", "tiny-sdxl"),
    "dit": ("tiny-dit",),
    "pixart": ("tiny-pixart",),
    "sd3": ("tiny-sd3",),
    "flux": ("tiny-flux",),
    "wan": ("tiny-wan",),
}
# Families the anatomy describes that no tiny built-in stands for yet (each needs its own text
# encoder stack built offline); a newly registered family must be put in one of the two.
NO_BUILTIN = frozenset({"sana", "qwenimage", "cogvideox", "hunyuanvideo", "flux2"})

STEPS = 4
METHODS = ("deepcache", "blockcache", "encoder", "tgate", "earlyexit")
README_COLUMNS = {"DeepCache": "deepcache", "Block Caching": "blockcache", "encoder propagation": "encoder",
                  "T-GATE": "tgate", "early exiting": "earlyexit"}

# When a method refuses a denoiser, read from its anatomy, and what the refusal must explain.
REFUSALS: dict[str, tuple[Callable[[Anatomy], bool], str]] = {
    "encoder": (lambda a: not a.is_unet, r"needs a UNet with an encoder/decoder split.* is a transformer"),
    "tgate": (lambda a: not a.attention_paths("cross"), r"needs a denoiser with cross-attention .* has none: "),
}


def refusal(method: str, anatomy: Anatomy) -> str | None:
    """The pattern the refusal message must match, or ``None`` when the method applies."""
    rule = REFUSALS.get(method)
    return rule[1] if rule is not None and rule[0](anatomy) else None


# -- one pipeline per built-in for the whole module ------------------------------------------------
@dataclass
class Subject:
    name: str
    pipe: DiffusionPipeline
    kwargs: dict[str, Any]  # the call, without its generator
    vanilla: np.ndarray
    seed_spread: float  # mean |difference| between two vanilla seeds: what "close" is measured against
    calibration: Any = None  # Block Caching's, measured once

    def call(self, seed: int = 0) -> np.ndarray:
        result = self.pipe(**self.kwargs, generator=torch.Generator().manual_seed(seed), output_type="np")
        return np.asarray(pipeline_outputs(result), dtype=np.float32)

    @property
    def anatomy(self) -> Anatomy:
        return anatomy_of(find_denoiser(self.pipe)[1])

    @classmethod
    def of(cls, name: str, pipe: DiffusionPipeline) -> Subject:
        """``pipe`` (built-in ``name``, any dtype) with its example call and vanilla output."""
        pipe.set_progress_bar_config(disable=True)
        request = GenerationRequest(prompt=builtin_info(name).example_prompt, steps=STEPS).with_model_defaults(name)
        kwargs = call_kwargs(pipe, request)
        kwargs.pop("generator")
        subject = cls(name, pipe, kwargs, np.empty(0), 0.0)
        subject.vanilla = subject.call()
        subject.seed_spread = float(np.abs(subject.call(seed=1) - subject.vanilla).mean())
        return subject


class Subjects:
    def __init__(self) -> None:
        self.built: dict[str, Subject] = {}

    def __getitem__(self, name: str) -> Subject:
        if name not in self.built:
            self.built[name] = Subject.of(name, build_builtin(name))
        return self.built[name]


@pytest.fixture(scope="module")
def subjects() -> Iterator[Subjects]:
    yield Subjects()


def _calibration(subject: Subject) -> Any:
    if subject.calibration is None:
        extra = {k: v for k, v in subject.kwargs.items() if k in ("height", "width", "guidance_scale", "num_frames")}
        method = BlockCache.calibrate(subject.pipe, [builtin_info(subject.name).example_prompt], steps=STEPS,
                                      threshold=1e-12, show_progress=False, **extra)
        subject.calibration = method.calibration
    return subject.calibration


# -- per method: a setting that reuses nothing, and one that reuses ----------------------------------
def reuse_nothing(method: str, subject: Subject) -> Method:
    if method == "deepcache":
        return DeepCache(interval=1)  # a full pass at every step
    if method == "blockcache":  # δ below any measured change: every block computes at every step
        return BlockCache(threshold=1e-12, calibration=_calibration(subject))
    if method == "encoder":
        return EncoderPropagation(interval=1)  # every step a key step
    if method == "tgate":  # the gate at the last step, self-attention at every step before it
        return TGate(gate_step=STEPS, sp_interval=1)
    return EarlyExit(schedule=[1.0])  # full depth at every noise level


def reusing(method: str, subject: Subject) -> Method:
    if method == "deepcache":
        return DeepCache(interval=2)
    if method == "blockcache":
        return BlockCache(budget=0.5, calibration=_calibration(subject))
    if method == "encoder":
        return EncoderPropagation(key_steps=(0, 2))
    if method == "tgate":
        return TGate(gate_step=2, fi_interval=2)
    return EarlyExit(schedule=[1.0] * 5 + [0.5] * 5)  # half the depth in the noisier half of the timesteps


# -- checks -----------------------------------------------------------------------------------------
def ledger_follows_plan(acc: fastdiff.core.accelerator.Accelerator) -> None:
    """Every planned (module, step) was executed as planned, once per denoiser call that ran."""
    plan = acc.plan
    call = acc.clock.call_index
    seen: dict[tuple[str, int], list[Decision]] = defaultdict(list)
    for event in acc.ledger.modules:
        if event.call == call:
            seen[(event.module, event.step)].append(event.decision)
    calls = {s.step: s.denoiser_calls for s in acc.report().steps}  # calls that ran (answered ones did not)
    assert sorted(calls) == list(range(plan.num_steps))
    for module, row in plan.rows.items():
        for step, decision in enumerate(row):
            assert seen[(module, step)] == [decision] * calls[step], (module, step)


def pipeline_state(pipe: DiffusionPipeline) -> tuple:
    """What ``apply`` may change: the pipeline's class and attributes, and hooks on any module."""
    hooked = []
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for path, module in component.named_modules():
                registry = getattr(module, "_diffusers_hook", None)
                hooked.append((path, None if registry is None else tuple(registry.hooks), "forward" in module.__dict__))
    return type(pipe), tuple(sorted(pipe.__dict__)), tuple(hooked)


CASES = [(family, name, method) for family in FAMILIES for name in BUILTINS.get(family, ()) for method in METHODS]


@pytest.mark.parametrize("family, name, method", CASES, ids=[f"{f}-{n}-{m}" for f, n, m in CASES])
def test_method_on_family(subjects: Subjects, family: str, name: str, method: str) -> None:
    subject = subjects[name]
    anatomy = subject.anatomy
    assert anatomy.family == family
    pattern = refusal(method, anatomy)
    if pattern is not None:
        before = pipeline_state(subject.pipe)
        candidate = reuse_nothing(method, subject)
        with pytest.raises(TypeError) as refused:
            fastdiff.apply(subject.pipe, candidate)
        message = str(refused.value)
        assert type(candidate).__name__ in message and f"{anatomy.denoiser} ({family})" in message
        assert re.search(pattern, message), message
        assert pipeline_state(subject.pipe) == before
        assert np.array_equal(subject.call(), subject.vanilla)
        return

    acc = fastdiff.apply(subject.pipe, reuse_nothing(method, subject))
    try:
        assert np.array_equal(subject.call(), subject.vanilla)
        assert acc.report().module_calls_avoided == 0
    finally:
        acc.remove()

    acc = fastdiff.apply(subject.pipe, reusing(method, subject))
    try:
        output = subject.call()
        assert acc.plan.count(Decision.REUSE) + acc.plan.count(Decision.SKIP) > 0
        ledger_follows_plan(acc)
    finally:
        acc.remove()
    difference = float(np.abs(output - subject.vanilla).mean())
    assert 0 < difference < 0.5 * subject.seed_spread, (difference, subject.seed_spread)


def test_every_family_is_in_the_matrix() -> None:
    assert set(FAMILIES) == set(BUILTINS) | NO_BUILTIN and not set(BUILTINS) & NO_BUILTIN
    for family, names in BUILTINS.items():
        for name in names:
            assert FAMILIES[family].classes  # a built-in per family; its class is checked when it is built
            assert builtin_info(name).pipeline_class


def test_readme_table_agrees(subjects: Subjects) -> None:
    """The README's family × method table says ✓ exactly where the matrix expects the method to work."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("|") and "T-GATE" in line
                  and "early exiting" in line and "family" in line.lower())
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in text.splitlines():
        found = re.match(r"\|\s*`(\w+)`", line)
        if found and found.group(1) in FAMILIES:
            rows[found.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    for family, names in BUILTINS.items():
        assert family in rows, f"README family table has no row for {family}"
        anatomy = subjects[names[0]].anatomy
        for column, method in README_COLUMNS.items():
            cell = rows[family][columns.index(column)]
            works = refusal(method, anatomy) is None
            assert cell.startswith("✓") == works, (family, column, cell)
