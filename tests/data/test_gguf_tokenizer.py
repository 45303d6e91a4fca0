"""PretrainedTokenizer.from_gguf on a SentencePiece ('llama') vocabulary against sentencepiece.

A small BPE model is trained with the ``sentencepiece`` package the way Llama 2's was (byte
fallback, digits split, whitespace kept as is, a dummy prefix), its vocabulary written into a
GGUF with ``gguf.GGUFWriter`` as llama.cpp's converter writes SentencePiece models (tokens,
scores, token types, special ids), read back with ``gguf.GGUFReader``; our ids must be
sentencepiece's own, text must round-trip, and the byte counts must add up to the text's.
"""

import io

import gguf
import pytest
import sentencepiece

from jaxquant.data import load_text
from jaxquant.data.tokenizer import PretrainedTokenizer

# llama.cpp's SentencePieceTokenTypes
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

CASES = [
    "To be, or not to be: that is the question.",
    "  two leading spaces",
    "multiple    inner   spaces and a trailing one ",
    "line one\nline two\n\n",
    "digits 12345 and 3.14159",
    "naïve café — 日本語 🙂 Ωmega",  # characters outside the vocabulary: byte fallback
    "a\tb\rc",
    " ",
    "\n",
    "x" * 40,
    "",
]


def _train_spm(dummy_prefix: bool = True) -> sentencepiece.SentencePieceProcessor:
    text = load_text("train")[:20000]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")),
        model_writer=model,
        vocab_size=700,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=dummy_prefix,
        character_coverage=1.0,
        minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def _token_type(sp, i):
    # as llama.cpp's convert_hf_to_gguf.py (_create_vocab_sentencepiece) classifies pieces
    if sp.is_unknown(i):
        return UNKNOWN
    if sp.is_control(i):
        return CONTROL
    if sp.is_unused(i):
        return UNUSED
    if sp.is_byte(i):
        return BYTE
    return NORMAL


def _write_spm_gguf(sp, path, **extra):
    writer = gguf.GGUFWriter(str(path), arch="llama")
    n = sp.get_piece_size()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i).encode("utf-8") for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([_token_type(sp, i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def spm_and_fields(tmp_path_factory):
    sp = _train_spm()
    fields = _write_spm_gguf(sp, tmp_path_factory.mktemp("spm") / "vocab.gguf")
    return sp, fields


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_spm_gguf_ids_equal_sentencepiece(dummy_prefix, spm_and_fields, tmp_path):
    if dummy_prefix:
        sp, fields = spm_and_fields
    else:  # a model without the dummy prefix, converted with add_space_prefix=False
        sp = _train_spm(dummy_prefix=False)
        fields = _write_spm_gguf(sp, tmp_path / "v.gguf", add_space_prefix=False)
    tok = PretrainedTokenizer.from_gguf(fields)
    validation = load_text("validation")[:3000]
    cases = CASES + [validation[i : i + 300] for i in range(0, 3000, 300)]
    for text in cases:
        want = sp.encode(text)
        assert tok.encode(text, add_bos=False).tolist() == want, text
        assert tok.decode(want) == text == sp.decode(want)
    # byte fallback did fire: 日 is not a piece, its three UTF-8 bytes are
    assert sp.piece_to_id("日") == sp.unk_id()
    assert [sp.id_to_piece(i) for i in tok.encode("日", add_bos=False)][-3:] == [
        "<0xE6>",
        "<0x97>",
        "<0xA5>",
    ]


def test_spm_gguf_special_ids_and_bos_default(spm_and_fields):
    sp, fields = spm_and_fields
    tok = PretrainedTokenizer.from_gguf(fields, vocab_size=sp.get_piece_size() + 4)
    assert tok.add_bos and tok.bos_id == sp.bos_id() and tok.eos_ids == (sp.eos_id(),)
    # llama.cpp's SPM default: add_bos_token true, so an empty text is [bos]
    assert tok.encode("").tolist() == [sp.bos_id()]
    assert tok.encode("to be").tolist() == [sp.bos_id(), *sp.encode("to be")]
    ids = [sp.bos_id(), *sp.encode("to be"), sp.eos_id()]
    assert tok.decode(ids) == "to be"
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    no_bos = PretrainedTokenizer.from_gguf({**fields, "tokenizer.ggml.add_bos_token": False})
    assert no_bos.encode("to be").tolist() == sp.encode("to be")


def test_spm_token_bytes_add_up_to_the_text(spm_and_fields):
    sp, fields = spm_and_fields
    tok = PretrainedTokenizer.from_gguf(fields, vocab_size=sp.get_piece_size() + 4)
    tb = tok.token_bytes()
    assert tb.shape == (sp.get_piece_size() + 4,)
    n = sp.get_piece_size()
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            assert tb[i] == 1, piece
        elif sp.is_control(i) or sp.is_unknown(i):
            assert tb[i] == 0, piece
        else:
            assert tb[i] == len(piece.replace("\u2581", " ").encode("utf-8")), piece
    assert (tb[n:] == 0).all()  # embedding rows past the vocabulary
    for text in CASES[:-1]:
        ids = tok.encode(text, add_bos=False)
        # every byte of the text, plus the one prefix space ("▁") the tokenizer puts first
        assert tb[ids].sum() == len(text.encode("utf-8")) + 1, text


def test_unsupported_gguf_tokenizer_is_named():
    with pytest.raises(ValueError, match="tokenizer.ggml.model='bert'"):
        PretrainedTokenizer.from_gguf({"tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model=None"):
        PretrainedTokenizer.from_gguf({})
    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "a"],
        "tokenizer.ggml.token_type": [UNKNOWN, NORMAL],
    }
    with pytest.raises(ValueError, match="without tokenizer.ggml.scores"):
        PretrainedTokenizer.from_gguf(fields)
    with pytest.raises(ValueError, match="2 tokens but 1 scores"):
        PretrainedTokenizer.from_gguf({**fields, "tokenizer.ggml.scores": [0.0]})
    tok = PretrainedTokenizer.from_gguf({**fields, "tokenizer.ggml.scores": [0.0, -1.0]})
    # no byte pieces: the prefix "▁", not in this vocabulary, is <unk>
    assert tok.encode("a", add_bos=False).tolist() == [0, 1]
