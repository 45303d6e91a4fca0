"""Tokenizers: text to int32 token ids and back, with the byte counts that bits per byte needs.

Terminology:
  token id:      an int32 in ``[0, vocab_size)``.
  token bytes:   the number of UTF-8 bytes of text a token id stands for (1 for every id of the
                 byte tokenizer; 0 for control ids). Summed over the target tokens of an
                 evaluation, it is the byte count that turns a loss in nats per token into bits
                 per byte, a number comparable across tokenizers.
  bits per byte: ``nats_per_token / (ln 2 · bytes_per_token)``.
  byte fallback: a SentencePiece option that spells any character outside the learned pieces as
                 its UTF-8 bytes (ids ``<0x00>``...``<0xFF>``), so every string round-trips.
"""

from __future__ import annotations

import abc
import io
import math
import os

import numpy as np

TOKENIZERS = ("byte", "sentencepiece")

# SentencePiece's whitespace symbol; literal occurrences in a text are spelled as bytes.
_SPM_SPACE = "\u2581"
# Training sentences are cut to at most this many characters: SentencePiece skips sentences
# longer than its max_sentence_length (4192 bytes), and a character has at most 4 bytes.
_SPM_MAX_SENTENCE_CHARS = 1024


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
    """Converts a mean loss in nats per token to bits per byte of UTF-8 text.

    ``bits_per_byte = nats_per_token / (ln 2 · bytes_per_token)``; with ``bytes_per_token`` the
    exact ratio of the evaluated text (``sum(token_bytes()[targets]) / len(targets)``), the
    result does not depend on the tokenizer, so byte- and SentencePiece-models compare directly.

    Args:
      nats_per_token: mean cross-entropy per target token, in nats.
      bytes_per_token: UTF-8 bytes of text per target token (> 0).

    Returns:
      Bits per byte, a float.
    """
    if not bytes_per_token > 0:
        raise ValueError(f"bytes_per_token={bytes_per_token}: expected a positive number.")
    return float(nats_per_token) / (math.log(2.0) * float(bytes_per_token))


class Tokenizer(abc.ABC):
    """Maps text to a 1-D int32 array of token ids in ``[0, vocab_size)`` and back."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; every id ``encode`` returns is below it."""

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``: int32 ``[num_tokens]``; ``decode(encode(text)) == text``."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """The text of 1-D token ids (a list, numpy or JAX array of integers)."""

    @abc.abstractmethod
    def token_bytes(self) -> np.ndarray:
        """int32 ``[vocab_size]``: the UTF-8 bytes of text each token id stands for."""

    def bytes_per_token(self, text: str) -> float:
        """UTF-8 bytes of ``text`` per token of its encoding (the ratio ``bits_per_byte`` needs)."""
        ids = self.encode(text)
        if ids.size == 0:
            raise ValueError("text: empty, so bytes per token is undefined.")
        return len(text.encode("utf-8")) / ids.size

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids: expected a 1-D array of token ids, got shape {ids.shape}.")
        if ids.size == 0:
            return ids.astype(np.int32)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids: expected integer token ids, got dtype {ids.dtype}.")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(
                f"ids: values in [{lo}, {hi}], outside [0, vocab_size={self.vocab_size})."
            )
        return ids


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text: 256 ids, no training, and a lossless round trip.

    Every token stands for exactly one byte, so the loss in nats per token divided by ``ln 2``
    is already bits per byte.

    Example:
      >>> tok = ByteTokenizer()
      >>> tok.encode("né").tolist()
      [110, 195, 169]
      >>> tok.decode([110, 195, 169])
      'né'
    """

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        # Sampled ids need not form valid UTF-8: invalid sequences decode to U+FFFD.
        return self._check_ids(ids).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, np.int32)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError(
            "SentencePieceTokenizer needs the sentencepiece package: "
            "pip install 'jaxquant[spm]' (or pip install 'sentencepiece>=0.2,<0.3')."
        ) from e
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (BPE or unigram) with byte fallback, loaded from a ``.model`` file.

    Models made by ``train`` keep the text exactly: no normalization, no dummy prefix, no
    whitespace folding, and byte fallback for unseen characters, so ``decode(encode(text)) ==
    text`` for every string. They have no BOS/EOS ids; id 0 is ``<unk>`` (never produced), ids 1 to
    256 the bytes ``<0x00>``...``<0xFF>``, and the learned pieces follow.

    Args:
      model_path: path of a SentencePiece ``.model`` file.

    Example:
      >>> tok = SentencePieceTokenizer.train(text, "/tmp/spm.model", vocab_size=512)
      >>> tok = SentencePieceTokenizer("/tmp/spm.model")  # later, or in another process
      >>> tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"
      True
    """

    def __init__(self, model_path: str | os.PathLike):
        spm = _import_sentencepiece()
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise ValueError(f"model_path={self.model_path!r}: no such file.")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(
                f"model_path={self.model_path!r}: not a SentencePiece model ({e})."
            ) from e
        self._space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPM_SPACE.encode()]
        self._has_byte_fallback = all(self._sp.is_byte(i) for i in self._space_ids)

    @classmethod
    def train(
        cls,
        text: str,
        model_path: str | os.PathLike,
        *,
        vocab_size: int,
        model_type: str = "bpe",
    ) -> SentencePieceTokenizer:
        """Trains a model on ``text``, writes it to ``model_path`` and returns it loaded.

        Training sees ``text`` as sentences split at newlines (a newline itself is encoded with
        its byte id). Every character of ``text`` gets its own piece, so ``vocab_size`` must be
        at least ``257 + len(set(text))``; the rest of the vocabulary is learned merges (BPE) or
        pieces (unigram). BPE on the bundled train split takes about a second.

        Args:
          text: the training text.
          model_path: where to write the model (the exact file name; parent folders are made).
          vocab_size: number of ids, byte ids and ``<unk>`` included.
          model_type: ``'bpe'`` or ``'unigram'``.

        Returns:
          The trained tokenizer, loaded from ``model_path``.
        """
        spm = _import_sentencepiece()
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type={model_type!r}: expected 'bpe' or 'unigram'.")
        if not isinstance(vocab_size, int) or vocab_size <= 256:
            raise ValueError(
                f"vocab_size={vocab_size!r}: expected an int above 256 (the byte-fallback ids)."
            )
        if not text:
            raise ValueError("text: empty; SentencePiece needs text to train on.")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(text),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                character_coverage=1.0,
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                split_digits=True,
                bos_id=-1,
                eos_id=-1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(f"vocab_size={vocab_size}: SentencePiece training failed: {e}") from e
        model_path = os.fspath(model_path)
        os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
        with open(model_path, "wb") as f:
            f.write(model.getvalue())
        return cls(model_path)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> np.ndarray:
        # SentencePiece reads a literal U+2581 as a space; spell it with its byte ids instead.
        parts = text.split(_SPM_SPACE)
        if len(parts) > 1 and not self._has_byte_fallback:
            raise ValueError(
                f"text contains U+2581, which model {self.model_path!r} (no byte fallback) "
                "cannot encode."
            )
        ids = []
        for i, part in enumerate(parts):
            if i:
                ids.extend(self._space_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return np.asarray(ids, np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode(self._check_ids(ids).tolist())

    def token_bytes(self) -> np.ndarray:
        sp = self._sp
        n = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                n[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                n[i] = len(sp.id_to_piece(i).replace(_SPM_SPACE, " ").encode("utf-8"))
        return n

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _training_sentences(text: str):
    for line in text.split("\n"):
        for start in range(0, len(line), _SPM_MAX_SENTENCE_CHARS):
            yield line[start : start + _SPM_MAX_SENTENCE_CHARS]


def get_tokenizer(
    name: str,
    *,
    vocab_size: int | None = None,
    model_path: str | os.PathLike | None = None,
    train_text: str | None = None,
    model_type: str = "bpe",
) -> Tokenizer:
    """A tokenizer by name, as configs choose it.

    * ``'byte'``: ``ByteTokenizer()``; ``vocab_size`` must be None or 256, the other arguments
      are ignored.
    * ``'sentencepiece'``: loads ``model_path`` when the file exists (checking ``vocab_size``
      when given); otherwise trains a ``model_type`` model of ``vocab_size`` ids on
      ``train_text`` and writes it to ``model_path``. So a run trains its tokenizer once and
      a resumed run, or an evaluation, reloads it. In a multi-process run, train on one process
      and wait (or ship the file) before the others call this.

    Args:
      name: ``'byte'`` or ``'sentencepiece'``.
      vocab_size: number of token ids.
      model_path: the SentencePiece ``.model`` file to load, or to write after training.
      train_text: the text to train SentencePiece on when ``model_path`` does not exist yet.
      model_type: ``'bpe'`` or ``'unigram'`` (SentencePiece training only).

    Returns:
      A ``Tokenizer``.
    """
    if name == "byte":
        if vocab_size not in (None, 256):
            raise ValueError(f"vocab_size={vocab_size!r}: the byte tokenizer has 256 ids.")
        return ByteTokenizer()
    if name == "sentencepiece":
        if model_path is None:
            raise ValueError("model_path=None: the sentencepiece tokenizer needs a .model path.")
        if os.path.isfile(model_path):
            tok = SentencePieceTokenizer(model_path)
            if vocab_size is not None and tok.vocab_size != vocab_size:
                raise ValueError(
                    f"vocab_size={vocab_size}: model_path={os.fspath(model_path)!r} holds a "
                    f"model of {tok.vocab_size} ids."
                )
            return tok
        if train_text is None or vocab_size is None:
            raise ValueError(
                f"model_path={os.fspath(model_path)!r} does not exist; pass train_text and "
                f"vocab_size to train it (got train_text={'None' if train_text is None else '...'}"
                f", vocab_size={vocab_size!r})."
            )
        return SentencePieceTokenizer.train(
            train_text, model_path, vocab_size=vocab_size, model_type=model_type
        )
    raise ValueError(f"name={name!r}: expected one of {TOKENIZERS}.")
