"""The command line's light catalog of names agrees with the registries it stands in for.

The CLI builds its parsers and help from :mod:`fastdiff.catalog` so that ``--help`` loads no
torch; these checks make a method, model or sampler added to (or renamed in) its registry fail
here until the catalog says the same.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastdiff import catalog


def test_methods_match_the_spec_parser():
    import fastdiff.caching  # noqa: F401  (registers the methods)
    import fastdiff.parallel  # noqa: F401
    from fastdiff.core.forecast import FORECASTS, REUSING_METHODS
    from fastdiff.core.method import METHODS, parse_method

    assert sorted(catalog.METHOD_SPECS) == sorted(METHODS)
    for name, (example, _) in catalog.METHOD_SPECS.items():
        assert METHODS[name].__module__.startswith(catalog.METHOD_MODULES), name
        assert parse_method(example).spec_name == name
    assert catalog.FORECASTS == tuple(FORECASTS)
    assert catalog.FORECASTING_METHODS == tuple(REUSING_METHODS)
    for name in catalog.FORECASTING_METHODS:
        parse_method(f"{name}:forecast=ab2")


def test_models_and_samplers_match_their_registries():
    from fastdiff.models import BUILTIN_MODELS
    from fastdiff.models.pydoc_text import PYDOC_MDLM_NAME
    from fastdiff.schedulers import ALIASES, SAMPLERS

    assert tuple(catalog.BUILTIN_MODELS) == BUILTIN_MODELS
    assert catalog.DEFAULT_MODEL in BUILTIN_MODELS
    assert catalog.DEFAULT_TEXT_MODEL == PYDOC_MDLM_NAME
    assert catalog.DEFAULT_TEXT_MODEL in catalog.TEXT_MODELS
    assert catalog.SAMPLERS == tuple(SAMPLERS)
    assert catalog.SAMPLER_ALIASES == dict(ALIASES)


def test_every_bare_sampler_name_builds_a_scheduler():
    """The CLI accepts a bare sampler name or alias without building its scheduler."""
    from fastdiff.pipelines.masked_diffusion_lm import _scheduler

    for name in (*catalog.SAMPLERS, *catalog.SAMPLER_ALIASES):
        _scheduler(name)


def test_catalog_imports_only_the_standard_library():
    code = ("import sys, fastdiff.catalog; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', "
            "'numpy', 'PIL')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_spec_parser_registers_methods_in_a_fresh_process():
    """Workers (parallel bench, torchrun) import the spec parser alone, without ``fastdiff.caching``."""
    code = ("from fastdiff.core.method import parse_method; "
            "print(parse_method('deepcache:interval=3').spec(), parse_method('patch:mode=pcpp').spec())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0].startswith("deepcache:interval=3") and out.split()[1].startswith("patch:mode=pcpp")
