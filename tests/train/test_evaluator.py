"""The evaluator: cross-entropy and validation loss against float64 numpy, quantized variants."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.data import bits_per_byte
from jaxquant.models import Llama, LlamaConfig
from jaxquant.train.evaluator import (
    EvalResult,
    Evaluator,
    cross_entropy,
    default_variants,
    format_table,
)

TINY = LlamaConfig(
    vocab_size=256, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64
)
BATCH, SEQ = 3, 32
NUM_TOKENS = 1000  # 999 targets: 32 windows, 11 batches, the last window and batch padded


def _log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def setup():
    model = Llama(TINY)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32)))["params"]
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, NUM_TOKENS).astype(np.int32)
    return model, params, tokens


def _reference_nll(model, params, tokens, seq_len):
    """Per-target losses, float64, in order: the model on each window, independently padded."""
    apply = jax.jit(lambda x: model.apply({"params": params}, x))
    nll = []
    for start in range(0, tokens.size - 1, seq_len):
        stop = min(start + seq_len, tokens.size - 1)
        logp = _log_softmax64(apply(jnp.asarray(tokens[None, start:stop])))[0]
        targets = tokens[start + 1 : stop + 1]
        nll.append(-logp[np.arange(targets.size), targets])
    return np.concatenate(nll)


def test_cross_entropy_equals_float64_reference_with_masked_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 7, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 7)).astype(np.int32)
    mask = (rng.random((3, 7)) > 0.3).astype(np.float32)
    mask[0, 0] = 0.0
    logp = _log_softmax64(logits)
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    sum_nats, num_tokens = jax.jit(cross_entropy)(logits, targets, mask)
    assert sum_nats.dtype == jnp.float32 and num_tokens.dtype == jnp.float32
    np.testing.assert_allclose(float(sum_nats), (nll * mask).sum(), rtol=1e-6)
    assert float(num_tokens) == mask.sum()
    # A masked position adds nothing, whatever its logits.
    bad = logits.copy()
    bad[0, 0] = np.inf
    assert float(cross_entropy(bad, targets, mask)[0]) == pytest.approx(float(sum_nats), 1e-6)


def test_loss_equals_direct_computation_over_every_window(setup):
    model, params, tokens = setup
    ev = Evaluator(model, tokens, batch_size=BATCH, seq_len=SEQ, bytes_per_token=1.7)
    r = ev.evaluate({"params": params})
    nll = _reference_nll(model, params, tokens, SEQ)
    assert nll.size == r.num_tokens == NUM_TOKENS - 1
    np.testing.assert_allclose(r.loss, nll.mean(), rtol=1e-6)
    assert r.perplexity == pytest.approx(math.exp(r.loss), rel=1e-12)
    assert r.bits_per_byte == pytest.approx(r.loss / math.log(2) / 1.7, rel=1e-12)
    assert r.bits_per_byte == bits_per_byte(r.loss, 1.7)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    assert (r.name, r.bits_per_weight, r.model_bytes) == ("float", 32.0, 4 * num_params)
    # max_batches: exactly the first batches' targets count.
    short = Evaluator(
        model, tokens, batch_size=BATCH, seq_len=SEQ, bytes_per_token=1.7, max_batches=2
    ).evaluate({"params": params})
    assert short.num_tokens == 2 * BATCH * SEQ
    np.testing.assert_allclose(short.loss, nll[: 2 * BATCH * SEQ].mean(), rtol=1e-6)


def test_uniform_logits_give_log_vocab(setup):
    model, params, tokens = setup
    zeros = jax.tree.map(jnp.zeros_like, params)  # zero embeddings: every logit is 0
    ev = Evaluator(model, tokens, batch_size=4, seq_len=64, bytes_per_token=1.0)
    r = ev.evaluate({"params": zeros})
    assert abs(r.loss - math.log(TINY.vocab_size)) < 1e-5
    assert r.perplexity == pytest.approx(TINY.vocab_size, rel=1e-5)
    assert r.bits_per_byte == pytest.approx(8.0, rel=1e-5)


def test_compare_float_int8_int4(setup):
    model, params, tokens = setup
    ev = Evaluator(model, tokens, batch_size=4, seq_len=64, bytes_per_token=1.0)
    results = ev.compare(params, default_variants())
    assert [r.name for r in results] == ["float", "int8", "int4"]
    assert all(isinstance(r, EvalResult) for r in results)
    f, i8, i4 = results
    assert abs(i8.loss - f.loss) < 0.05
    assert abs(i4.loss - f.loss) > abs(i8.loss - f.loss)
    assert f.bits_per_weight == 32.0 > i8.bits_per_weight > i4.bits_per_weight
    assert f.model_bytes > i8.model_bytes > i4.model_bytes
    assert {r.num_tokens for r in results} == {NUM_TOKENS - 1}
    assert len(ev._steps) == 3  # one jitted step per model: float and two serve-mode clones
    again = ev.evaluate({"params": params})
    assert again == f and len(ev._steps) == 3
    table = format_table(results)
    assert all(name in table for name in ("float", "int8", "int4"))
    assert table.count("\n") == 1 + len(results)
    assert f"{i4.loss - f.loss:+.4f}" in table and f"({i8.model_bytes:,})" in table


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"tokens": np.zeros((0,), np.int32)}, "tokens"),
        ({"tokens": np.zeros((1,), np.int32)}, "tokens"),
        ({"tokens": np.zeros((4, 4), np.int32)}, "tokens"),
        ({"seq_len": NUM_TOKENS}, "seq_len"),
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"bytes_per_token": 0.0}, "bytes_per_token"),
        ({"max_batches": 0}, "max_batches"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(setup, kwargs, argument):
    model, _, tokens = setup
    args = {"tokens": tokens, "batch_size": 2, "seq_len": 8, "bytes_per_token": 1.0, **kwargs}
    with pytest.raises(ValueError, match=argument):
        Evaluator(model, args.pop("tokens"), **args)
