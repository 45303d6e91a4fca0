"""The bundled Shakespeare corpus, and a user's own text file, as Python strings.

Terminology:
  split:       ``'train'`` or ``'validation'``. The bundled corpus ships the two as separate
               files (``shakespeare/README.md``: Hamlet and The Tempest are held out); a user's
               file is split by position, its first 95% of characters for ``'train'`` and the
               last 5% for ``'validation'``.
  character:   a Unicode code point (one element of a Python ``str``), not a byte: cutting a
               user's file at a character never splits a multi-byte UTF-8 sequence.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import os

SPLITS = ("train", "validation")

# Fraction of a user file's characters that go to 'validation' (its tail).
VALIDATION_FRACTION = 0.05

_GZIP_MAGIC = b"\x1f\x8b"


def load_text(split: str = "train", path: str | os.PathLike | None = None) -> str:
    """The text of one split of the bundled corpus, or of a user's own text file.

    The bundled corpus (``path=None``) is the public-domain Shakespeare of
    ``jaxquant/data/shakespeare/``: ``'train'`` is 40 works (4,784,896 characters) and
    ``'validation'`` is Hamlet then The Tempest (272,385 characters). Use these splits as given so
    that perplexities are comparable across runs. The decompressed text is cached in memory.

    A user's file has no split of its own, so it is cut by position: with ``n`` characters and
    ``cut = floor(0.95 * n)``, ``'train'`` is ``text[:cut]`` and ``'validation'`` is
    ``text[cut:]``. The cut is at a character (code point), never inside a UTF-8 sequence, and
    the two parts concatenate to the whole file. The file is read on every call (not cached).

    Args:
      split: ``'train'`` or ``'validation'``.
      path: None for the bundled corpus, or the path of a UTF-8 text file; a file that is
        gzip-compressed (by its magic bytes, whatever its name) is decompressed.

    Returns:
      The split's text, a ``str``.

    Raises:
      ValueError: ``split`` is not ``'train'`` or ``'validation'``; ``path`` is not a file, is
        empty, or is not valid UTF-8.

    Example:
      >>> text = load_text("validation")
      >>> text.startswith("HAMLET, PRINCE OF DENMARK")
      True
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}.")
    if path is None:
        return _bundled_text(split)
    text = _read_user_file(os.fspath(path))
    cut = int(len(text) * (1.0 - VALIDATION_FRACTION))
    return text[:cut] if split == "train" else text[cut:]


@functools.lru_cache(maxsize=len(SPLITS))
def _bundled_text(split: str) -> str:
    resource = importlib.resources.files(__package__).joinpath("shakespeare", f"{split}.txt.gz")
    return gzip.decompress(resource.read_bytes()).decode("utf-8")


def _read_user_file(path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"path={path!r}: no such file.")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(_GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"path={path!r}: not a valid gzip file ({e}).") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"path={path!r}: not UTF-8 text ({e}).") from e
    if not text:
        raise ValueError(f"path={path!r}: the file is empty.")
    return text
