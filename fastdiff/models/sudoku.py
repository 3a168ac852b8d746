"""Sudoku puzzles with unique solutions, generated here: a text task where correctness is checkable.

A masked diffusion model that fills a Sudoku grid is right or wrong, cell by cell, with no model
judging it; the order in which a sampler commits cells decides whether it gets there (Kim et
al. 2025: random order under 7 %, adaptive order about 90 %). So the project generates its own
puzzles, offline and reproducibly:

- full grids by randomised backtracking (every valid grid is reachable), then Sudoku's symmetries
  (digit relabelling, row and column permutations within bands and stacks, band and stack
  permutations, transposition: about 1.2·10^12 of them) to draw many grids from few;
- puzzles by removing clues from a grid in random order while the solution stays unique
  (checked by a solver that stops at the second solution).

Grids are 81 integers, row by row, 1-9 for digits and 0 for a blank; as text, 81 characters 0-9.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CELLS = 81
DIGITS = range(1, 10)
_ALL = 0b1111111110  # bits 1..9


def _neighbours() -> tuple[tuple[int, ...], ...]:
    """For each cell, the 20 other cells that share its row, column or box."""
    peers = []
    for cell in range(CELLS):
        row, col = divmod(cell, 9)
        box = (row // 3) * 3, (col // 3) * 3
        same = {row * 9 + c for c in range(9)} | {r * 9 + col for r in range(9)}
        same |= {(box[0] + r) * 9 + box[1] + c for r in range(3) for c in range(3)}
        same.discard(cell)
        peers.append(tuple(sorted(same)))
    return tuple(peers)


NEIGHBOURS = _neighbours()


def parse_sudoku(text: str, argument: str = "sudoku") -> list[int]:
    """81 cells of 0-9 (0: blank), row by row; whitespace and line breaks are ignored."""
    cells = "".join(text.split())
    if len(cells) != CELLS or not cells.isdigit() or not cells.isascii():
        wrong = sorted({c for c in cells if not (c.isascii() and c.isdigit())})
        detail = f"characters {''.join(wrong)!r} are not 0-9" if wrong else f"{len(cells)} cells"
        raise ValueError(f"{argument}: a Sudoku is 81 cells of 0-9 (0 for a blank), row by row; got {detail}")
    return [int(c) for c in cells]


def format_sudoku(grid: Sequence[int]) -> str:
    return "".join(str(v) for v in grid)


def is_valid_solution(grid: Sequence[int], puzzle: Sequence[int] | None = None) -> bool:
    """Every row, column and box holds 1-9 once, and every clue of ``puzzle`` is kept."""
    if len(grid) != CELLS or any(v not in DIGITS for v in grid):
        return False
    if any(grid[cell] == grid[other] for cell in range(CELLS) for other in NEIGHBOURS[cell]):
        return False
    return puzzle is None or all(clue == 0 or clue == value for clue, value in zip(puzzle, grid))


def _candidates(grid: Sequence[int], cell: int) -> int:
    used = 0
    for other in NEIGHBOURS[cell]:
        used |= 1 << grid[other]
    return _ALL & ~used


def _search(grid: list[int], limit: int, rng: random.Random | None, found: list[list[int]]) -> None:
    """Depth-first, most-constrained cell first; stops once ``limit`` solutions are found."""
    best, best_options, best_count = -1, 0, 10
    for cell in range(CELLS):
        if grid[cell] == 0:
            options = _candidates(grid, cell)
            count = options.bit_count()
            if count < best_count:
                best, best_options, best_count = cell, options, count
                if count <= 1:
                    break
    if best < 0:
        found.append(list(grid))
        return
    digits = [d for d in DIGITS if best_options >> d & 1]
    if rng is not None:
        rng.shuffle(digits)
    for digit in digits:
        grid[best] = digit
        _search(grid, limit, rng, found)
        if len(found) >= limit:
            break
    grid[best] = 0


def solutions(puzzle: Sequence[int], limit: int = 2) -> list[list[int]]:
    """Up to ``limit`` solutions of ``puzzle`` (a contradictory puzzle has none)."""
    grid = list(puzzle)
    if any(v and grid[other] == v for cell, v in enumerate(grid) for other in NEIGHBOURS[cell]):
        return []
    found: list[list[int]] = []
    _search(grid, limit, None, found)
    return found


UNITS = tuple(tuple(r * 9 + c for c in range(9)) for r in range(9)) + \
    tuple(tuple(r * 9 + c for r in range(9)) for c in range(9)) + \
    tuple(tuple((b // 3 * 3 + r) * 9 + b % 3 * 3 + c for r in range(3) for c in range(3)) for b in range(9))


def solved_by_singles(puzzle: Sequence[int]) -> bool:
    """Whether naked singles (a cell with one candidate) and hidden singles (a digit with one
    place in a row, column or box), applied until neither applies, fill the grid: the easiest
    technique, a yardstick of how hard a set of puzzles is."""
    grid = list(puzzle)
    progress = True
    while progress:
        progress = False
        for cell in range(CELLS):
            if grid[cell] == 0:
                options = _candidates(grid, cell)
                if options.bit_count() == 1:
                    grid[cell], progress = options.bit_length() - 1, True
        for unit in UNITS:
            for digit in DIGITS:
                if any(grid[c] == digit for c in unit):
                    continue
                places = [c for c in unit if grid[c] == 0 and _candidates(grid, c) >> digit & 1]
                if len(places) == 1:
                    grid[places[0]], progress = digit, True
    return all(grid) and is_valid_solution(grid, puzzle)


def random_grid(rng: random.Random) -> list[int]:
    """A full valid grid by randomised backtracking from an empty one."""
    found: list[list[int]] = []
    _search([0] * CELLS, 1, rng, found)
    return found[0]


def transformed(grid: Sequence[int], rng: random.Random) -> list[int]:
    """The grid under a random element of Sudoku's symmetry group: still a valid grid."""
    relabel = [0, *rng.sample(DIGITS, 9)]

    def order() -> list[int]:
        bands = rng.sample(range(3), 3)
        return [band * 3 + inner for band in bands for inner in rng.sample(range(3), 3)]

    rows, cols = order(), order()
    out = [relabel[grid[rows[r] * 9 + cols[c]]] for r in range(9) for c in range(9)]
    if rng.random() < 0.5:
        out = [out[c * 9 + r] for r in range(9) for c in range(9)]
    return out


def make_puzzle(solution: Sequence[int], rng: random.Random, min_clues: int = 17) -> list[int]:
    """Blank cells of ``solution`` in random order while the puzzle keeps exactly one solution."""
    puzzle = list(solution)
    cells = list(range(CELLS))
    rng.shuffle(cells)
    clues = CELLS
    for cell in cells:
        if clues <= min_clues:
            break
        kept, puzzle[cell] = puzzle[cell], 0
        if len(solutions(puzzle, 2)) == 1:
            clues -= 1
        else:
            puzzle[cell] = kept
    return puzzle


@dataclass(frozen=True)
class SudokuSplit:
    """Grids to train on and held-out puzzles whose solutions are none of them."""

    train_grids: list[list[int]]
    test_puzzles: list[list[int]]
    test_solutions: list[list[int]]


def training_grids(base: Sequence[Sequence[int]], count: int, rng: random.Random,
                   exclude: set[str] = frozenset()) -> Iterator[list[int]]:
    """``count`` grids drawn from the symmetry orbits of ``base``, skipping any in ``exclude``."""
    made = 0
    while made < count:
        grid = transformed(base[rng.randrange(len(base))], rng)
        if format_sudoku(grid) in exclude:
            continue
        made += 1
        yield grid


def sudoku_split(train: int, test: int, *, seed: int = 0, base_grids: int = 200) -> SudokuSplit:
    """Training grids and held-out puzzles from disjoint random streams.

    The held-out solutions come from their own backtracking draws, so they share no symmetry
    orbit with the training grids' bases except by a chance of about one in 10^9 per pair; any
    held-out solution that still turns up among the training grids is replaced there.
    """
    for name, value in (("train", train), ("test", test), ("base_grids", base_grids)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    test_rng = random.Random(f"sudoku-test-{seed}")
    test_solutions = [random_grid(test_rng) for _ in range(test)]
    test_puzzles = [make_puzzle(s, test_rng) for s in test_solutions]
    held_out = {format_sudoku(s) for s in test_solutions}
    train_rng = random.Random(f"sudoku-train-{seed}")
    base = [random_grid(train_rng) for _ in range(base_grids)]
    grids = list(training_grids(base, train, train_rng, held_out))
    return SudokuSplit(grids, test_puzzles, test_solutions)
