"""Offline tokenizers for the built-in models.

There is no model hub here, so the tokenizers the diffusers pipelines expect (CLIP for Stable
Diffusion, T5 for PixArt) are built from vocabularies defined in code. They are real
`transformers` tokenizer classes, so a pipeline saved with them reloads with plain
`DiffusionPipeline.from_pretrained`.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import CLIPTokenizer, T5TokenizerFast

__all__ = [
    "CLIP_MERGES_FILE",
    "CLIP_VOCAB_FILE",
    "T5_CHARACTERS",
    "bytes_to_unicode",
    "clip_byte_vocab",
    "clip_tokenizer",
    "t5_tokenizer",
    "write_clip_tokenizer_files",
]

CLIP_VOCAB_FILE = "clip_byte_vocab.json"
CLIP_MERGES_FILE = "clip_byte_merges.txt"
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2\n"

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
SENTENCEPIECE_SPACE = "\u2581"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte-to-symbol table.

    Byte-level BPE needs every byte to be a printable, non-space symbol so that any UTF-8 text
    maps onto the vocabulary; copied here because transformers 5 no longer exports it.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    symbols = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            symbols.append(256 + shifted)
            shifted += 1
    return {byte: chr(symbol) for byte, symbol in zip(printable, symbols)}


def clip_byte_vocab() -> dict[str, int]:
    """The smallest CLIP vocabulary that can encode any text.

    With no merges every word splits into byte symbols, and CLIP's BPE marks the last symbol
    of a word with `</w>`, so both forms are needed; the two special tokens come last, where
    CLIP also puts them (the end token is the largest id, which CLIP's pooling relies on in
    older transformers).
    """
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + END_OF_WORD for symbol in symbols), CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}


def write_clip_tokenizer_files(directory: str | Path) -> tuple[Path, Path]:
    """Write the vocabulary and the (empty) merges file.

    Used to generate the copies shipped in `fastdiff/models/data/`, and as a fallback when
    those are missing (e.g. a wheel built without package data).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path = directory / CLIP_VOCAB_FILE
    merges_path = directory / CLIP_MERGES_FILE
    vocab_text = json.dumps(clip_byte_vocab(), ensure_ascii=False, indent=0)
    vocab_path.write_text(vocab_text + "\n", encoding="utf-8")
    merges_path.write_text(MERGES_HEADER, encoding="utf-8")
    return vocab_path, merges_path


@contextmanager
def _clip_files() -> Iterator[tuple[Path, Path]]:
    """Yield paths to the shipped files, or to freshly written ones if they were not shipped."""
    data = resources.files(__package__).joinpath("data")
    vocab, merges = data.joinpath(CLIP_VOCAB_FILE), data.joinpath(CLIP_MERGES_FILE)
    if vocab.is_file() and merges.is_file():
        with resources.as_file(vocab) as vocab_path, resources.as_file(merges) as merges_path:
            yield vocab_path, merges_path
        return
    with tempfile.TemporaryDirectory(prefix="fastdiff-clip-") as tmp:
        yield write_clip_tokenizer_files(tmp)


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer that needs no download.

    Paths are positional because the keyword names differ between transformers 4 and 5, and
    `model_max_length` must be set: the pipelines pad to it, and the library default is a
    huge sentinel that fails with "int too big to convert".
    """
    with _clip_files() as (vocab_path, merges_path):
        return CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=model_max_length)


def _t5_character_set() -> tuple[str, ...]:
    """Characters of common Latin, Greek and Cyrillic text; anything else becomes `<unk>`.

    Real T5 also maps characters outside its vocabulary to `<unk>`. A byte fallback would be
    lossless, but transformers 5 rebuilds `T5Tokenizer` on load with byte fallback off, so a
    saved pipeline would tokenize differently from the one that was built.
    """
    ranges = [
        (0x21, 0x7E),  # ASCII printable (space is the SentencePiece marker instead)
        (0xA1, 0xFF),  # Latin-1 supplement
        (0x100, 0x17F),  # Latin extended-A
        (0x391, 0x3C9),  # Greek
        (0x400, 0x45F),  # Cyrillic
        (0x2010, 0x2027),  # dashes, quotes, ellipsis
    ]
    chars = (chr(code) for low, high in ranges for code in range(low, high + 1))
    return tuple(char for char in chars if char.isprintable() and not char.isspace())


T5_CHARACTERS: tuple[str, ...] = _t5_character_set()


def _t5_backend() -> Tokenizer:
    """A character-level Unigram laid out exactly as `T5Tokenizer` lays out its backend.

    transformers 5 reconstructs T5 tokenizers on load from the vocabulary alone (Unigram,
    whitespace split + Metaspace, `</s>` appended), so matching that layout is what makes
    save/load round-trip; transformers 4 simply reloads this object from tokenizer.json.
    """
    specials = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)]
    pieces = [(SENTENCEPIECE_SPACE, -2.0), *((char, -5.0) for char in T5_CHARACTERS)]
    backend = Tokenizer(Unigram(specials + pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=SENTENCEPIECE_SPACE, prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=SENTENCEPIECE_SPACE, prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    return backend


def t5_tokenizer(model_max_length: int = 120) -> T5TokenizerFast:
    """A T5 tokenizer that needs no download (PixArt's text side).

    `extra_ids=0` drops T5's span-corruption sentinels, which no diffusion pipeline uses; the
    default length is PixArt's `max_sequence_length`.
    """
    return T5TokenizerFast(
        tokenizer_object=_t5_backend(),
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        model_max_length=model_max_length,
    )
