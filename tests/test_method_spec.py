import pytest

import fastdiff
from fastdiff import parse_method


def test_parse_with_types():
    method = parse_method("deepcache:interval=5,branch=2,mode=nonuniform,center=10,power=1.3")
    assert method == fastdiff.DeepCache(interval=5, branch=2, mode="nonuniform", center=10, power=1.3)


def test_spec_roundtrip():
    method = fastdiff.DeepCache(interval=4, mode="nonuniform")
    assert method.spec() == "deepcache:interval=4,branch=0,mode=nonuniform"
    assert parse_method(method.spec()) == method


def test_bare_name_uses_defaults():
    assert parse_method("deepcache") == fastdiff.DeepCache()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuch:interval=3", "unknown method 'nosuch'"),
        ("deepcache:interval", "expected key=value"),
        ("deepcache:speed=3", "no parameter 'speed'"),
        ("deepcache:interval=three", "not a valid int"),
        ("deepcache:interval=0", "interval must be an integer >= 1"),
    ],
)
def test_malformed_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method(spec)
