"""DKM: the lean custom VJP against plain autodiff, float64 finite differences and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.vq import dkm


def _np_dkm(w, codebook, temperature, iters):
    """Float64 numpy DKM (broadcast differences, not the matmul form): (output, codebook)."""
    w, c = np.asarray(w, np.float64), np.asarray(codebook, np.float64)

    def attention(c):
        z = -np.sum((w[:, None, :] - c[None]) ** 2, axis=-1) / temperature
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    for _ in range(iters):
        a = attention(c)
        c = (a.T @ w) / a.sum(axis=0)[:, None]
    return attention(c) @ c, c


def _np_nearest(w, codebook):
    d = np.sum((np.float64(w)[:, None, :] - np.float64(codebook)[None]) ** 2, axis=-1)
    return np.sort(d, axis=1), np.argsort(d, axis=1, kind="stable")


def _problem(seed, m, d, c, scale=0.5):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    codebook = jnp.asarray(rng.standard_normal((c, d)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    dist = _np_nearest(w, codebook)[0]
    temperature = scale * float(np.median(dist[:, 1] - dist[:, 0])) if c > 1 else scale
    return w, codebook, ct, temperature


def _residuals(fn, *args):
    """Shapes and dtypes of what ``jax.vjp`` keeps for the backward pass (traced, not run)."""
    return jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args))


def _close(a, b, rtol):
    """Max-norm relative closeness (elementwise rtol is meaningless near zero entries)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_array_less(np.max(np.abs(a - b)), rtol * np.max(np.abs(b)) + 1e-30)


# Every d in {1, 2, 3, 8}, c in {2, 5, 16}, iters in {0, 1, 3}; M not a multiple of the chunk,
# chunk > M, M = 1.
CASES = [
    (37, 1, 16, 3, 8),
    (50, 2, 5, 1, 16),
    (23, 3, 2, 0, 5),
    (41, 8, 16, 1, 12),
    (64, 8, 5, 3, 4096),
    (1, 1, 2, 1, 4),
]


@pytest.mark.parametrize("m, d, c, iters, chunk", CASES)
def test_lean_equals_reference_in_value_and_gradients(m, d, c, iters, chunk):
    w, codebook, ct, temperature = _problem(m * 100 + d * 10 + c, m, d, c)

    def output_and_grads(fn, **kw):
        f = lambda w, cb, t: fn(w, cb, temperature=t, iters=iters, **kw)
        out, vjp = jax.vjp(f, w, codebook, jnp.float32(temperature))  # a traced temperature
        return out, vjp(ct)

    @jax.jit
    def run():
        cb = dkm.dkm_codebook(w, codebook, temperature=temperature, iters=iters, chunk=chunk)
        lean = output_and_grads(dkm.dkm_fake_quant, chunk=chunk)
        return lean, output_and_grads(dkm.dkm_reference), cb

    (out, g_lean), (out_ref, g_ref), cb = run()
    assert out.shape == (m, d) and out.dtype == jnp.float32
    assert cb.shape == (c, d) and cb.dtype == jnp.float32
    _close(out, out_ref, 1e-5)
    # Gradients: 2e-5, as the float32 reference itself is up to 2e-5 off float64 on these.
    for gl, gr in zip(g_lean, g_ref, strict=True):
        _close(gl, gr, 2e-5)
    np_out, np_codebook = _np_dkm(w, codebook, temperature, iters)
    _close(out, np_out, 1e-5)
    _close(cb, np_codebook, 1e-5)


def test_codebook_gradients_equal_plain_autodiff():
    iters = 2
    w, codebook, _, temperature = _problem(7, 45, 3, 5)
    weights = jnp.asarray(np.random.default_rng(8).standard_normal((5, 3)), jnp.float32)

    def plain(w, c):  # broadcast-difference form, autodiff
        for _ in range(iters):
            a = jax.nn.softmax(-jnp.sum((w[:, None] - c[None]) ** 2, axis=-1) / temperature)
            c = (a.T @ w) / jnp.sum(a, axis=0)[:, None]
        return jnp.sum(c * weights)

    lean = lambda w, c: jnp.sum(
        dkm.dkm_codebook(w, c, temperature=temperature, iters=iters, chunk=16) * weights
    )
    for gl, gp in zip(
        jax.jit(jax.grad(lean, argnums=(0, 1)))(w, codebook),
        jax.jit(jax.grad(plain, argnums=(0, 1)))(w, codebook),
        strict=True,
    ):
        _close(gl, gp, 1e-5)


def test_gradients_match_float64_central_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        ct = rng.standard_normal((7, 2))
        # w [7, 2], codebook [3, 2] and the temperature, flattened.
        x0 = np.concatenate([rng.standard_normal(14), rng.standard_normal(6), [0.7]])

        @jax.jit
        def loss(x):
            w, c, t = x[:14].reshape(7, 2), x[14:20].reshape(3, 2), x[20]
            return jnp.sum(dkm.dkm_fake_quant(w, c, temperature=t, iters=2, chunk=3) * ct)

        eps = 1e-6
        fd = [(loss(x0 + eps * e) - loss(x0 - eps * e)) / (2 * eps) for e in np.eye(x0.size)]
        g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x0)))
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, np.array(fd), rtol=1e-6, atol=1e-8)


def test_low_temperature_gives_hard_quantization_and_lloyd_steps():
    w, codebook, _, t_mid = _problem(11, 256, 2, 8)
    t = t_mid * 1e-5
    # iters = 0: the nearest codeword, wherever the margin is not tiny against τ.
    dist, order = _np_nearest(w, codebook)
    clear = dist[:, 1] - dist[:, 0] > 50 * t
    assert clear.mean() > 0.95
    out = np.asarray(dkm.dkm_fake_quant(w, codebook, temperature=t, iters=0))
    hard = np.asarray(codebook)[order[:, 0]]
    np.testing.assert_allclose(out[clear], hard[clear], atol=1e-6)
    # iters = 2: two Lloyd (hard k-means) steps.
    c = np.float64(codebook)
    for _ in range(2):
        codes = _np_nearest(w, c)[1][:, 0]
        c = np.stack([np.float64(w)[codes == j].mean(axis=0) for j in range(len(c))])
    got = dkm.dkm_codebook(w, codebook, temperature=t, iters=2, chunk=100)
    np.testing.assert_allclose(got, c, atol=1e-5)
    np.testing.assert_array_equal(dkm.hard_assign(w, got), _np_nearest(w, c)[1][:, 0])


def test_high_temperature_gives_the_mean():
    w, codebook, _, t_mid = _problem(12, 100, 3, 4)
    t = t_mid * 1e7
    # Uniform attention: iters = 0 averages the codewords, a DKM step collapses them onto the
    # mean of the weights.
    out0 = dkm.dkm_fake_quant(w, codebook, temperature=t, iters=0, chunk=32)
    np.testing.assert_allclose(out0, np.broadcast_to(np.mean(codebook, 0), w.shape), atol=1e-5)
    out1 = dkm.dkm_fake_quant(w, codebook, temperature=t, iters=1, chunk=32)
    np.testing.assert_allclose(out1, np.broadcast_to(np.mean(w, 0), w.shape), atol=1e-5)


def test_unused_codeword_is_kept_without_nans():
    w, codebook, ct, t = _problem(13, 40, 2, 4)
    codebook = codebook.at[3].set(1e3)  # attention underflows to exactly 0

    @jax.jit
    def run(w, c, t):
        loss = lambda fn: lambda w, c, t: jnp.sum(fn(w, c, temperature=t, iters=2) * ct)
        grads = [
            jax.grad(loss(fn), argnums=(0, 1, 2))(w, c, t)
            for fn in (dkm.dkm_fake_quant, dkm.dkm_reference)
        ]
        return grads, dkm.dkm_codebook(w, c, temperature=t, iters=2)

    (g_lean, g_ref), cb = run(w, codebook, jnp.float32(t))
    assert cb[3].tolist() == [1e3, 1e3]
    # A codeword nobody attends to passes its cotangent straight through the steps.
    weights = jnp.arange(8.0).reshape(4, 2)
    f_cb = lambda c: jnp.sum(dkm.dkm_codebook(w, c, temperature=t, iters=2) * weights)
    assert jax.grad(f_cb)(codebook)[3].tolist() == [6.0, 7.0]
    for gl, gr in zip(g_lean, g_ref, strict=True):
        assert np.all(np.isfinite(gl))
        _close(gl, gr, 1e-5)


@pytest.mark.parametrize("dtype, iters", [(jnp.bfloat16, 2), (jnp.float8_e4m3fn, 1)])
def test_uniquification_equals_the_plain_path(dtype, iters):
    rng = np.random.default_rng(14 + iters)
    m, chunk = 3000, 64  # N(0, 0.3²) in bf16 or fp8: few distinct values, many repeats
    w = jnp.asarray(rng.standard_normal((m, 1)) * 0.3, dtype)
    codebook = jnp.asarray(np.linspace(-0.6, 0.6, 6)[:, None], jnp.float32)
    # A cotangent with a common part, so the path through the codebook updates is not
    # negligible in the weight gradients.
    ct = jnp.asarray(1 + rng.standard_normal((m, 1)), jnp.float32)
    cb_ct = jnp.asarray(rng.standard_normal((6, 1)), jnp.float32)
    kw = dict(temperature=0.01, iters=iters, chunk=chunk)

    @jax.jit
    def run(w, c):
        def grads(unique):
            f = lambda w, c: jnp.sum(dkm.dkm_fake_quant(w, c, unique=unique, **kw) * ct)
            f_cb = lambda w, c: jnp.sum(dkm.dkm_codebook(w, c, unique=unique, **kw) * cb_ct)
            cb = dkm.dkm_codebook(w, c, unique=unique, **kw)
            return jax.value_and_grad(f, argnums=(0, 1))(w, c), jax.grad(f_cb)(w, c), cb

        return grads(True), grads(False)

    ((v_u, (gw_u, gc_u)), gcb_u, cb_u), ((v_p, (gw_p, gc_p)), gcb_p, cb_p) = run(w, codebook)
    _close(v_u, v_p, 1e-5)
    assert gw_u.dtype == gcb_u.dtype == dtype
    # Both are float32 gradients rounded to the weight's dtype: within an ulp of it.
    _close(gw_u, gw_p, 2.0 ** -jnp.finfo(dtype).nmant)
    _close(gcb_u, gcb_p, 2.0 ** -jnp.finfo(dtype).nmant)
    _close(gc_u, gc_p, 1e-5)
    _close(cb_u, cb_p, 1e-5)
    # Residuals: the uint16 row map, and float arrays of at most min(M, 2^bits) rows (rounded up
    # to the chunk), 256 for fp8.
    leaves = _residuals(lambda w, c: dkm.dkm_fake_quant(w, c, unique=True, **kw), w, codebook)
    bound = -(-min(m, 2 ** (8 * jnp.dtype(dtype).itemsize)) // chunk) * chunk
    assert [x.shape for x in leaves if x.dtype == jnp.uint16] == [(m,)]
    assert max(x.size for x in leaves if x.dtype != jnp.uint16) <= bound


def test_backward_saves_no_attention_sized_residual():
    m, d, c = 1000, 2, 32
    w, codebook, _, t = _problem(15, m, d, c)
    kw = dict(temperature=t, iters=3)

    def residuals(fn, **extra):
        return _residuals(lambda w, c: fn(w, c, **kw, **extra), w, codebook)

    # The check can fail: plain autodiff keeps [M, c] attention arrays.
    assert any(x.size >= m * c for x in residuals(dkm.dkm_reference))
    lean = residuals(dkm.dkm_fake_quant, chunk=128)
    assert max(x.size for x in lean) == m * d  # w_vec itself
    # w_vec, 4 codebooks, 3 column sums and the temperature.
    assert sum(x.size for x in lean) == m * d + 4 * c * d + 3 * c + 1
    # A bf16 weight is kept as it is, not as a float32 copy.
    lean16 = _residuals(
        lambda w, c: dkm.dkm_fake_quant(w, c, chunk=128, **kw), w.astype(jnp.bfloat16), codebook
    )
    assert [(x.shape, x.dtype) for x in lean16 if x.size >= m] == [((m, d), jnp.bfloat16)]


def test_compiled_gradient_temp_memory_scales_with_the_chunk():
    m, d, c, chunk = 16384, 4, 256, 1024
    w = jax.ShapeDtypeStruct((m, d), jnp.float32)
    cb = jax.ShapeDtypeStruct((c, d), jnp.float32)

    def temp_bytes(fn, **kw):
        loss = lambda w, cb: jnp.sum(fn(w, cb, temperature=0.1, iters=2, **kw) ** 2)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return grad.lower(w, cb).compile().memory_analysis().temp_size_in_bytes

    attention_bytes = m * c * 4  # one [M, c] float32 array: 16 MiB
    ref, lean = temp_bytes(dkm.dkm_reference), temp_bytes(dkm.dkm_fake_quant, chunk=chunk)
    assert ref > 2 * attention_bytes
    assert lean < attention_bytes / 2  # measured 4.7 MiB (reference: 224 MiB)


def test_hard_assign_matches_brute_force():
    rng = np.random.default_rng(16)
    for m, d, c, chunk in [(301, 3, 17, 64), (50, 1, 2, 4096), (9, 8, 5, 2)]:
        w = rng.standard_normal((m, d)).astype(np.float32)
        codebook = rng.standard_normal((c, d)).astype(np.float32)
        codes = dkm.hard_assign(jnp.asarray(w), jnp.asarray(codebook), chunk=chunk)
        assert codes.shape == (m,) and codes.dtype == jnp.int32
        dist = np.sum((np.float64(w)[:, None] - np.float64(codebook)[None]) ** 2, axis=-1)
        # The chosen codeword is at the minimum distance (ties may pick another index).
        np.testing.assert_allclose(dist[np.arange(m), codes], dist.min(1), rtol=1e-5, atol=1e-6)


def test_temperature_from_spread_is_the_scaled_median_margin():
    w, codebook, _, _ = _problem(17, 500, 3, 9)
    dist = _np_nearest(w, codebook)[0]
    want = 0.3 * np.median(dist[:, 1] - dist[:, 0])
    got = dkm.temperature_from_spread(w, codebook, 0.3, chunk=128)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # 1-D, spacing Δ = 0.25, weights spread over the codebook's range: ≈ Δ²/2.
    w1 = jnp.linspace(-1, 1, 4001)[:, None]
    got1 = dkm.temperature_from_spread(w1, jnp.linspace(-1, 1, 9)[:, None], 1.0)
    np.testing.assert_allclose(got1, 0.25**2 / 2, rtol=1e-3)


W, C = np.zeros((10, 2), np.float32), np.ones((3, 2), np.float32)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: dkm.dkm_fake_quant(W, C, temperature=0.0), "temperature"),
        (lambda: dkm.dkm_fake_quant(W, C, temperature=-1.0), "temperature"),
        (lambda: dkm.dkm_reference(W, C, temperature=float("nan")), "temperature"),
        (lambda: dkm.dkm_codebook(W, C, temperature=jnp.ones(2)), "temperature"),
        (lambda: dkm.dkm_fake_quant(W, jnp.ones((3, 3)), temperature=1.0), "codebook"),
        (lambda: dkm.dkm_reference(W, jnp.ones(3), temperature=1.0), "codebook"),
        (lambda: dkm.hard_assign(W, jnp.ones((3, 1))), "codebook"),
        (lambda: dkm.dkm_fake_quant(W, C, temperature=1.0, iters=-1), "iters"),
        (lambda: dkm.dkm_codebook(W, C, temperature=1.0, iters=1.5), "iters"),
        (lambda: dkm.dkm_fake_quant(W, C, temperature=1.0, chunk=0), "chunk"),
        (lambda: dkm.dkm_fake_quant(jnp.zeros(10), C, temperature=1.0), "w_vec"),
        (lambda: dkm.dkm_fake_quant(W.astype(jnp.int32), C, temperature=1.0), "w_vec"),
        (lambda: dkm.dkm_fake_quant(W, C, temperature=1.0, unique=True), "unique"),
        (lambda: dkm.dkm_fake_quant(W[:, :1], C[:, :1], temperature=1.0, unique=True), "unique"),
        (lambda: dkm.temperature_from_spread(W, C[:1], 1.0), "codebook"),
        (lambda: dkm.temperature_from_spread(W, C, 0.0), "scale"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
