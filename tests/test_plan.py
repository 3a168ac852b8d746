import pytest

from fastdiff import Decision, Plan

C, R, S = Decision.COMPUTE, Decision.REUSE, Decision.SKIP


def test_decisions_and_counts():
    plan = Plan.merge(4, [("a", {"x": [C, R, R, C]}), ("b", {"y": [C, S, C, S]})])
    assert plan.decision("x", 1) is R
    assert plan.decision("y", 3) is S
    assert plan.decision("unclaimed", 2) is C
    assert plan.decision("x", 10) is C  # beyond the announced steps: compute, never guess
    assert plan.count(R) == 2 and plan.count(S) == 2 and plan.count(C) == 4
    assert plan.full_steps() == [0]
    assert plan.reuses("x") and not plan.reuses("y")
    assert plan.owners == {"x": "a", "y": "b"}


def test_two_methods_claiming_a_module_is_refused():
    with pytest.raises(ValueError, match=r"'a' and 'b' both claim module 'x'"):
        Plan.merge(2, [("a", {"x": [C, R]}), ("b", {"x": [C, C]})])


def test_row_length_must_match_steps():
    with pytest.raises(ValueError, match="num_steps=3"):
        Plan(num_steps=3, rows={"x": (C, R)})


def test_grid_text_shows_every_step():
    plan = Plan.merge(12, [("deepcache", {"down_blocks.1": [C, R, R] * 4})])
    text = str(plan)
    row = [line for line in text.splitlines() if line.startswith("down_blocks.1")][0]
    assert row.endswith("#..#..#..#..")
    assert "full steps: [0, 3, 6, 9]" in text
    assert "0123456789" in text


def test_roundtrip_json(tmp_path):
    plan = Plan.merge(5, [("m", {"a.b": [C, R, S, R, C]})])
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan


def test_bad_symbol_in_file():
    with pytest.raises(ValueError, match="may only contain"):
        Plan.from_dict({"num_steps": 2, "rows": {"x": "#?"}})
