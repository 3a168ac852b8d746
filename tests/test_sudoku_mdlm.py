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


@pytest.mark.slow
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


def test_command_line_help_interrupt_and_paths(tmp_path, capsys, monkeypatch):
    """Every command and argument is described, with its default; a missing model or an output
    in a missing folder is one line and exit 2 before any work; Ctrl-C is one line and exit 130."""
    import fastdiff.models.sudoku_mdlm as module

    parser = module._parser()
    assert set(parser.commands) == {"train", "solve", "evaluate"}
    for command in parser.commands.values():
        assert all(action.help for action in command._actions), command.prog
    assert "(default: threshold:threshold=0.9)" in parser.commands["solve"].format_help()
    for argv, message in ((["solve", "--puzzle", "0" * 81, "--model", str(tmp_path)], "holds no sudoku-mdlm model"),
                          (["evaluate", "--json", str(tmp_path / "a" / "b.json")], "--json: cannot write"),
                          (["train", "--out", str(tmp_path / "a" / "b")], "--out: cannot create folder"),
                          (["train", "--hidden", "10", "--heads", "3"], "--heads: 3 does not divide --hidden 10")):
        with pytest.raises(SystemExit) as error:
            main(argv)
        err = capsys.readouterr().err
        assert error.value.code == 2 and message in err and err.count("\n") == 1, argv
    assert list(tmp_path.iterdir()) == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for name, argv in (("evaluate", ["evaluate", "--puzzles", "1"]), ("solve", ["solve", "--puzzle", "0" * 81]),
                       ("train", ["train", "--out", str(tmp_path / "m")])):
        monkeypatch.setattr(module, name, interrupted)
        with pytest.raises(SystemExit) as error:
            main(argv)
        assert error.value.code == 130
        assert capsys.readouterr().err == f"python -m fastdiff.models.sudoku_mdlm {name}: interrupted\n"


def test_importing_the_models_silences_the_torchvision_notice():
    """transformers says once per image-processor class that torchvision is missing (always so
    beside the CPU torch); the model commands would print it on every run."""
    import logging

    import fastdiff.models  # noqa: F401

    assert logging.getLogger("transformers.utils.import_utils").getEffectiveLevel() >= logging.ERROR


@pytest.mark.slow
def test_module_prints_no_library_noise_and_ctrl_c_is_one_line(tmp_path):
    """A real run and a real SIGINT in a fresh interpreter: nothing but the command's own output."""
    import os
    import signal
    import subprocess
    import sys
    import time

    puzzle = "000000000500000400902003005006050004008600020300084600040026009000000007050070080"
    done = subprocess.run([sys.executable, "-m", "fastdiff.models.sudoku_mdlm", "solve", "--puzzle", puzzle],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "" and "solved in" in done.stdout
    run = subprocess.Popen([sys.executable, "-m", "fastdiff.models.sudoku_mdlm", "evaluate", "--puzzles", "200"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout.readline().strip()  # the held-out puzzles are drawn: the run is under way
    time.sleep(1)
    os.kill(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and err == "python -m fastdiff.models.sudoku_mdlm evaluate: interrupted\n"
