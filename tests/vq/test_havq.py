"""Hessian-aware VQ: against a float64 numpy BlockLDLQ, below RTN, through quantize_model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.models import Llama, LlamaConfig
from jaxquant.nn import QuantConfig, QuantRule, serving_params
from jaxquant.numerics import layer_error, quantize
from jaxquant.ptq import quantize_model
from jaxquant.vq import KMeans, VQArray, havq
from jaxquant.vq import VectorQuantizer as VQ
from jaxquant.vq.vqarray import encode_weight


def _layer(k, n, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((4 * k, k)) @ (mix * np.exp(rng.standard_normal(k))[:, None])
    w = rng.standard_normal((k, n)) * 0.05
    return jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32)


def _numpy_block_ldlq(w, h, codebook, scale, d, damp=0.01):
    """BlockLDLQ in float64 with a fixed codebook [C, d] and per-column scales [1, N]."""
    w = np.asarray(w, np.float64).copy()
    h = np.asarray(h, np.float64).copy()
    k, n = w.shape
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # H⁻¹ = Uᵀ U, U upper
    s = np.asarray(scale, np.float64)[0]
    codes = np.zeros((k // d, n), np.int64)
    for j in range(k // d):
        b = slice(j * d, (j + 1) * d)
        x = (w[b] / s).T  # [N, d]
        wt = (1.0 / np.diag(u)[b] ** 2)[None, :] * (s**2)[:, None]  # [N, d]
        dist = np.sum(wt[:, None, :] * (x[:, None, :] - codebook[None]) ** 2, axis=2)
        codes[j] = np.argmin(dist, axis=1)
        q = (codebook[codes[j]] * s[:, None]).T  # [d, N]
        e = np.linalg.solve(u[b, b].T, w[b] - q)
        w[(j + 1) * d :] -= u[b, (j + 1) * d :].T @ e
    return codes


@pytest.mark.parametrize("d, bits", [(1, 2), (2, 4), (4, 6)])
def test_havq_equals_a_float64_numpy_block_ldlq(d, bits):
    w, h = _layer(64, 24, seed=d)
    recipe = VQ(format=KMeans(d, bits), refit_scale=False)
    q = havq(w, h, recipe)
    codes = np.asarray(q.code_words(), np.int64)[..., 0]
    want = _numpy_block_ldlq(w, h, np.asarray(q.codebook[0], np.float64), q.scale, d)
    # Ties and float32 rounding may flip a rare code; then the paths diverge a little.
    assert np.mean(codes == want) > 0.97


@pytest.mark.parametrize(
    "recipe",
    [
        VQ(format=KMeans(2, 4)),
        # grouped scales: as the other k-means cases, plus the scale refit per group
        pytest.param(VQ(format=KMeans(4, 8), group_size=32), marks=pytest.mark.slow),
        VQ(format=KMeans(2, 5), rotate=True),
        VQ(format=KMeans(1, 2), codebook_groups=2),
    ],
    ids=lambda r: r.name,
)
def test_havq_has_a_lower_layer_error_than_rtn_vq(recipe):
    w, h = _layer(128, 32)
    rtn = encode_weight(w, jnp.diag(h), None, quantizer=recipe)  # Hessian-diagonal-weighted RTN
    q = havq(w, h, recipe)
    # quantize with a Hessian is havq
    np.testing.assert_array_equal(np.asarray(quantize(w, recipe, hessian=h).codes), q.codes)
    assert isinstance(q, VQArray) and q.shape == w.shape and q.nbytes == rtn.nbytes
    e_rtn, e = float(layer_error(w, rtn, h)), float(layer_error(w, q, h))
    assert e < 0.6 * e_rtn, (e, e_rtn)
    # The Hessian-weighted scale refit never raises the error.
    plain = havq(w, h, dataclasses.replace(recipe, refit_scale=False))
    assert e <= float(layer_error(w, plain, h)) * (1 + 1e-5)


def test_havq_rejects_bad_arguments():
    w, h = _layer(16, 8)
    with pytest.raises(ValueError, match="hessian"):
        havq(w, h[:8, :8], VQ(format=KMeans(2, 2)))
    with pytest.raises(ValueError, match="vector_dim"):
        havq(w[:15], h[:15, :15], VQ(format=KMeans(2, 2)))
    with pytest.raises(TypeError, match="VectorQuantizer"):
        havq(w, h, KMeans(2, 2))
    with pytest.raises(ValueError, match="damp"):
        havq(w, h, VQ(format=KMeans(2, 2)), damp=-1.0)


def test_quantize_model_with_vq_rules_is_hessian_aware_and_serves():
    # Compiles dominate: havq compiles once per (weight shape, quantizer). Here query, key and
    # value share [64, 4, 16] and gate, up and down [64, 64]: 3 compiles instead of 5.
    cfg = LlamaConfig(
        vocab_size=32, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=64
    )
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, 32)
    params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
    rules = (
        QuantRule("mlp", weight=VQ(format=KMeans(2, 4))),
        QuantRule(".*", weight=VQ(format=KMeans(4, 8), rotate=True)),
    )
    batches = [jax.random.randint(jax.random.key(i), (4, 16), 0, 32) for i in range(2)]
    quant, report = quantize_model(model, params, batches, rules)
    assert len(report.weights) == 14
    for r in report.weights:
        assert r.method == "havq" and r.error <= r.rtn_error * 1.0001, r
    served = model.clone(quant=QuantConfig(mode="serve", rules=rules))
    logits = served.apply({"params": serving_params(params, quant), "quant": quant}, tokens)
    assert logits.shape == (4, 16, 32) and bool(jnp.all(jnp.isfinite(logits)))
