"""fake_quant: forward equal to quantize-dequantize, STE and LSQ gradients against references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant.numerics as jn
from jaxquant.numerics import formats as F
from jaxquant.numerics.scaling import Scaling


@pytest.mark.parametrize("name", sorted(jn.PRESETS))
def test_forward_equals_quantize_dequantize_bit_for_bit(name):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((256, 32)), jnp.float32)
    preset = jn.PRESETS[name]
    for calibration in ("absmax", "mse"):
        q = dataclasses.replace(preset, calibration=calibration)
        expected = jn.quantize(x, q).dequantize()
        got = jax.jit(lambda x, q=q: jn.fake_quant(x, q))(x)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_ste_gradient_is_one_inside_the_range_and_zero_where_clipped():
    x = jnp.asarray(np.random.default_rng(2).standard_t(2, (512, 16)), jnp.float32)
    cal = jn.Calibration(method="percentile", percentile=95.0)
    scaling = Scaling(axis=0)
    w = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)
    q = jn.ScalarQuantizer(F.INT4, scaling, calibration=cal)
    g = jax.grad(lambda x: jnp.sum(w * jn.fake_quant(x, q)))(x)
    # reference: the clip threshold per column is the 95th percentile of |x| (numpy)
    amax = np.quantile(np.abs(np.asarray(x)), 0.95, axis=0, keepdims=True)
    s = amax / 7
    y = np.asarray(x) / s
    inside = (y >= -8) & (y <= 7)
    np.testing.assert_array_equal(np.asarray(g), np.where(inside, np.asarray(w), 0.0))
    assert 0 < (~inside).mean() < 0.1  # the test does exercise clipping


@pytest.mark.parametrize("name", sorted(jn.PRESETS))
def test_ste_gradient_under_absmax_is_one_exactly_where_nothing_can_saturate(name):
    """Absmax ranges with exact scales put every element inside the grid, so the clipped STE
    passes every gradient (also where |x|/s rounds one ulp past the grid's end); rounded
    scales (mxfp's e8m0, nvfp4's e4m3, bf16) can clip, and only clipped elements lose theirs."""
    q = dataclasses.replace(jn.PRESETS[name], calibration="absmax")  # presets: nearest, STE
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_t(3, (256, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    g = np.asarray(jax.grad(lambda x: jnp.sum(w * jn.fake_quant(x, q)))(x))
    scaling = q.scaling_for(2, None)
    exact = scaling.scale_dtype == "float32" and not (scaling.tensor_scale or scaling.zero_point)
    if exact:
        np.testing.assert_array_equal(g, np.asarray(w))
        return
    passed = g != 0
    np.testing.assert_array_equal(g[passed], np.asarray(w)[passed])
    # a clipped element was pulled inward by more than rounding to a nearby grid point would:
    # its dequantized value is the grid's end, smaller in magnitude than x
    deq, xs = np.asarray(jn.quantize(x, q).dequantize()), np.asarray(x)
    assert np.all(np.abs(deq[~passed]) < np.abs(xs[~passed]))


def _lsq_reference_grads(x, s, w, qn, qp, block):
    """LSQ (Esser et al. 2019, Eq. 3) for per-column scales, float64 numpy."""
    v = x / s
    inside = (v >= qn) & (v <= qp)
    dsv = np.where(v < qn, qn, np.where(v > qp, qp, np.round(v) - v))
    g = 1 / np.sqrt(block * qp)
    ds = np.sum(w * dsv, axis=0, keepdims=True) * g
    dx = np.where(inside, w, 0.0)
    return dx, ds


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradients_match_the_paper(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    fmt, scaling = F.IntFormat(bits), Scaling(axis=0)
    lsq = jn.ScalarQuantizer(fmt, scaling, qat="lsq")
    assert lsq.learned_names == ("scale",)
    s0 = np.asarray(lsq.init_learned(jnp.asarray(x))["scale"])
    ref_s0 = 2 * np.abs(x).mean(0, keepdims=True) / np.sqrt(2 ** (bits - 1) - 1)
    np.testing.assert_allclose(s0, ref_s0, rtol=1e-6)
    s = s0 * 0.7  # some values clip

    def loss(x, s):
        return jnp.sum(w * jn.fake_quant(x, lsq, learned={"scale": s}))

    dx, ds = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(s))
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    ref_dx, ref_ds = _lsq_reference_grads(
        x.astype(np.float64), s.astype(np.float64), w, qn, qp, block=64
    )
    np.testing.assert_allclose(np.asarray(dx), ref_dx, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ds), ref_ds, rtol=1e-4, atol=1e-5)
    fwd = jn.fake_quant(jnp.asarray(x), lsq, learned={"scale": jnp.asarray(s)})
    ref_fwd = np.clip(np.round(x / s), qn, qp) * s
    np.testing.assert_allclose(np.asarray(fwd), ref_fwd, rtol=1e-6)


def test_lsq_trains_a_scale_on_a_float_format():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((256, 4)), jnp.float32)
    scaling = Scaling(axis=0, group_size=32)
    lsq = jn.ScalarQuantizer(F.E2M1, scaling, qat="lsq")
    s = lsq.init_learned(x)["scale"] * 3  # start far too coarse

    def mse(s):
        return jnp.mean(jnp.square(jn.fake_quant(x, lsq, learned={"scale": s}) - x))

    opt = optax.adam(0.05)
    state = opt.init(s)

    @jax.jit
    def step(s, state):
        updates, state = opt.update(jax.grad(mse)(s), state)
        return optax.apply_updates(s, updates), state

    first = float(mse(s))
    for _ in range(100):
        s, state = step(s, state)
    assert float(mse(s)) < 0.5 * first


def test_lsq_rejects_a_scale_of_the_wrong_shape_and_asymmetric_scalings():
    x = jnp.ones((64, 8))
    with pytest.raises(ValueError, match=r"expected shape \(1, 8\)"):
        jn.fake_quant(
            x, jn.ScalarQuantizer(F.INT4, Scaling(axis=0)), learned={"scale": jnp.ones((8,))}
        )
    with pytest.raises(ValueError, match="symmetric"):
        jn.fake_quant(
            x,
            jn.ScalarQuantizer(F.UINT4, Scaling(axis=0, zero_point=True)),
            learned={"scale": jnp.ones((1, 8))},
        )


def test_stochastic_fake_quant_uses_the_key():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((128, 8)), jnp.float32)
    sr = dataclasses.replace(jn.INT4_G128, rounding="stochastic")
    a = jn.fake_quant(x, sr, key=jax.random.key(0))
    b = jn.fake_quant(x, sr, key=jax.random.key(1))
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    g = jax.grad(lambda x: jn.fake_quant(x, sr, key=jax.random.key(0)).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), 1.0)  # absmax clips nothing
