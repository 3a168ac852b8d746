"""``pydoc-mdlm``: a small masked diffusion language model trained on Python's own help text.

The corpus is ``pydoc_data.topics`` (the text of ``help("assert")`` and friends), which ships
with every Python. The topics change between Python versions, so the package carries a snapshot
of them (``data/pydoc_topics.json.gz``, written by ``snapshot``) and trains and evaluates on
that: the model and its validation bound reproduce under any Python. Documents are the topics in sorted order, each followed by ``<eos>``; every
seventh topic is held out for validation. A byte-level BPE tokenizer (1,024 tokens, with
``<pad>``, ``<mask>``, ``<eos>``) is trained on the training topics, and a 4-layer RoFormer
(``RoFormerForMaskedLM``, no time input, as LLaDA) on windows of 192 tokens with the MDLM objective
for the linear schedule: mask each token with probability t and predict the masked ones. Training
minimises their mean cross-entropy; evaluation weights it by 1/t, which makes it an upper
bound on the negative log-likelihood per token (the ELBO). The exponential of that bound is the
validation perplexity bound reported by ``evaluate``.

    python -m fastdiff.models.pydoc_text snapshot   # only to refresh the corpus from this Python
    python -m fastdiff.models.pydoc_text train --out fastdiff/models/weights/pydoc-mdlm
    python -m fastdiff.models.pydoc_text evaluate
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..check_only import exit_if_check_only
from ..core.objectives import LossLog, masked_diffusion_loss, optimizer_step

PYDOC_MDLM_NAME = "pydoc-mdlm"
PYDOC_MDLM_DIR = Path(__file__).parent / "weights" / PYDOC_MDLM_NAME
CORPUS_SNAPSHOT = Path(__file__).parent / "data" / "pydoc_topics.json.gz"
SEQUENCE_LENGTH = 192
HIDDEN = 192
LAYERS = 4
HEAD_WIDTH = 48
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<pad>", "<mask>", "<eos>")
DEFAULT_STEPS = 3000
LEARNING_RATE = 6e-4
HELD_OUT_EVERY = 7


def corpus(snapshot: Path = CORPUS_SNAPSHOT) -> tuple[list[str], list[str]]:
    """(training topics, validation topics) of the shipped ``pydoc_data.topics`` snapshot:
    distinct texts in the order of their topic names, every ``HELD_OUT_EVERY``-th held out."""
    if not snapshot.is_file():
        raise FileNotFoundError(f"the pydoc corpus snapshot {snapshot} is missing; write it with "
                                "`python -m fastdiff.models.pydoc_text snapshot`")
    topics = json.loads(gzip.decompress(snapshot.read_bytes()))["topics"]
    texts = list(dict.fromkeys(topics[name] for name in sorted(topics)))  # some names share one text
    train = [text for i, text in enumerate(texts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    valid = [text for i, text in enumerate(texts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, valid


def write_snapshot(path: Path = CORPUS_SNAPSHOT) -> dict[str, Any]:
    """This Python's ``pydoc_data.topics`` as the corpus (gzip-compressed JSON, byte-stable:
    no timestamp, sorted keys)."""
    from pydoc_data.topics import topics

    record = {"python": sys.version.split()[0], "topics": dict(topics)}
    data = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    return {"python": record["python"], "topics": len(topics), "bytes": path.stat().st_size}


def train_tokenizer(texts: Sequence[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", mask_token="<mask>",
                                   eos_token="<eos>", model_max_length=SEQUENCE_LENGTH)


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def build_model(tokenizer: Any, seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS) -> torch.nn.Module:
    """A RoFormer (BERT with rotary positions): with learned absolute positions a model this small
    stays at the unigram plateau for thousands of steps on this corpus, while rotary positions
    let attention find the neighbouring tokens at once."""
    from transformers import RoFormerConfig, RoFormerForMaskedLM

    if hidden < HEAD_WIDTH or hidden % HEAD_WIDTH:
        # rotary positions rotate pairs of channels, so every head needs the same, even width
        raise ValueError(f"hidden: must be a positive multiple of {HEAD_WIDTH} (the width of one attention head), "
                         f"got {hidden}")
    if layers < 1:
        raise ValueError(f"layers: must be >= 1, got {layers}")
    torch.manual_seed(seed)
    config = RoFormerConfig(vocab_size=len(tokenizer), embedding_size=hidden, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=hidden // HEAD_WIDTH, intermediate_size=4 * hidden,
                            max_position_embeddings=256,
                            type_vocab_size=1, pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.1,
                            attention_probs_dropout_prob=0.1)
    return RoFormerForMaskedLM(config)


def _windows(stream: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - SEQUENCE_LENGTH, (count,), generator=generator)
    return torch.stack([stream[s:s + SEQUENCE_LENGTH] for s in starts.tolist()])


def train(out: Path, seed: int = 0, steps: int = DEFAULT_STEPS, batch_size: int = 16, log: Any = print,
          hidden: int = HIDDEN, layers: int = LAYERS, learning_rate: float = LEARNING_RATE,
          device: str = "cpu") -> dict:
    """The shipped model with the defaults. ``hidden``/``layers``/``device`` train larger variants
    (on a GPU) to see what model strength buys the samplers; they are not the shipped model."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    train_texts, valid_texts = corpus()
    tokenizer = train_tokenizer(train_texts)
    stream = token_stream(tokenizer, train_texts)
    log(f"corpus: {len(train_texts)} training topics, {len(stream)} tokens; vocabulary {len(tokenizer)}")
    model = build_model(tokenizer, seed, hidden, layers).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = get_cosine_schedule_with_warmup(optimizer, 200, steps)
    generator = torch.Generator().manual_seed(seed)
    mask_id = tokenizer.mask_token_id
    started = time.perf_counter()
    losses = LossLog(log, steps, started=started)
    for step in range(steps):
        loss = masked_diffusion_loss(model, _windows(stream, batch_size, generator).to(device), mask_id, generator,
                                     elbo=False)
        losses.add(step, optimizer_step(model.parameters(), optimizer, loss))
        schedule.step()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.cpu().half().save_pretrained(out)  # float16 on disk (a few MB); loaded as float32
    tokenizer.save_pretrained(out)
    model.float()
    result = {"train_seconds": round(time.perf_counter() - started), "steps": steps, "batch_size": batch_size,
              "seed": seed, **({"hidden": hidden, "layers": layers, "learning_rate": learning_rate, "device": device}
                               if (hidden, layers, learning_rate, device) != (HIDDEN, LAYERS, LEARNING_RATE, "cpu")
                               else {}), "python": sys.version.split()[0], **evaluate(model, tokenizer, valid_texts)}
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str] | None = None, passes: int = 16,
             seed: int = 0) -> dict:
    """The validation bound: mean negative ELBO per token (nats) and its perplexity, over
    non-overlapping windows of the held-out topics, ``passes`` draws of masks each."""
    texts = corpus()[1] if texts is None else texts
    stream = token_stream(tokenizer, texts)
    count = len(stream) // SEQUENCE_LENGTH
    windows = stream[:count * SEQUENCE_LENGTH].reshape(count, SEQUENCE_LENGTH)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    total = sum(float(masked_diffusion_loss(model, windows, tokenizer.mask_token_id, generator))
                for _ in range(passes)) / passes
    return {"valid_tokens": int(windows.numel()), "valid_nelbo_per_token": round(total, 4),
            "valid_perplexity_bound": round(math.exp(total), 2)}


def load_pydoc_mdlm(path: str | Path = PYDOC_MDLM_DIR, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of the shipped model."""
    from transformers import PreTrainedTokenizerFast, RoFormerForMaskedLM

    path = Path(path)
    if not (path / "config.json").exists():
        from .builtin import ModelLoadError

        raise ModelLoadError(f"pydoc-mdlm weights not found in {path}; train them with "
                             "`python -m fastdiff.models.pydoc_text train`")
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a bar over a few MB of built-in weights is only noise
    try:
        model = RoFormerForMaskedLM.from_pretrained(path, dtype=dtype).eval()
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


PROG = "python -m fastdiff.models.pydoc_text"


def _device(text: str) -> str:
    import argparse

    from ..runner import resolve_device

    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("device: ")) from None
    return text


def _parser() -> argparse.ArgumentParser:
    from ..cli import Parser  # one-line mistakes, defaults in the help: as fastdiff's own
    from ..cli_checks import float_range, int_at_least

    parser = Parser(prog=PROG, description=__doc__.split("\n")[0].replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,snapshot}")
    trainer = commands.add_parser("train", help="train the model on the corpus snapshot and save it",
                                  description="Train the RoFormer masked diffusion LM on the training topics of the "
                                              "corpus snapshot, then save it (float16) with its tokenizer and "
                                              "training.json, which holds the validation bound.")
    trainer.add_argument("--out", type=Path, default=PYDOC_MDLM_DIR, metavar="DIR",
                         help="folder to write the model to (default: the shipped model's, "
                              "fastdiff/models/weights/pydoc-mdlm)")
    trainer.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the weights and the batches")
    trainer.add_argument("--steps", type=int_at_least(1), default=DEFAULT_STEPS, help="optimiser steps")
    trainer.add_argument("--batch-size", type=int_at_least(1), default=16,
                         help=f"windows of {SEQUENCE_LENGTH} tokens per step")
    trainer.add_argument("--hidden", type=int_at_least(HEAD_WIDTH), default=HIDDEN,
                         help=f"width, a multiple of {HEAD_WIDTH} (a larger variant; not the shipped model)")
    trainer.add_argument("--layers", type=int_at_least(1), default=LAYERS,
                         help="transformer layers (a larger variant; not the shipped model)")
    trainer.add_argument("--learning-rate", type=float_range(0, low_open=True), default=LEARNING_RATE,
                         help="peak learning rate (AdamW, warm-up then cosine decay)")
    trainer.add_argument("--device", type=_device, default="cpu", help="torch device to train on (cpu, cuda, ...)")
    evaluator = commands.add_parser("evaluate", help="the validation perplexity bound of a trained model",
                                    description="The mean negative ELBO per token and its perplexity bound on the "
                                                "held-out topics, as training.json reports it.")
    evaluator.add_argument("--model", type=Path, default=PYDOC_MDLM_DIR, metavar="DIR",
                           help="folder of the trained model (default: the shipped one)")
    snapshotter = commands.add_parser("snapshot", help="write this Python's pydoc topics as the corpus",
                                      description="Write this Python's pydoc_data.topics as the corpus snapshot "
                                                  "(only to refresh it: the shipped model was trained on the "
                                                  "shipped snapshot).")
    snapshotter.add_argument("--out", type=Path, default=CORPUS_SNAPSHOT, metavar="PATH",
                             help="file to write (default: the shipped snapshot, "
                                  "fastdiff/models/data/pydoc_topics.json.gz)")
    parser.commands = commands.choices  # type: ignore[attr-defined]  # each command's parser blames its own mistakes
    return parser


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
        elif args.command == "snapshot":
            check_output_file("--out", args.out)
    except UsageError as error:
        parser.error(str(error))
    if args.command == "train" and args.hidden % HEAD_WIDTH:
        parser.error(f"--hidden: must be a multiple of {HEAD_WIDTH} (the width of one attention head), "
                     f"got {args.hidden}")
    if args.command == "evaluate" and not (args.model / "config.json").is_file():
        parser.error(f"--model: {str(args.model)!r} holds no pydoc-mdlm model (config.json); train one with "
                     f"`{PROG} train --out {args.model}`")
    exit_if_check_only("python -m fastdiff.models.pydoc_text")
    if args.command == "snapshot":
        print(json.dumps(write_snapshot(args.out)))
        return 0
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "train":
        result = train(args.out, args.seed, args.steps, args.batch_size, log=lambda m: print(m, flush=True),
                       hidden=args.hidden, layers=args.layers, learning_rate=args.learning_rate, device=args.device)
    else:
        model, tokenizer = load_pydoc_mdlm(args.model)
        result = evaluate(model, tokenizer)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
