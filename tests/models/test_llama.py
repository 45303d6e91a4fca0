"""The Llama decoder: its variable tree and logical axes, attention and RoPE against numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.nn as qn
import jaxquant.numerics as jn
from jaxquant.models import Llama, LlamaConfig
from jaxquant.models.llama import Attention, rope

SMALL = LlamaConfig(
    vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48
)


def _tokens(shape=(2, 9), seed=0, vocab=61):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_variable_tree_and_logical_axes_are_exact():
    v = Llama(SMALL).init(jax.random.key(0), _tokens())
    specs = jax.tree.map(
        tuple,
        nn.get_partition_spec(v)["params"],
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    shapes = jax.tree.map(jnp.shape, nn.unbox(v)["params"])
    layer = {
        "attn": {
            "query": {"kernel": ((32, 4, 8), ("embed", "heads", "head_dim"))},
            "key": {"kernel": ((32, 2, 8), ("embed", "kv_heads", "head_dim"))},
            "value": {"kernel": ((32, 2, 8), ("embed", "kv_heads", "head_dim"))},
            "out": {"kernel": ((4, 8, 32), ("heads", "head_dim", "embed"))},
        },
        "attn_norm": {"scale": ((32,), ("norm",))},
        "mlp": {
            "gate": {"kernel": ((32, 48), ("embed", "mlp"))},
            "up": {"kernel": ((32, 48), ("embed", "mlp"))},
            "down": {"kernel": ((48, 32), ("mlp", "embed"))},
        },
        "mlp_norm": {"scale": ((32,), ("norm",))},
    }
    expected = {
        "embed": {"embedding": ((61, 32), ("vocab", "embed"))},
        "final_norm": {"scale": ((32,), ("norm",))},
        "layers_0": layer,
        "layers_1": layer,
    }
    got = jax.tree.map(lambda s, p: (s, p), shapes, specs, is_leaf=lambda x: isinstance(x, tuple))
    assert got == expected
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(v)))
    untied = Llama(LlamaConfig(**{**SMALL.__dict__, "tie_embeddings": False}))
    p = nn.unbox(untied.init(jax.random.key(0), _tokens()))["params"]
    assert p["head"]["kernel"].shape == (32, 61)


def test_logits_are_causal():
    model = Llama(SMALL)
    t = _tokens()
    v = model.init(jax.random.key(0), t)
    a = model.apply(v, t)
    b = model.apply(v, t.at[:, 6:].set(0))
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 6:], b[:, 6:])
    assert a.shape == (2, 9, 61) and a.dtype == jnp.float32


def _rope_reference(x, theta):
    """RoPE as complex multiplication of (x_i, x_{i+d/2}) pairs, float64 numpy."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    z = x[..., : d // 2] + 1j * x[..., d // 2 :]
    pos = np.arange(x.shape[1])[:, None]
    z = z * np.exp(1j * pos * theta ** (-np.arange(d // 2) * 2 / d))[None, :, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_complex_rotation():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 3, 8)), jnp.float32)
    np.testing.assert_allclose(rope(x, jnp.arange(7), 100.0), _rope_reference(x, 100.0), atol=1e-5)


def test_grouped_query_attention_matches_numpy():
    cfg = SMALL
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 32)), jnp.float32)
    attn = Attention(cfg)
    pos = jnp.arange(5)
    p = nn.unbox(attn.init(jax.random.key(3), x, pos))["params"]
    got = attn.apply({"params": p}, x, pos)
    xn = np.asarray(x, np.float64)
    proj = lambda name: np.einsum("btd,dhk->bthk", xn, np.asarray(p[name]["kernel"], np.float64))  # noqa: E731
    q = _rope_reference(proj("query"), cfg.rope_theta)
    k = _rope_reference(proj("key"), cfg.rope_theta)
    v = proj("value")
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # kv head j serves heads 2j, 2j+1
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
    s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", w, v)
    ref = np.einsum("bthd,hdk->btk", o, np.asarray(p["out"]["kernel"], np.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_one_rule_set_quantizes_the_model_and_serve_equals_qat():
    t = _tokens()
    params = nn.unbox(Llama(SMALL).init(jax.random.key(0), t))["params"]
    rules = (
        qn.QuantRule(r"attn/(query|key|value|out)", weight=jn.INT4_G128.with_group_size(8)),
        qn.QuantRule(r"mlp/", weight=jn.INT8, act=jn.INT8.on_axis(-1)),
    )
    quant, report = qn.freeze(Llama(SMALL, qn.QuantConfig(rules=rules)), params, t)
    assert len(report.weights) == 2 * 7 and not report.unmatched_rules
    assert "embed" not in quant  # the tied embedding/head stays float
    qat = Llama(SMALL, qn.QuantConfig(mode="qat", rules=rules)).apply({"params": params}, t)
    served = {"params": qn.serving_params(params, quant), "quant": quant}
    with jn.kernel_options(implementation="xla"):  # the reference matmul sums as QAT does
        serve = Llama(SMALL, qn.QuantConfig(mode="serve", rules=rules)).apply(served, t)
    np.testing.assert_array_equal(np.asarray(serve), np.asarray(qat))
    float_logits = Llama(SMALL).apply({"params": params}, t)
    assert 0 < float(jnp.abs(qat - float_logits).max()) < 1.0


def test_bfloat16_compute_keeps_f32_params_and_logits():
    cfg = LlamaConfig(**{**SMALL.__dict__, "dtype": "bfloat16"})
    v = Llama(cfg).init(jax.random.key(0), _tokens())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(v)))
    assert Llama(cfg).apply(v, _tokens()).dtype == jnp.float32


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"num_heads": 4, "num_kv_heads": 3}, "multiple of"),
        ({"embed_dim": 30, "num_heads": 4}, "not divisible"),
        ({"dtype": "float16"}, "dtype"),
        ({"num_layers": 0}, "num_layers"),
        ({"head_dim": 7}, "even"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**kw)
