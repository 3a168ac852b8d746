"""``sudoku-mdlm``: a masked diffusion model that fills Sudoku grids, trained here in about 40 minutes.

Token ids are the cell values: 1-9 for digits and 0 for a blank, which is also the mask token, so
a puzzle is already a canvas. The denoiser is a small transformer whose attention is restricted to
each cell's 20 peers (same row, column or box) and itself: the only cells a rule of Sudoku
relates. Without that restriction a model of this size trained for this long learns the digit
statistics but not the rules; with it, stacking layers chains eliminations (a hidden single needs
two hops: "no other cell of my row can hold 7"). Learned row, column and box embeddings tell a
cell where it is.

Training is MDLM's objective for the linear schedule on full grids: mask each cell with
probability t ~ U(0, 1) (antithetic across the batch) and predict the masked cells. Grids are
drawn on the fly from symmetry orbits of random grids (:mod:`.sudoku`); every held-out solution
is excluded, so the held-out puzzles test solving, not recall.

    python -m fastdiff.models.sudoku_mdlm train      # about 40 min on 2 CPU cores
    python -m fastdiff.models.sudoku_mdlm evaluate   # the sampler table of docs/text.md
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..check_only import exit_if_check_only
from ..core.objectives import LossLog, masked_diffusion_loss, optimizer_step
from .sudoku import (
    CELLS,
    NEIGHBOURS,
    format_sudoku,
    make_puzzle,
    random_grid,
    training_grids,
)

SUDOKU_MDLM_NAME = "sudoku-mdlm"
SUDOKU_MDLM_DIR = Path(__file__).parent / "weights" / SUDOKU_MDLM_NAME
MASK_TOKEN_ID = 0  # a blank cell
VOCAB = 10
DEFAULTS = {"hidden": 128, "layers": 8, "heads": 4}
BASE_GRIDS = 2000


class SudokuDenoiser(nn.Module):
    """Logits over the ten cell values for every cell of a (batch × 81) canvas (``.logits``, as
    transformers models return them, so the text pipeline's adapter calls it like any masked LM)."""

    def __init__(self, hidden: int = 128, layers: int = 8, heads: int = 4) -> None:
        super().__init__()
        if hidden < 1 or layers < 1 or heads < 1 or hidden % heads:
            raise ValueError(f"hidden must be a positive multiple of heads and layers >= 1; got hidden={hidden}, "
                             f"layers={layers}, heads={heads}")
        self.config = {"hidden": hidden, "layers": layers, "heads": heads}
        self.value = nn.Embedding(VOCAB, hidden)
        self.row, self.column, self.box = nn.Embedding(9, hidden), nn.Embedding(9, hidden), nn.Embedding(9, hidden)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB)
        cells = torch.arange(CELLS)
        rows, columns = cells // 9, cells % 9
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("columns", columns, persistent=False)
        self.register_buffer("boxes", (rows // 3) * 3 + columns // 3, persistent=False)
        blocked = torch.ones(CELLS, CELLS, dtype=torch.bool)
        for cell, peers in enumerate(NEIGHBOURS):
            blocked[cell, list(peers)] = False
            blocked[cell, cell] = False
        self.register_buffer("blocked", blocked, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import MaskedLMOutput

        if input_ids.shape[-1] != CELLS:
            raise ValueError(f"input_ids: a Sudoku canvas is {CELLS} cells, got length {input_ids.shape[-1]}")
        x = self.value(input_ids) + self.row(self.rows) + self.column(self.columns) + self.box(self.boxes)
        for block in self.blocks:
            x = block(x, src_mask=self.blocked)
        return MaskedLMOutput(logits=self.head(self.norm(x)))


def masked_loss(model: SudokuDenoiser, grids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean cross-entropy of the masked cells, masking each with probability t ≥ 1/81 (antithetic t)."""
    return masked_diffusion_loss(model, grids, MASK_TOKEN_ID, generator, elbo=False, min_t=1.0 / CELLS)


def held_out_solutions(count: int, seed: int = 0) -> list[list[int]]:
    """The solutions of the held-out puzzles (:func:`held_out`), drawn first so training can avoid them."""
    rng = random.Random(f"sudoku-test-{seed}")
    return [random_grid(rng) for _ in range(count)]


def train(out: Path, *, minutes: float = 40.0, batch_size: int = 128, learning_rate: float = 1e-3, seed: int = 0,
          held_out: int = 1000, log: Any = print, **shape: int) -> dict:
    """Train for a fixed wall-clock budget (the cosine schedule is set from a measured step time),
    then save ``config.json``, ``model.safetensors`` and ``training.json`` to ``out``."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from safetensors.torch import save_file

    config = {**DEFAULTS, **shape}
    torch.manual_seed(seed)
    model = SudokuDenoiser(**config)
    excluded = {format_sudoku(s) for s in held_out_solutions(held_out, seed)}
    rng = random.Random(f"sudoku-train-{seed}")
    base = [random_grid(rng) for _ in range(BASE_GRIDS)]
    draws = training_grids(base, 10**12, rng, excluded)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))

    def batch() -> torch.Tensor:
        return torch.tensor([next(draws) for _ in range(batch_size)], dtype=torch.long)

    started = time.perf_counter()
    probe = 20  # steps timed at full learning rate to size the schedule
    for _ in range(probe):
        optimizer_step(model.parameters(), optimizer, masked_loss(model, batch(), generator))
    per_step = (time.perf_counter() - started) / probe
    steps = max(probe + 100, int(minutes * 60 / per_step))
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, steps - probe)
    log(f"{sum(p.numel() for p in model.parameters())} parameters; {per_step:.2f} s/step -> {steps} steps")
    losses = LossLog(log, steps, digits=4, started=started)  # the probe's steps count towards the time
    for step in range(probe, steps):
        losses.add(step, optimizer_step(model.parameters(), optimizer, masked_loss(model, batch(), generator)))
        schedule.step()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    result = {"train_seconds": round(time.perf_counter() - started), "steps": steps, "batch_size": batch_size,
              "learning_rate": learning_rate, "seed": seed, "base_grids": BASE_GRIDS, "held_out_excluded": held_out,
              "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_sudoku_mdlm(path: str | Path = SUDOKU_MDLM_DIR, dtype: torch.dtype = torch.float32) -> SudokuDenoiser:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        from .builtin import ModelLoadError

        raise ModelLoadError(f"sudoku-mdlm weights not found in {path}; train them with "
                             "`python -m fastdiff.models.sudoku_mdlm train`")
    model = SudokuDenoiser(**json.loads((path / "config.json").read_text()))
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path / "model.safetensors")).items()})
    return model.to(dtype).eval()


class SudokuTokenizer:
    """The text side of ``sudoku-mdlm`` in the text pipeline. A prompt is a puzzle: 81 cells of 0-9
    (0 for a blank), row by row, whitespace ignored; one token per cell, the value itself. A
    decoded grid is its nine rows, one a line, after a line break, so that prompt + text reads as
    the puzzle, then the filled grid."""

    mask_token_id = MASK_TOKEN_ID
    pad_token_id = None
    eos_token_id = None

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        from .sudoku import parse_sudoku

        return {"input_ids": parse_sudoku(text, "prompt")}

    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        cells = "".join(str(int(v)) for v in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))
        return "".join("\n" + cells[row:row + 9] for row in range(0, len(cells), 9))


class SudokuTextModel(nn.Module):
    """``sudoku-mdlm`` as a masked LM of the text pipeline: the canvas is the puzzle (the prompt,
    81 tokens) followed by the grid being filled (81 tokens). The generated grid starts as the
    puzzle (:meth:`generation_from_prompt`), so the samplers decide the blanks only, as
    :func:`solve` does; the logits of both halves are those of the grid."""

    def __init__(self, denoiser: SudokuDenoiser) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.denoiser = denoiser
        # what the pipeline reads from a transformers config; no maximum length: the checks below
        # say what is wrong more precisely than "too long"
        self.config = SimpleNamespace(model_type="sudoku-mdlm", vocab_size=VOCAB, mask_token_id=MASK_TOKEN_ID)

    @staticmethod
    def _check(prompt_length: int, gen_length: int) -> None:
        if prompt_length != CELLS or gen_length != CELLS:
            raise ValueError(f"sudoku-mdlm fills the {CELLS} cells of the puzzle given as the prompt (one prompt of "
                             f"{CELLS} cells, gen_length={CELLS}); got a prompt of {prompt_length} tokens and "
                             f"gen_length={gen_length}")

    def generation_from_prompt(self, prompt_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The grid to fill: the puzzle, its blanks the mask token."""
        self._check(prompt_ids.shape[1], noise.shape[1])
        return prompt_ids.clone()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import MaskedLMOutput

        self._check(input_ids.shape[1] - CELLS, CELLS)
        puzzle, grid = input_ids[:, :CELLS], input_ids[:, CELLS:]
        # guidance masks the prompt: then the grid alone is what the model sees
        grid = torch.where(grid == MASK_TOKEN_ID, puzzle, grid)
        logits = self.denoiser(grid).logits
        return MaskedLMOutput(logits=torch.cat([logits, logits], dim=1))


def load_sudoku_text(dtype: torch.dtype = torch.float32, path: str | Path = SUDOKU_MDLM_DIR) -> tuple[Any, Any]:
    """(model, tokenizer) of the shipped model for the text pipeline (``sudoku-mdlm``)."""
    return SudokuTextModel(load_sudoku_mdlm(path, dtype)).eval(), SudokuTokenizer()


def held_out(count: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """(puzzles, solutions): ``count`` held-out puzzles with unique solutions, never trained on."""
    rng = random.Random(f"sudoku-test-{seed}")
    solutions = [random_grid(rng) for _ in range(count)]
    return [make_puzzle(s, rng) for s in solutions], solutions


# name -> scheduler options; one-cell-per-step rows commit one cell per model call
SUDOKU_SAMPLERS: dict[str, dict[str, Any]] = {
    "random (one cell per step)": {"sampler": "random"},
    "low-confidence (one cell per step)": {"sampler": "low-confidence"},
    "margin (one cell per step)": {"sampler": "margin"},
    "low-confidence, 8 steps": {"sampler": "low-confidence", "steps": 8},
    "margin, 8 steps": {"sampler": "margin", "steps": 8},
    "threshold 0.9": {"sampler": "threshold", "threshold": 0.9},
    "threshold 0.95": {"sampler": "threshold", "threshold": 0.95},
    "threshold 0.98": {"sampler": "threshold", "threshold": 0.98},
    "threshold 0.99": {"sampler": "threshold", "threshold": 0.99},
    "threshold 0.999": {"sampler": "threshold", "threshold": 0.999},
    "entropy bound 0.01": {"sampler": "entropy-bound", "entropy_bound": 0.01},
    "entropy bound 0.05": {"sampler": "entropy-bound", "entropy_bound": 0.05},
    "entropy bound 0.1": {"sampler": "entropy-bound", "entropy_bound": 0.1},
    "entropy bound 0.2": {"sampler": "entropy-bound", "entropy_bound": 0.2},
    "entropy bound 0.5": {"sampler": "entropy-bound", "entropy_bound": 0.5},
}


def solve(model: SudokuDenoiser, puzzles: torch.Tensor, scheduler: Any, steps: int | None = None,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the blanks of ``puzzles`` (batch × 81); (grids, model calls per puzzle). ``steps=None``:
    one cell per step for the quota samplers, as many as needed for the adaptive ones."""
    from ..schedulers.fill import fill_masks

    return fill_masks(lambda rows: model(rows).logits, puzzles, scheduler, steps, generator)


def evaluate(model: SudokuDenoiser, count: int = 500, seed: int = 0, samplers: Sequence[str] | None = None,
             log: Any = print) -> dict:
    """Puzzles solved and model calls per puzzle for each sampler, on ``count`` held-out puzzles."""
    from ..schedulers import DiscreteDiffusionScheduler
    from .sudoku import is_valid_solution, solved_by_singles

    started = time.perf_counter()
    puzzles, solutions = held_out(count, seed)
    log(f"{count} held-out puzzles ({sum(v > 0 for p in puzzles for v in p) / count:.1f} clues on average) "
        f"in {time.perf_counter() - started:.0f} s")
    board = torch.tensor(puzzles, dtype=torch.long)
    rows = []
    for name in samplers or list(SUDOKU_SAMPLERS):
        options = dict(SUDOKU_SAMPLERS[name])
        steps = options.pop("steps", None)
        scheduler = DiscreteDiffusionScheduler(mask_token_id=MASK_TOKEN_ID, temperature=0.0, **options)
        begun = time.perf_counter()
        grids, calls = solve(model, board, scheduler, steps, torch.Generator().manual_seed(seed))
        solved = [is_valid_solution(g, p) for g, p in zip(grids.tolist(), puzzles)]
        blanks = board == MASK_TOKEN_ID
        right = (grids == torch.tensor(solutions))[blanks].double().mean()
        rows.append({"sampler": name, "solved_percent": round(100 * sum(solved) / count, 1),
                     "cells_right_percent": round(100 * float(right), 2),
                     "calls_per_puzzle": round(float(calls.double().mean()), 2),
                     "seconds": round(time.perf_counter() - begun, 1)})
        log(f"{name}: {rows[-1]['solved_percent']} % solved, {rows[-1]['calls_per_puzzle']} calls per puzzle")
    singles = round(100 * sum(map(solved_by_singles, puzzles)) / count, 1)
    log(f"naked and hidden singles alone solve {singles} % of these puzzles")
    return {"puzzles": count, "seed": seed, "temperature": 0.0, "singles_only_solved_percent": singles, "rows": rows}


def _solve_one(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The ``solve`` command: every input checked before the model is loaded; one line and exit 2 if not."""
    from ..pipelines.masked_diffusion_lm import _scheduler
    from .sudoku import is_valid_solution, parse_sudoku, solutions

    try:
        puzzle = parse_sudoku(args.puzzle, "--puzzle")
        scheduler = _scheduler(args.sampler, mask_token_id=MASK_TOKEN_ID, temperature=0.0)
    except ValueError as error:
        parser.error(str(error))
    if not solutions(puzzle, 1):
        parser.error("--puzzle: this puzzle has no solution (two equal digits share a row, column or box, or the "
                     "clues leave a cell no digit)")
    _check_model_folder(parser, args.model)
    exit_if_check_only("python -m fastdiff.models.sudoku_mdlm")
    grid, calls = solve(load_sudoku_mdlm(args.model), torch.tensor([puzzle]), scheduler)
    filled = grid[0].tolist()
    for row in range(9):
        print(" ".join(str(v) for v in filled[row * 9:row * 9 + 9]))
    valid = is_valid_solution(filled, puzzle)
    print(f"{'solved' if valid else 'not solved (a rule is broken)'} in {int(calls[0])} model calls")
    return 0 if valid else 1


PROG = "python -m fastdiff.models.sudoku_mdlm"


def _parser() -> argparse.ArgumentParser:
    from ..cli import Parser  # one-line mistakes, defaults in the help: as fastdiff's own
    from ..cli_checks import int_at_least

    parser = Parser(prog=PROG, description=__doc__.split("\n")[0].replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,solve,evaluate}")
    trainer = commands.add_parser("train",
                                  help="train the model for a fixed wall-clock budget and save it",
                                  description="Train sudoku-mdlm for a fixed wall-clock budget (the learning-rate "
                                              "schedule is sized from a measured step time), then save config.json, "
                                              "model.safetensors and training.json.")
    trainer.add_argument("--out", type=Path, default=SUDOKU_MDLM_DIR, metavar="DIR",
                         help="folder to write the model to (default: the shipped model's, "
                              "fastdiff/models/weights/sudoku-mdlm)")
    trainer.add_argument("--minutes", type=float, default=40.0, help="training time budget in minutes")
    trainer.add_argument("--batch-size", type=int, default=128, help="grids per training step")
    trainer.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (AdamW, cosine decay)")
    trainer.add_argument("--seed", type=int_at_least(0), default=0,
                         help="seed of the weights, the training grids and the held-out puzzles they avoid")
    shape_help = {"hidden": "width of the transformer", "layers": "transformer layers (each one more hop between "
                  "peers)", "heads": "attention heads per layer (must divide --hidden)"}
    for name, value in DEFAULTS.items():
        trainer.add_argument(f"--{name}", type=int, default=value, help=shape_help[name])
    solver = commands.add_parser("solve",
                                 help="fill one puzzle (81 characters 0-9, 0 for a blank)",
                                 description="Fill the blanks of one puzzle with the model and print the grid, "
                                             "whether it is a valid solution and the model calls it took (exit "
                                             "status 1 if it is not solved).")
    solver.add_argument("--puzzle", required=True, metavar="CELLS",
                        help="the puzzle: 81 characters 0-9 row by row, 0 for a blank (whitespace is ignored)")
    solver.add_argument("--sampler", default="threshold:threshold=0.9",
                        help="sampler[:option=value,...] of the text scheduler (see fastdiff text --help); "
                             "decoding is greedy (temperature 0)")
    solver.add_argument("--model", type=Path, default=SUDOKU_MDLM_DIR, metavar="DIR",
                        help="folder of the trained model (default: the shipped one)")
    evaluator = commands.add_parser("evaluate",
                                    help="puzzles solved and model calls per sampler",
                                    description="Run every sampler of the sampler table (docs/text.md) on held-out "
                                                "puzzles, greedily: the share solved and the model calls per "
                                                "puzzle.")
    evaluator.add_argument("--model", type=Path, default=SUDOKU_MDLM_DIR, metavar="DIR",
                           help="folder of the trained model (default: the shipped one)")
    evaluator.add_argument("--puzzles", type=int, default=500, help="how many held-out puzzles")
    evaluator.add_argument("--seed", type=int_at_least(0), default=0,
                           help="seed of the held-out puzzles (and of the samplers' random choices)")
    evaluator.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the table as JSON")
    parser.commands = commands.choices  # type: ignore[attr-defined]  # each command's parser blames its own mistakes
    return parser


def _check_model_folder(parser: argparse.ArgumentParser, folder: Path) -> None:
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        parser.error(f"--model: {str(folder)!r} holds no sudoku-mdlm model (config.json and model.safetensors); "
                     f"train one with `{PROG} train --out {folder}`")


def main(argv: Sequence[str] | None = None) -> int:
    """Ctrl-C ends any command with one line and exit status 130; a bad argument with one line
    and exit status 2, before any work."""
    from ..cli_checks import run_subcommand

    return run_subcommand(_parser(), PROG, _run, argv)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ..cli_checks import UsageError, check_output_file, check_output_folder

    try:
        if args.command == "train":
            check_output_folder("--out", args.out)
        if args.command == "evaluate":
            check_output_file("--json", args.json)
    except UsageError as error:
        parser.error(str(error))
    if args.command == "train":
        for name in ("minutes", "batch_size", "learning_rate", *DEFAULTS):
            if not getattr(args, name) > 0:
                parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
        if args.hidden % args.heads:
            parser.error(f"--heads: {args.heads} does not divide --hidden {args.hidden}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "solve":
        return _solve_one(parser, args)
    if args.command == "evaluate":
        if args.puzzles < 1:
            parser.error(f"--puzzles must be >= 1, got {args.puzzles}")
        _check_model_folder(parser, args.model)
        exit_if_check_only("python -m fastdiff.models.sudoku_mdlm")
        result = evaluate(load_sudoku_mdlm(args.model), args.puzzles, args.seed, log=lambda m: print(m, flush=True))
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return 0
    exit_if_check_only("python -m fastdiff.models.sudoku_mdlm")
    result = train(args.out, minutes=args.minutes, batch_size=args.batch_size, learning_rate=args.learning_rate,
                   seed=args.seed, log=lambda m: print(m, flush=True), hidden=args.hidden, layers=args.layers,
                   heads=args.heads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
