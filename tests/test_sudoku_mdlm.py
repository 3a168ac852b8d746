"""The Sudoku masked diffusion model: its structure, its training script, and the samplers on it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fastdiff.models.sudoku import CELLS, NEIGHBOURS, format_sudoku, is_valid_solution
from fastdiff.models.sudoku_mdlm import (
    SUDOKU_MDLM_DIR,
    SudokuDenoiser,
    held_out,
    held_out_solutions,
    load_sudoku_mdlm,
    main,
    solve,
    train,
)
from fastdiff.schedulers import DiscreteDiffusionScheduler


def test_attention_sees_only_peers():
    """With one layer, a cell's logits depend on its 20 peers and itself, and on nothing else."""
    torch.manual_seed(0)
    model = SudokuDenoiser(hidden=16, layers=1, heads=2).eval()
    grid = torch.zeros(1, CELLS, dtype=torch.long)
    base = model(grid).logits[0, 0]
    far = next(c for c in range(CELLS) if c not in NEIGHBOURS[0] and c != 0)
    changed = grid.clone()
    changed[0, far] = 5
    assert torch.allclose(model(changed).logits[0, 0], base)
    changed = grid.clone()
    changed[0, NEIGHBOURS[0][-1]] = 5
    assert not torch.allclose(model(changed).logits[0, 0], base)
    with pytest.raises(ValueError, match="81 cells"):
        model(torch.zeros(1, 80, dtype=torch.long))


class Solver(torch.nn.Module):
    """Knows the solutions: certain logits for them (a model that has learned Sudoku perfectly)."""

    def __init__(self, puzzles, solutions):
        super().__init__()
        self.table = {format_sudoku(p): s for p, s in zip(puzzles, solutions)}
        self.calls = 0

    def forward(self, ids):
        self.calls += 1
        logits = torch.full((*ids.shape, 10), -30.0)
        for row, grid in enumerate(ids.tolist()):
            # look up by the clues the row started from: the cells that agree with one solution
            solution = next(s for s in self.table.values() if all(v in (0, w) for v, w in zip(grid, s)))
            logits[row, torch.arange(CELLS), torch.tensor(solution)] = 30.0
        return type("Out", (), {"logits": logits})()


def test_solving_loop_counts_calls_per_puzzle():
    puzzles, solutions = held_out(3)
    oracle = Solver(puzzles, solutions)
    board = torch.tensor(puzzles)
    grids, calls = solve(oracle, board, DiscreteDiffusionScheduler(sampler="threshold", mask_token_id=0))
    assert all(is_valid_solution(g, p) for g, p in zip(grids.tolist(), puzzles)) and calls.tolist() == [1, 1, 1]
    grids, calls = solve(oracle, board, DiscreteDiffusionScheduler(sampler="margin", mask_token_id=0,
                                                                   temperature=0.0))
    assert calls.tolist() == (board == 0).sum(1).tolist()  # one cell per step
    assert grids.tolist() == solutions


def test_training_writes_a_loadable_model_and_avoids_held_out_grids(tmp_path, monkeypatch):
    import fastdiff.models.sudoku_mdlm as module

    seen = []
    original = module.training_grids

    def spy(base, count, rng, exclude=frozenset()):
        seen.append(exclude)
        return original(base, count, rng, exclude)

    monkeypatch.setattr(module, "training_grids", spy)
    monkeypatch.setattr(module, "BASE_GRIDS", 5)
    result = train(tmp_path, minutes=0.001, batch_size=4, held_out=7, log=lambda m: None, hidden=16, layers=1,
                   heads=2)
    assert seen[0] == {format_sudoku(s) for s in held_out_solutions(7)}
    assert result["steps"] == 120 and (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text()) == {"hidden": 16, "layers": 1, "heads": 2}
    model = load_sudoku_mdlm(tmp_path)
    assert model(torch.zeros(2, CELLS, dtype=torch.long)).logits.shape == (2, CELLS, 10)


def test_command_line_errors(capsys):
    with pytest.raises(SystemExit) as error:
        main(["evaluate", "--puzzles", "0"])
    assert error.value.code == 2 and "--puzzles must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(not (SUDOKU_MDLM_DIR / "config.json").is_file(), reason="sudoku-mdlm weights not trained")
def test_shipped_model_solves_held_out_puzzles():
    """The shipped weights solve minimal puzzles they never saw (about half, as in docs/text.md),
    and adaptive decoding needs far fewer calls than one cell per step."""
    model = load_sudoku_mdlm()
    puzzles, _ = held_out(20, seed=1)
    grids, calls = solve(model, torch.tensor(puzzles),
                         DiscreteDiffusionScheduler(sampler="threshold", threshold=0.95, mask_token_id=0))
    solved = sum(is_valid_solution(g, p) for g, p in zip(grids.tolist(), puzzles))
    blanks = sum(v == 0 for p in puzzles for v in p) / len(puzzles)
    assert solved >= 6 and float(calls.double().mean()) < blanks / 2, (solved, calls)


def test_solve_command_refuses_bad_puzzles_before_loading(capsys, tmp_path):
    for puzzle, message in (("12345", "--puzzle: a Sudoku is 81 cells of 0-9 .* got 5 cells"),
                            ("x" * 81, "characters 'x' are not 0-9"),
                            ("11" + "0" * 79, "this puzzle has no solution")):
        with pytest.raises(SystemExit) as error:
            main(["solve", "--puzzle", puzzle, "--model", str(tmp_path / "missing")])
        assert error.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["solve", "--puzzle", "0" * 81, "--sampler", "mdlm:corruption=uniform"])
    assert "corruption='mask' only" in capsys.readouterr().err


def test_train_command_refuses_bad_numbers(capsys):
    for flag, value in (("--minutes", "0"), ("--batch-size", "0"), ("--layers", "-1")):
        with pytest.raises(SystemExit) as error:
            main(["train", flag, value])
        assert error.value.code == 2 and f"{flag} must be > 0" in capsys.readouterr().err
