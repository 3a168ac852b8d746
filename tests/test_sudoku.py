"""The Sudoku generator: valid grids, puzzles with exactly one solution, a held-out split."""

import random

import pytest

from fastdiff.models.sudoku import (
    CELLS,
    format_sudoku,
    is_valid_solution,
    make_puzzle,
    parse_sudoku,
    random_grid,
    solutions,
    sudoku_split,
    training_grids,
    transformed,
)


def test_grids_and_their_symmetries_are_valid():
    rng = random.Random(0)
    grids = [random_grid(rng) for _ in range(5)]
    assert len({format_sudoku(g) for g in grids}) == 5 and all(is_valid_solution(g) for g in grids)
    assert all(is_valid_solution(transformed(grids[0], rng)) for _ in range(20))
    broken = list(grids[0])
    broken[0], broken[1] = broken[1], broken[0]
    assert not is_valid_solution(broken)


def test_puzzles_have_exactly_one_solution():
    rng = random.Random(1)
    solution = random_grid(rng)
    puzzle = make_puzzle(solution, rng)
    assert solutions(puzzle, limit=3) == [solution]
    assert is_valid_solution(solution, puzzle) and 17 <= sum(1 for v in puzzle if v) < CELLS
    blank = [0] * CELLS
    assert len(solutions(blank, limit=2)) == 2  # an empty grid has many
    contradictory = [5, 5] + [0] * (CELLS - 2)  # one digit twice in a row
    assert solutions(contradictory) == []


def test_split_holds_out_solutions_from_training():
    split = sudoku_split(train=200, test=3, seed=0, base_grids=5)
    held_out = {format_sudoku(s) for s in split.test_solutions}
    assert len(split.train_grids) == 200 and not held_out & {format_sudoku(g) for g in split.train_grids}
    assert all(solutions(p) == [s] for p, s in zip(split.test_puzzles, split.test_solutions))
    again = sudoku_split(train=200, test=3, seed=0, base_grids=5)
    assert again.test_puzzles == split.test_puzzles and again.train_grids == split.train_grids


def test_training_draws_skip_excluded_grids():
    base = [random_grid(random.Random(2))]
    first = next(training_grids(base, 1, random.Random(3)))
    drawn = list(training_grids(base, 50, random.Random(3), exclude={format_sudoku(first)}))
    assert len(drawn) == 50 and first not in drawn and all(is_valid_solution(g) for g in drawn)


@pytest.mark.parametrize("text, message", [
    ("123", "got 3 cells"),
    ("1" * 80 + "x", "characters 'x' are not 0-9"),
    ("." * 81, "characters '.' are not 0-9"),
    ("1" * 82, "got 82 cells"),
])
def test_a_sudoku_string_must_be_81_cells_of_0_to_9(text, message):
    with pytest.raises(ValueError, match=message):
        parse_sudoku(text, "--puzzle")
    assert parse_sudoku("\n".join(["0" * 9] * 9)) == [0] * CELLS


def test_singles_yardstick():
    from fastdiff.models.sudoku import solved_by_singles

    rng = random.Random(3)
    grid = random_grid(rng)
    easy = list(grid)
    for cell in rng.sample(range(81), 10):  # ten blanks: each is a naked single
        easy[cell] = 0
    assert solved_by_singles(easy)
    assert not solved_by_singles([0] * 81)  # many solutions: no single anywhere
