"""jaxquant.data: the bundled corpus, tokenizers, and batches for language-model training.

The pieces, in the order a training run uses them::

    text = load_text("train")          # bundled Shakespeare, or load_text(path=...)
    tokenizer = get_tokenizer("byte")  # or "sentencepiece" (pip install 'jaxquant[spm]')
    it = BatchIterator(tokenizer.encode(text), batch_size=64, seq_len=256, seed=0)
    batch = next(it)                   # {'inputs', 'targets'}: int32 [local_batch, seq_len]
    state = it.state()                 # into the checkpoint; it.restore(state) resumes
    valid = tokenizer.encode(load_text("validation"))
    for batch in eval_batches(valid, batch_size=64, seq_len=256):
        ...                            # {'inputs', 'targets', 'mask'}: every target once

Losses in nats per token become bits per byte, comparable across tokenizers, with
``bits_per_byte(nats_per_token, bytes_per_token)`` and ``Tokenizer.token_bytes()``.
"""

from jaxquant.data.corpus import SPLITS, load_text
from jaxquant.data.images import IMAGE_SPLITS, load_digits
from jaxquant.data.iterator import BatchIterator, eval_batches, num_eval_batches
from jaxquant.data.tokenizer import (
    TOKENIZERS,
    ByteTokenizer,
    PretrainedTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    bits_per_byte,
    get_tokenizer,
)

__all__ = [
    "IMAGE_SPLITS",
    "SPLITS",
    "TOKENIZERS",
    "BatchIterator",
    "ByteTokenizer",
    "PretrainedTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "bits_per_byte",
    "eval_batches",
    "get_tokenizer",
    "load_digits",
    "load_text",
    "num_eval_batches",
]
