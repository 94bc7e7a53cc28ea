"""Training text that ships with Python, a byte-level tokenizer, a deterministic split, and batches.

Nothing is downloaded. Two corpora come with every CPython install:

* ``"pydoc"``: ``pydoc_data.topics``, the language reference's help topics (``help("assert")``...): about
  465,000 characters of English technical prose with code examples. Topics are joined in sorted order.
* ``"stdlib"``: the source of the standard library's top-level modules (``<stdlib>/*.py``, sorted by file name),
  about 4.7 MB of Python code.

Both depend on the Python version (3.11 here): ``corpus_info`` records a corpus's size and sha256 so a run says
exactly what it read. Any UTF-8 text file works too (``load_text_file``).

Tokenizer: bytes. A text is its UTF-8 encoding, one token per byte, vocabulary 256, no special tokens. It needs
no training, no file and no download, and it cannot fail on any input; the price is ~1 token per character, so a
context of T tokens sees T characters. That suits the small models trained here.

Split: the token stream is cut into blocks of ``SPLIT_BLOCK`` bytes; block i goes to ``"validation"`` if
i mod 20 = 9, to ``"test"`` if i mod 20 = 19, and to ``"train"`` otherwise (90 / 5 / 5 %). Interleaving spreads
each split over the whole corpus (its topics or modules), and the rule needs no randomness.

Batches: step s, micro-batch k of a run with seed S reads windows at offsets drawn from
``Generator(PCG64(SeedSequence([S, s, k])))``, so a batch depends on nothing but (S, s, k): a resumed run reads
exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
CORPORA = ("pydoc", "stdlib")
SPLIT_BLOCK = 2048
SPLIT_PERIOD = 20
SPLITS = {"validation": 9, "test": 19}  # block index mod SPLIT_PERIOD -> split; every other block is "train"


class DataError(ValueError):
    """A corpus, split or batch request is invalid; the message names it."""


# ----------------------------------------------------------------------------------------------
# corpora
# ----------------------------------------------------------------------------------------------


def load_corpus(name: str) -> str:
    """The text of a named corpus (``CORPORA``); see the module docstring."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    if name == "stdlib":
        folder = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(folder.glob("*.py"))
        if not files:
            raise DataError(f"corpus 'stdlib': no *.py files in {folder}")
        return "\n\n".join(file.read_text(encoding="utf-8", errors="replace") for file in files)
    raise DataError(f"corpus must be one of {list(CORPORA)}, got {name!r}")


def load_text_file(path: str | Path) -> str:
    """A UTF-8 text file (undecodable bytes become U+FFFD)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path}: no such file")
    return path.read_text(encoding="utf-8", errors="replace")


def corpus_info(text: str) -> dict[str, object]:
    """What a run records about its corpus: characters, bytes (= tokens) and the sha256 of the bytes."""
    data = text.encode("utf-8")
    return {"characters": len(text), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ----------------------------------------------------------------------------------------------
# the byte-level tokenizer
# ----------------------------------------------------------------------------------------------


def encode(text: str) -> np.ndarray:
    """text -> (n,) int64 token ids in [0, 256): the UTF-8 bytes."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode(ids) -> str:
    """(n,) token ids -> text; a cut multi-byte character becomes U+FFFD."""
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# split and batches
# ----------------------------------------------------------------------------------------------


def split_tokens(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """``{"train", "validation", "test"}`` -> (n_split,) int64, by the block rule of the module docstring."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"tokens must be one-dimensional, got shape {tokens.shape}")
    n_blocks = -(-len(tokens) // SPLIT_BLOCK)
    role = ["train"] * n_blocks
    for name, remainder in SPLITS.items():
        for i in range(remainder, n_blocks, SPLIT_PERIOD):
            role[i] = name
    pieces: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for i, name in enumerate(role):
        pieces[name].append(tokens[i * SPLIT_BLOCK : (i + 1) * SPLIT_BLOCK])
    return {name: np.concatenate(parts) if parts else tokens[:0] for name, parts in pieces.items()}


def batch_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The generator of micro-batch ``micro`` of step ``step`` (0-based) of a run seeded ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, micro])))


def sample_windows(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """(batch_size, seq_len) int64: windows of ``tokens`` at offsets uniform in [0, n − seq_len]."""
    if len(tokens) < seq_len:
        raise DataError(f"a split of {len(tokens)} tokens is shorter than one window of seq_len={seq_len}")
    offsets = rng.integers(0, len(tokens) - seq_len + 1, size=batch_size)  # (B,)
    return tokens[offsets[:, None] + np.arange(seq_len)[None, :]]  # (B, T)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """(n, seq_len) int64: consecutive non-overlapping windows (the tail that does not fill one is dropped);
    with ``max_windows``, that many of them, evenly spaced over the split."""
    n = len(tokens) // seq_len
    if n == 0:
        raise DataError(f"a split of {len(tokens)} tokens is shorter than one window of seq_len={seq_len}")
    windows = np.asarray(tokens[: n * seq_len]).reshape(n, seq_len)
    if max_windows is not None and max_windows < n:
        windows = windows[np.linspace(0, n - 1, max_windows).round().astype(np.int64)]
    return windows
