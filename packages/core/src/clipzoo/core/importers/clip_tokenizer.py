"""CLIP's byte-level BPE tokenizer as a transformers ``CLIPTokenizer``, built from the
merges file OpenAI released (``bpe_simple_vocab_16e6.txt.gz``, bundled with open_clip).

How the vocabulary follows from the merges file (the file's first line is a header):

1. the 256 byte symbols of GPT-2's byte-to-unicode table, in byte order of that table;
2. the same 256 symbols with the end-of-word marker ``</w>`` appended;
3. one token per merge, the two halves joined, for the first 49152 - 256 - 2 = 48894
   merges, in file order;
4. ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

That is 49408 ids, the vocabulary every OpenAI-style CLIP text tower embeds. ``merges.txt``
is the same 48894 merges under a ``#version: 0.2`` header. open_clip's own tokenizer uses
the same ids (it names the two special tokens ``<start_of_text>``/``<end_of_text>``); it
lower-cases and collapses whitespace as transformers' normaliser does, but also runs
``ftfy`` and unescapes HTML entities, so captions with mojibake or ``&amp;``-style entities
can tokenize differently. The test suite checks equal ids on ordinary captions.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from ..errors import ConfigError

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
START, END = "<|startoftext|>", "<|endoftext|>"


def find_bpe_file(bpe_path: str | Path | None = None) -> Path:
    """``bpe_path`` if given, else the copy inside an installed open_clip (not imported)."""
    if bpe_path is not None:
        path = Path(bpe_path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such BPE merges file")
        return path
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / BPE_FILENAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"building CLIP's tokenizer needs its BPE merges file ({BPE_FILENAME}): install open_clip_torch "
        "(it ships the file) or pass a tokenizer folder / Hub id (e.g. openai/clip-vit-base-patch32)"
    )


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable unicode table, as a list in table order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):  # the other bytes map past 255, in byte order
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(find_bpe_file(bpe_path)).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ConfigError(f"{bpe_path}: expected {N_MERGES} merges of two symbols after the header")
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), START, END]
    return {token: i for i, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(folder: str | Path, context_length: int = 77, bpe_path: str | Path | None = None) -> Path:
    """Write a ``CLIPTokenizer`` (tokenizer.json + config) to ``folder``; returns the folder."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(bpe_path)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=int(context_length))
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    return folder
