"""Tests for jaxquant.data: corpus, tokenizers, training and evaluation batches."""

import gzip
import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxquant.data import (
    BatchIterator,
    ByteTokenizer,
    bits_per_byte,
    eval_batches,
    get_tokenizer,
    load_text,
    num_eval_batches,
)

# Character counts stated in jaxquant/data/shakespeare/README.md.
TRAIN_CHARS = 4_784_896
VALIDATION_CHARS = 272_385


def _random_tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


# Corpus.


def test_bundled_splits_have_the_readme_character_counts():
    train, validation = load_text("train"), load_text("validation")
    assert (len(train), len(validation)) == (TRAIN_CHARS, VALIDATION_CHARS)
    assert validation.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare")
    assert "\n\nTHE TEMPEST\n\nby William Shakespeare" in validation
    # Held out: neither play's title page is in the training split, which has 40 of them.
    assert "HAMLET, PRINCE OF DENMARK" not in train
    assert "THE TEMPEST\n\nby William Shakespeare" not in train
    assert train.count("by William Shakespeare") == 40
    assert load_text() is train  # the decompressed text is cached


def test_readme_table_matches_the_counts_tested_here():
    # The test's constants come from the README: fail if one of them is edited alone.
    from importlib import resources

    readme = resources.files("jaxquant.data").joinpath("shakespeare", "README.md").read_text()
    counts = [int(c.replace(",", "")) for c in re.findall(r"\| ([\d,]{7,}) \|", readme)]
    assert counts == [TRAIN_CHARS, VALIDATION_CHARS]


@pytest.mark.parametrize("compress", [False, True])
def test_user_file_is_split_95_5_at_a_character(tmp_path, compress):
    text = "".join(f"línea {i}: ünïcödé ✓\n" for i in range(200))  # multi-byte characters
    path = tmp_path / ("mine.txt.gz" if compress else "mine.txt")
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    train, validation = load_text("train", path=path), load_text("validation", path=str(path))
    assert train + validation == text
    assert len(train) == int(0.95 * len(text))


def test_corpus_errors_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="split='test'"):
        load_text("test")
    with pytest.raises(ValueError, match="nope.txt"):
        load_text(path=tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_text(path=tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        load_text(path=tmp_path / "latin1.txt")


# Tokenizers.


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.size == len(text.encode("utf-8"))
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    assert tok.decode(ids) == text


def test_byte_tokenizer_facts():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    assert tok.bytes_per_token("né✓") == 1.0
    np.testing.assert_array_equal(tok.token_bytes(), np.ones(256))
    with pytest.raises(ValueError, match="ids"):
        tok.decode([0, 256])


def test_bits_per_byte_converts_nats_per_token():
    # 2 bytes per token at ln(4) nats per token: 2 bits per token, 1 bit per byte.
    assert bits_per_byte(np.log(4.0), 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="bytes_per_token"):
        bits_per_byte(1.0, 0.0)


def test_get_tokenizer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="name='wordpiece'"):
        get_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="vocab_size=512"):
        get_tokenizer("byte", vocab_size=512)
    with pytest.raises(ValueError, match="model_path"):
        get_tokenizer("sentencepiece", vocab_size=512)


def test_missing_sentencepiece_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    with pytest.raises(ImportError, match=re.escape("pip install 'jaxquant[spm]'")):
        get_tokenizer("sentencepiece", vocab_size=400, model_path=tmp_path / "m", train_text="ab")


@pytest.fixture(scope="module")
def spm_text():
    return load_text("train")[:200_000]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_trains_round_trips_and_reloads(tmp_path, spm_text, model_type):
    pytest.importorskip("sentencepiece")
    # Every character of the text needs its own piece next to the 256 byte ids and <unk>.
    vocab_size = 257 + len(set(spm_text)) + 64
    path = tmp_path / "spm" / "shakespeare.model"
    tok = get_tokenizer(
        "sentencepiece",
        vocab_size=vocab_size,
        model_path=path,
        train_text=spm_text,
        model_type=model_type,
    )
    assert path.is_file() and tok.vocab_size == vocab_size
    sample = load_text("validation")[:20_000] + " ünïcödé 日本 🎉 \u2581 \t\r\n  "
    ids = tok.encode(sample)
    assert ids.dtype == np.int32 and ids.max() < vocab_size
    assert tok.decode(ids) == sample
    # The pieces learned from English compress English text below one token per byte.
    assert tok.bytes_per_token(sample) > 1.3
    # token_bytes counts exactly the bytes a sequence of ids decodes to.
    assert tok.token_bytes()[ids].sum() == len(sample.encode("utf-8"))

    loaded = get_tokenizer("sentencepiece", model_path=str(path))  # exists: loads, no training
    np.testing.assert_array_equal(loaded.encode(sample), ids)
    assert loaded.decode(ids) == sample
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size + 1}"):
        get_tokenizer("sentencepiece", vocab_size=vocab_size + 1, model_path=path)


@pytest.fixture(scope="module")
def small_spm(tmp_path_factory, spm_text):
    pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("spm") / "small.model"
    return get_tokenizer("sentencepiece", vocab_size=400, model_path=path, train_text=spm_text)


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_sentencepiece_round_trips_any_text(small_spm, text):
    ids = small_spm.encode(text)
    assert small_spm.decode(ids) == text
    assert small_spm.token_bytes()[ids].sum() == len(text.encode("utf-8"))


def test_sentencepiece_vocab_too_small_names_vocab_size(tmp_path, spm_text):
    pytest.importorskip("sentencepiece")
    with pytest.raises(ValueError, match="vocab_size=300"):
        get_tokenizer(
            "sentencepiece", vocab_size=300, model_path=tmp_path / "m.model", train_text=spm_text
        )


# Training batches.


def _iterator(tokens, **overrides):
    kwargs = {"batch_size": 8, "seq_len": 16, "seed": 3, "process_index": 0, "process_count": 1}
    return BatchIterator(tokens, **{**kwargs, **overrides})


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(1000, dtype=np.int32)  # token value == its position
    it = _iterator(tokens)
    for _ in range(2 * it.steps_per_epoch + 1):
        batch = next(it)
        assert batch["inputs"].shape == batch["targets"].shape == (8, 16)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
        np.testing.assert_array_equal(np.diff(batch["inputs"], axis=1), 1)  # contiguous windows


def test_an_epoch_visits_distinct_non_overlapping_windows():
    tokens = np.arange(1000, dtype=np.int32)
    it = _iterator(tokens)
    firsts = np.concatenate([next(it)["inputs"][:, 0] for _ in range(it.steps_per_epoch)])
    assert it.steps_per_epoch == (999 // 16) // 8
    assert np.unique(firsts).size == firsts.size
    assert (np.diff(np.sort(firsts)) % 16 == 0).all()


def test_two_iterators_with_one_seed_agree_and_seeds_differ():
    tokens = _random_tokens(5000)
    a, b, c = _iterator(tokens), _iterator(tokens), _iterator(tokens, seed=4)
    for _ in range(20):
        x, y, z = next(a), next(b), next(c)
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
    assert not np.array_equal(x["inputs"], z["inputs"])


def test_resume_from_state_mid_epoch_is_bit_identical():
    tokens = _random_tokens(5000)
    uninterrupted = _iterator(tokens)
    expected = [next(uninterrupted) for _ in range(3 * uninterrupted.steps_per_epoch)]

    first = _iterator(tokens)
    stop = first.steps_per_epoch // 2 + 1  # mid-epoch
    for _ in range(stop):
        next(first)
    # As an orbax checkpoint gives it back: 0-d arrays.
    saved = {k: np.asarray(v) for k, v in first.state().items()}
    assert first.state() == {"step": stop, "seed": 3}

    resumed = _iterator(tokens)
    resumed.restore(saved)
    from_ctor = _iterator(tokens, step=stop)
    for want in expected[stop:]:
        for it in (resumed, from_ctor):
            got = next(it)
            assert got["inputs"].tobytes() == want["inputs"].tobytes()
            assert got["targets"].tobytes() == want["targets"].tobytes()
    for step in (0, stop, len(expected) - 1):
        np.testing.assert_array_equal(resumed.batch_at(step)["inputs"], expected[step]["inputs"])

    with pytest.raises(ValueError, match="seed"):
        _iterator(tokens, seed=4).restore(saved)


def test_crossing_an_epoch_boundary_reshuffles():
    tokens = np.arange(2000, dtype=np.int32)
    it = _iterator(tokens)
    n = it.steps_per_epoch
    epoch0 = np.concatenate([it.window_starts(s) for s in range(n)])
    epoch1 = np.concatenate([it.window_starts(s) for s in range(n, 2 * n)])
    assert not np.array_equal(epoch0, epoch1)
    # Within an epoch the windows keep seq_len spacing (one shared offset), across epochs the
    # order changes.
    for starts in (epoch0, epoch1):
        assert np.unique(starts % 16).size == 1
    assert it.epoch == 0
    for _ in range(n):
        next(it)
    assert it.epoch == 1


def test_two_processes_concatenate_to_the_global_batch():
    tokens = _random_tokens(5000)
    one = _iterator(tokens)
    shards = [_iterator(tokens, process_index=i, process_count=2) for i in range(2)]
    assert shards[0].local_batch_size == 4
    for _ in range(one.steps_per_epoch + 2):  # across an epoch boundary
        want = next(one)
        got = [next(s) for s in shards]
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_process_defaults_come_from_jax():
    it = BatchIterator(_random_tokens(500), batch_size=8, seq_len=16)
    assert (it.process_index, it.local_batch_size) == (0, 8)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -8}, "batch_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 5000}, "seq_len"),
        ({"batch_size": 1000}, "batch_size"),
        ({"process_count": 3}, "batch_size"),
        ({"process_count": 0}, "process_count"),
        ({"process_index": 2, "process_count": 2}, "process_index"),
        ({"seed": -1}, "seed"),
        ({"step": -1}, "step"),
    ],
)
def test_bad_iterator_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        _iterator(_random_tokens(1000), **kwargs)


def test_bad_tokens_are_rejected():
    with pytest.raises(ValueError, match="tokens"):
        _iterator(np.zeros((10, 10), np.int32))
    with pytest.raises(ValueError, match="tokens"):
        _iterator(np.zeros(100, np.float32))


# Evaluation batches.


@pytest.mark.parametrize("batch_size, seq_len, process_count", [(4, 16, 1), (8, 7, 2), (2, 64, 2)])
def test_eval_batches_cover_every_validation_token_once(batch_size, seq_len, process_count):
    tokens = ByteTokenizer().encode(load_text("validation")[:10_001])
    shards = [
        list(
            eval_batches(
                tokens,
                batch_size=batch_size,
                seq_len=seq_len,
                process_index=i,
                process_count=process_count,
            )
        )
        for i in range(process_count)
    ]
    num = num_eval_batches(tokens.size, batch_size=batch_size, seq_len=seq_len)
    assert all(len(s) == num for s in shards)
    local = batch_size // process_count
    targets, masks, inputs = [], [], []
    for step in range(num):
        for shard in shards:
            b = shard[step]
            assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (local, seq_len)
            assert b["mask"].dtype == np.float32 and b["targets"].dtype == np.int32
            inputs.append(b["inputs"].ravel())
            targets.append(b["targets"].ravel())
            masks.append(b["mask"].ravel())
    mask = np.concatenate(masks)
    assert mask.sum() == tokens.size - 1
    # In order: the masked targets are exactly tokens[1:], the inputs tokens[:-1].
    np.testing.assert_array_equal(np.concatenate(targets)[mask == 1], tokens[1:])
    np.testing.assert_array_equal(np.concatenate(inputs)[mask == 1], tokens[:-1])
    # Padding only at the end.
    assert (np.diff(mask) <= 0).all()


def test_eval_batches_check_arguments_at_the_call():
    tokens = _random_tokens(100)
    with pytest.raises(ValueError, match="seq_len="):
        eval_batches(tokens, batch_size=4, seq_len=0)
    with pytest.raises(ValueError, match="batch_size=3"):
        eval_batches(tokens, batch_size=3, seq_len=8, process_index=0, process_count=2)
