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
import re

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


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "Pretrained tokenizers need the tokenizers package: pip install 'jaxquant[pretrained]' "
            "(or pip install 'tokenizers>=0.20,<1')."
        ) from e
    return tokenizers


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that spells each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


# Pre-tokenizer regexes of the byte-level BPE vocabularies that GGUF files name in
# ``tokenizer.ggml.pre`` (as llama.cpp's converter records them).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split regex, digits split one by one first)
GGUF_PRE_TOKENIZERS = {
    "default": (_GPT2_SPLIT, False),
    "gpt-2": (_GPT2_SPLIT, False),
    "smollm": (_GPT2_SPLIT, True),
    "starcoder": (_GPT2_SPLIT, True),
    "refact": (_GPT2_SPLIT, True),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "llama3": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
}


def _byte_level_tokenizer_from_gguf(fields: dict, tokens: list, types: list):
    """A byte-level BPE ``tokenizers.Tokenizer`` from a ``'gpt2'`` GGUF vocabulary."""
    tk = _import_tokenizers()
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre={pre!r}: unknown pre-tokenizer (known: "
            f"{sorted(GGUF_PRE_TOKENIZERS)}); pass the model's tokenizer.json instead "
            "(load_pretrained(..., tokenizer=PATH))."
        )
    if "tokenizer.ggml.merges" not in fields:
        raise ValueError("GGUF tokenizer.ggml.model='gpt2' without tokenizer.ggml.merges.")
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    model = tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tokenizer = tk.Tokenizer(model)
    split, digits = GGUF_PRE_TOKENIZERS[pre]
    steps = [tk.pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [
        tk.pre_tokenizers.Split(tk.Regex(split), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(steps)
    tokenizer.decoder = tk.decoders.ByteLevel()
    pairs = list(zip(tokens, types, strict=True))
    tokenizer.add_special_tokens([tk.AddedToken(t, special=True) for t, k in pairs if k == 3])
    tokenizer.add_tokens([tk.AddedToken(t, special=False) for t, k in pairs if k == 4])
    return tokenizer


def spm_merges(tokens: list[str], scores, mergeable) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary, ranked by the merged piece's score.

    SentencePiece's BPE encoder repeatedly joins the adjacent pair whose concatenation is the
    piece of highest score; a ranked merge list says the same to a BPE that applies the
    lowest-ranked pair first. As transformers' SentencePiece converter derives it: every split
    ``(l, r)`` of a piece whose halves are both in the vocabulary is a merge, ranked by the
    piece's score (descending), ties by the halves' ids. Only ``mergeable`` ids (normal and
    user-defined pieces) are merge results, as in SentencePiece itself, where control, byte
    and unknown pieces never come out of a merge.

    Args:
      tokens: the pieces, by id.
      scores: float ``[len(tokens)]``: each piece's score (log probability or ``-rank``).
      mergeable: bool ``[len(tokens)]``: the ids a merge may produce.

    Returns:
      The merges ``[(left, right), ...]``, highest priority first.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, piece in enumerate(tokens):
        if not mergeable[i]:
            continue
        local = [
            (vocab[piece[:k]], vocab[piece[k:]])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges.extend((-float(scores[i]), left, right) for left, right in sorted(local))
    merges.sort(key=lambda m: m[0])  # stable: ties keep the halves' id order
    return [(tokens[left], tokens[right]) for _, left, right in merges]


def spm_tokenizer_from_gguf(fields: dict, tokens: list, types: list):
    """A ``tokenizers.Tokenizer`` for a SentencePiece (``'llama'``) GGUF vocabulary.

    It tokenizes as llama.cpp's SPM tokenizer and the Hugging Face Llama 2 fast tokenizer do:
    spaces become ``▁`` and, with ``tokenizer.ggml.add_space_prefix`` (default True), one
    ``▁`` is put before the text (and after each special token); BPE over the characters with
    the merges of ``spm_merges``; a character outside the vocabulary is spelled by its UTF-8
    byte pieces ``<0xNN>`` (or ``<unk>`` without them). Decoding turns ``▁`` back into spaces,
    byte pieces into their bytes, and drops the prefix space. Control and unknown pieces are
    special tokens (``decode`` skips them), user-defined pieces are matched in the text as is.
    """
    tk = _import_tokenizers()
    if "tokenizer.ggml.scores" not in fields:
        raise ValueError("GGUF tokenizer.ggml.model='llama' without tokenizer.ggml.scores.")
    scores = list(fields["tokenizer.ggml.scores"])
    if len(scores) != len(tokens):
        raise ValueError(
            f"GGUF: {len(tokens)} tokens but {len(scores)} scores: a corrupt vocabulary."
        )
    if len(set(tokens)) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens: a piece occurs twice; a corrupt vocabulary.")
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    unk_piece = None
    if unk is not None:
        unk_piece = tokens[int(unk)]
    elif 2 in types:
        unk_piece = tokens[types.index(2)]
    merges = spm_merges(tokens, scores, [t in (1, 4) for t in types])
    has_bytes = 6 in types
    model = tk.models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        unk_token=unk_piece,
        fuse_unk=True,
        byte_fallback=has_bytes,
    )
    tokenizer = tk.Tokenizer(model)
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    replace = tk.normalizers.Replace(" ", _SPM_SPACE)
    tokenizer.normalizer = (
        tk.normalizers.Sequence([tk.normalizers.Prepend(_SPM_SPACE), replace])
        if prefix
        else replace
    )
    steps = [tk.decoders.Replace(_SPM_SPACE, " ")]
    steps += [tk.decoders.ByteFallback()] if has_bytes else []
    steps += [tk.decoders.Fuse()]
    steps += [tk.decoders.Strip(content=" ", left=1, right=0)] if prefix else []
    tokenizer.decoder = tk.decoders.Sequence(steps)
    pairs = list(zip(tokens, types, strict=True))
    tokenizer.add_special_tokens(
        [tk.AddedToken(t, special=True, normalized=False) for t, k in pairs if k in (2, 3)]
    )
    tokenizer.add_tokens(
        [tk.AddedToken(t, special=False, normalized=False) for t, k in pairs if k == 4]
    )
    return tokenizer


# A SentencePiece byte-fallback piece: one byte of UTF-8 text.
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _decoder_kinds(decoder) -> set:
    """The decoder types in a ``tokenizers`` decoder (a Sequence's parts included); a
    ``Replace`` as ``('Replace', pattern)``."""
    if decoder is None:
        return set()
    import json

    kinds, todo = set(), [json.loads(decoder.__getstate__())]
    while todo:
        d = todo.pop()
        if d.get("type") == "Sequence":
            todo.extend(d.get("decoders", []))
        elif d.get("type") == "Replace":
            kinds.add(("Replace", d.get("pattern", {}).get("String")))
        else:
            kinds.add(d.get("type"))
    return kinds


class PretrainedTokenizer(Tokenizer):
    """A pretrained model's tokenizer: a ``tokenizers.Tokenizer`` with its special tokens and chat
    template (from ``tokenizer.json`` + ``tokenizer_config.json``, or from a GGUF's metadata).

    ``encode`` adds no special tokens unless ``add_bos`` (the model's own convention, kept in
    ``self.add_bos``); ``decode`` drops special tokens unless ``skip_special=False``.
    ``chat(messages)`` renders the model's Jinja chat template.

    Args:
      tokenizer: a ``tokenizers.Tokenizer``.
      bos_id, eos_ids: begin-of-sequence id (or None) and the ids that end a generation.
      chat_template: the Jinja template string, or None (then ``chat`` raises).
      add_bos: whether the model expects ``bos_id`` first (``encode(..., add_bos=None)`` uses it).
      vocab_size: the model's vocabulary (embedding rows), at least the tokenizer's.
    """

    def __init__(
        self,
        tokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: tuple[int, ...] = (),
        chat_template: str | None = None,
        add_bos: bool = False,
        vocab_size: int | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.special_tokens = dict(special_tokens or {})
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and vocab_size < n:
            raise ValueError(
                f"PretrainedTokenizer: the tokenizer has {n} ids but the model only "
                f"vocab_size={vocab_size}: they do not belong together."
            )
        self._vocab_size = vocab_size or n

    @classmethod
    def from_files(cls, directory, *, vocab_size: int | None = None) -> PretrainedTokenizer:
        """Reads ``tokenizer.json`` and, when present, ``tokenizer_config.json`` (special tokens,
        chat template) and ``generation_config.json`` (eos ids) of a Hugging Face checkpoint."""
        import json

        tk = _import_tokenizers()
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory}: no tokenizer.json (a tokenizers file).")
        tokenizer = tk.Tokenizer.from_file(path)

        def read(name):
            p = os.path.join(directory, name)
            if not os.path.exists(p):
                return {}
            with open(p, encoding="utf-8") as f:
                return json.load(f)

        config, generation = read("tokenizer_config.json"), read("generation_config.json")

        def token(v):
            return v.get("content") if isinstance(v, dict) else v

        def token_id(v):
            t = token(v)
            return None if t is None else tokenizer.token_to_id(t)

        specials = {
            k: token(config[k])
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
            if token(config.get(k)) is not None
        }
        eos = generation.get("eos_token_id", token_id(config.get("eos_token")))
        eos = () if eos is None else (eos if isinstance(eos, list) else [eos])
        template = config.get("chat_template")
        if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        return cls(
            tokenizer,
            bos_id=token_id(config.get("bos_token")),
            eos_ids=tuple(eos),
            chat_template=template,
            add_bos=bool(config.get("add_bos_token", False)),
            vocab_size=vocab_size,
            special_tokens=specials,
        )

    @classmethod
    def from_gguf(cls, fields: dict, *, vocab_size: int | None = None) -> PretrainedTokenizer:
        """Builds the tokenizer from a GGUF's ``tokenizer.ggml.*`` metadata (``fields``: name to
        value), as llama.cpp tokenizes.

        * ``tokenizer.ggml.model == 'gpt2'``: byte-level BPE (Llama 3, Qwen2, SmolLM2) with the
          pre-tokenizers of ``GGUF_PRE_TOKENIZERS``; ``add_bos_token`` defaults to False.
        * ``'llama'``: a SentencePiece BPE vocabulary (Llama 2, Mistral, TinyLlama), see
          ``spm_tokenizer_from_gguf``; ``add_bos_token`` defaults to True, as in llama.cpp.

        Other models (``'bert'``, ``'t5'``, ...) raise a ValueError naming the value.
        """
        kind = fields.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ValueError(
                f"GGUF tokenizer.ggml.model={kind!r}: supported are 'gpt2' (byte-level BPE: "
                "Llama 3, Qwen2, SmolLM2) and 'llama' (SentencePiece BPE: Llama 2, Mistral); pass "
                "the model's tokenizer.json instead (load_pretrained(..., tokenizer=PATH))."
            )
        tokens = list(fields["tokenizer.ggml.tokens"])
        types = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        if len(types) != len(tokens):
            raise ValueError(
                f"GGUF: {len(tokens)} tokens but {len(types)} token types: a corrupt vocabulary."
            )
        if kind == "gpt2":
            tokenizer = _byte_level_tokenizer_from_gguf(fields, tokens, types)
        else:
            tokenizer = spm_tokenizer_from_gguf(fields, tokens, types)

        def get_id(name):
            v = fields.get(f"tokenizer.ggml.{name}_token_id")
            return None if v is None else int(v)

        bos, eos = get_id("bos"), get_id("eos")
        eos_ids = [eos] if eos is not None else []
        eot = get_id("eot")
        if eot is not None and eot not in eos_ids:
            eos_ids.append(eot)
        return cls(
            tokenizer,
            bos_id=bos,
            eos_ids=tuple(eos_ids),
            chat_template=fields.get("tokenizer.chat_template"),
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            vocab_size=vocab_size,
            special_tokens={
                k: tokens[i] for k, i in (("bos_token", bos), ("eos_token", eos)) if i is not None
            },
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, *, add_bos: bool | None = None) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return np.asarray(ids, np.int32)

    def decode(self, ids, *, skip_special: bool = True) -> str:
        ids = self._check_ids(ids)
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes per id, exact for the two vocabularies pretrained models use.

        Byte-level BPE (a ``ByteLevel`` decoder): each piece counts the bytes its alphabet spells.
        SentencePiece-style (spaces as ``▁``, ``<0xNN>`` byte pieces: a BPE with byte fallback
        or a decoder that maps ``▁`` to a space): a byte piece counts 1, any other piece its
        UTF-8 length with each ``▁`` one space byte (so the prefix space that the tokenizer puts
        before a text counts too). Other vocabularies: the UTF-8 length of the decoded piece.
        Special (added) tokens and ids past the tokenizer's vocabulary count 0.
        """
        kinds = _decoder_kinds(self.tokenizer.decoder)
        byte_fallback = bool(getattr(self.tokenizer.model, "byte_fallback", False))
        spm = byte_fallback or "Metaspace" in kinds or ("Replace", _SPM_SPACE) in kinds
        alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
        out = np.zeros(self.vocab_size, np.int32)
        added = {int(i) for i in self.tokenizer.get_added_tokens_decoder()}
        for piece, i in self.tokenizer.get_vocab(with_added_tokens=False).items():
            if i in added or i >= self.vocab_size:
                continue
            if alphabet is not None and all(ch in alphabet for ch in piece):
                out[i] = len(piece)
            elif spm and byte_fallback and _BYTE_PIECE.fullmatch(piece):
                out[i] = 1
            elif spm:
                out[i] = len(piece.replace(_SPM_SPACE, " ").encode("utf-8"))
            else:
                out[i] = len(self.tokenizer.decode([i]).encode("utf-8"))
        return out

    def chat(self, messages, *, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{'role': 'user', 'content': ...}, ...]``),
        rendered with the model's chat template."""
        if not self.chat_template:
            raise ValueError(
                "This tokenizer has no chat template (tokenizer_config.json's chat_template or "
                "the GGUF's tokenizer.chat_template); build the prompt text yourself."
            )
        import jinja2
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.special_tokens.get("bos_token", ""),
            eos_token=self.special_tokens.get("eos_token", ""),
        )

    def save(self, directory) -> None:
        """Writes ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat template,
        ``add_bos_token``) and ``generation_config.json`` (eos ids), which ``from_files``
        reads back."""
        import json

        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
        config = {**self.special_tokens, "add_bos_token": self.add_bos}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        generation = {"eos_token_id": list(self.eos_ids)}
        if self.bos_id is not None:
            generation["bos_token_id"] = self.bos_id
        with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2)

    def __repr__(self) -> str:
        return (
            f"PretrainedTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, chat_template={'yes' if self.chat_template else 'no'})"
        )
