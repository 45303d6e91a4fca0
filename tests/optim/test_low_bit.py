"""Tests of jaxquant.optim's 4-bit and FP8 recipes, Lion/SGD momentum and quantized_state."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxquant.numerics import formats
from jaxquant.optim import (
    CompressedState,
    FactoredMoment,
    QuantizedMoment,
    StateQuantizer,
    adam,
    adamw,
    bytes_per_param,
    dynamic_map,
    linear_map,
    lion,
    moment_storage,
    quantized_state,
    sgd,
    state_nbytes,
)
from jaxquant.optim.state import linear_format

# ---------------------------------------------------------------- maps


def test_linear_maps_equal_their_closed_forms():
    # 4-bit Adam's second-moment map: linspace(0, 1, 17) without its 0.
    np.testing.assert_allclose(linear_map(False, 4), np.linspace(0, 1, 17)[1:], rtol=0, atol=1e-15)
    # 4-bit Shampoo's Linear-2: sign(t) t² on linspace(-1, 1, 16).
    t = np.linspace(-1, 1, 16)
    np.testing.assert_allclose(linear_map(True, 4, 2), np.sign(t) * t**2, rtol=0, atol=1e-15)
    for signed in (True, False):
        for bits in (2, 4, 8):
            m = linear_map(signed, bits)
            assert m.shape == (2**bits,) and m[-1] == 1.0 and not np.any(m == 0)
    assert linear_format(False, 4).bits == 4


@pytest.mark.parametrize("kw", [{"bits": 1}, {"bits": 9}, {"power": 0}, {"power": 1.5}])
def test_linear_map_rejects_bad_arguments(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        linear_map(True, **kw)


# ---------------------------------------------------------------- quantizers vs numpy


def _nearest(m, y):
    """Index of the nearest map value (ties to the lower one), float64."""
    return np.searchsorted((m[1:] + m[:-1]) / 2, y, side="left")


def _rank1_reference(x, m):
    a = np.abs(x.astype(np.float64))
    maxes = [a.max(axis=tuple(j for j in range(x.ndim) if j != d)) for d in range(x.ndim)]
    n = maxes[0].reshape((-1,) + (1,) * (x.ndim - 1))
    for d in range(1, x.ndim):
        n = np.minimum(n, maxes[d].reshape((1,) * d + (-1,) + (1,) * (x.ndim - d - 1)))
    y = np.where(n > 0, x / np.where(n > 0, n, 1), 0)
    return m[_nearest(m, y)] * n, y


@pytest.mark.parametrize("shape", [(7, 13), (64, 48), (3, 5, 9), (1, 300)])
def test_rank1_quantizer_matches_numpy_reference(shape):
    rng = np.random.default_rng(sum(shape))
    # Squared gradients with row and column structure, many decades.
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-4, 1, shape))) ** 2
    x = x.astype(np.float32)
    m = linear_map(False, 4)
    quantizer = StateQuantizer(linear_format(False, 4), 128, "rank1")
    q = quantizer.quantize(x)
    assert q.shape == shape and len(q.axis_max) == len(shape)
    assert [a.shape for a in q.axis_max] == [(d,) for d in shape]
    ref, y = _rank1_reference(x, m)
    got = np.asarray(q.dequantize(), np.float64)
    mids = (m[1:] + m[:-1]) / 2
    near_tie = np.min(np.abs(y[..., None] - mids), axis=-1) < 1e-6
    assert np.all(np.isclose(got, ref, rtol=1e-6, atol=0) | near_tie)
    # No second moment is stored as 0 (the zero-point problem); 1/16 of its norm at least.
    assert np.all(got > 0)
    # Rank-1 is never worse than per-tensor absmax: each element's normalizer <= the max.
    assert np.all(got <= np.abs(x).max() * (1 + 1e-6))


def test_rank1_falls_back_to_blocks_below_rank_two():
    x = jnp.abs(jax.random.normal(jax.random.key(0), (300,)))
    q = StateQuantizer(linear_format(False, 4), 128, "rank1").quantize(x)
    assert q.axis_max == () and q.q.scale.shape == (3,)  # ceil(300 / 128) blocks
    m = linear_map(False, 4)
    flat = np.pad(np.asarray(x, np.float64), (0, 84)).reshape(3, 128)
    s = flat.max(axis=1, keepdims=True)
    ref = (m[_nearest(m, flat / s)] * s).ravel()[:300]
    np.testing.assert_allclose(q.dequantize(), ref, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1000,), (33, 17)])
def test_e4m3_block_quantizer_matches_ml_dtypes(shape):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-6, 1, shape))).astype(np.float32)
    q = StateQuantizer(formats.E4M3, 256).quantize(x)
    flat = x.ravel()
    n = math.ceil(flat.size / 256) * 256
    blocks = np.pad(flat, (0, n - flat.size)).reshape(-1, 256)
    s = (np.abs(blocks).max(axis=1, keepdims=True) / 448).astype(np.float32)
    ref = (blocks / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
    got = np.asarray(q.dequantize()).ravel()
    close = np.isclose(got, ref.ravel()[: flat.size], rtol=1e-6, atol=0)
    assert np.mean(close) > 0.995  # the rest: f32 x/s within an ulp of a rounding tie
    assert q.q.codes.shape == (n,) and q.q.scale.shape == (n // 256,)


def test_factored_moment_reconstructs_rank_one_exactly():
    r = np.abs(np.random.default_rng(0).standard_normal((2, 6))) + 0.1
    c = np.abs(np.random.default_rng(1).standard_normal((2, 9))) + 0.1
    v = r[:, :, None] * c[:, None, :]
    fm = FactoredMoment(jnp.asarray(v.mean(-1)), jnp.asarray(v.mean(-2)))
    np.testing.assert_allclose(fm.dequantize(), v, rtol=1e-5)


# ---------------------------------------------------------------- Adam recipes

SHAPES = {"w": (64, 128), "b": (128,), "v": (5, 3, 7)}


def _params(key, shapes=SHAPES):
    keys = jax.random.split(key, len(shapes))
    return {n: jax.random.normal(k, s) for k, (n, s) in zip(keys, shapes.items(), strict=True)}


def _grads(step):
    return _params(jax.random.key(100 + step))


def _run(opt, params, steps, first=0):
    state = opt.init(params)
    update = jax.jit(opt.update)
    outs = []
    for t in range(first, first + steps):
        u, state = update(_grads(t), state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, state, params


RECIPES = [(8, "dynamic"), (8, "e4m3"), (4, "rank1"), (4, "factorized"), (4, "rank1_dynamic")]


def test_layouts_of_each_recipe():
    params = _params(jax.random.key(0))
    s = adamw(1e-3, state_bits=4).init(params)[0]  # the default: 'factorized', block 16
    assert s.mu["w"].q.format.name == "nf4" and s.mu["w"].q.scale.shape == (512,)
    assert isinstance(s.nu["w"], FactoredMoment)
    s = adamw(1e-3, state_bits=4, state_format="rank1").init(params)[0]
    assert s.mu["w"].q.format.name == "nf4" and s.mu["w"].q.scale.shape == (64,)
    assert s.nu["w"].q.format.name == "linear4u" and len(s.nu["w"].axis_max) == 2
    s = adamw(1e-3, state_bits=4, state_format="rank1_dynamic").init(params)[0]
    assert s.mu["w"].q.format.name == "dynamic4s" and s.nu["w"].q.format.name == "linear4u"
    s = adamw(1e-3, state_bits=4, state_format="factorized").init(params)[0]
    assert isinstance(s.nu["w"], FactoredMoment) and s.nu["w"].row.shape == (64,)
    assert s.nu["w"].col.shape == (128,)
    s = adamw(1e-3, state_bits=8, state_format="e4m3").init(params)[0]
    assert s.mu["w"].q.format.name == "e4m3fn" == s.nu["w"].q.format.name
    assert s.mu["b"].dtype == jnp.float32  # below min_quantized_size


def _numpy_adam_step(g, mu, nu, t, b1=0.9, b2=0.999, eps=1e-8):
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    return (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps), mu, nu


@pytest.mark.parametrize("bits, fmt", RECIPES)
def test_each_step_is_the_float_step_from_the_stored_moments(bits, fmt):
    """Three steps: every update equals numpy Adam on the dequantized stored moments, and the
    new stored moments are the float ones requantized (factorized: numpy Adafactor)."""
    params = _params(jax.random.key(0))
    # Nearest rounding, so that the stored moments are the f32 ones requantized.
    opt = adam(1e-2, state_bits=bits, state_format=fmt, rounding="nearest")
    store = moment_storage(bits, fmt, rounding="nearest")
    state = opt.init(params)
    update = jax.jit(opt.update)
    row = np.zeros(64)
    col = np.zeros(128)
    for t in range(1, 4):
        g = _grads(t)
        s = state[0]
        mu0 = np.asarray(s.mu["w"].dequantize(), np.float64)
        gw = np.asarray(g["w"], np.float64)
        if fmt == "factorized":
            g2 = gw * gw + 1e-30
            row = 0.999 * row + 0.001 * g2.mean(1)
            col = 0.999 * col + 0.001 * g2.mean(0)
            nu = row[:, None] * col[None, :] / row.mean()
            mu = 0.9 * mu0 + 0.1 * gw
            ref = (mu / (1 - 0.9**t)) / (np.sqrt(nu / (1 - 0.999**t)) + 1e-8)
        else:
            nu0 = np.asarray(s.nu["w"].dequantize(), np.float64)
            ref, mu, nu = _numpy_adam_step(gw, mu0, nu0, t)
        u, state = update(g, state, params)
        np.testing.assert_allclose(-u["w"] / 1e-2, ref, rtol=2e-4, atol=1e-6)
        requant = store.first.quantize(jnp.asarray(mu, jnp.float32)).dequantize()
        close = np.isclose(state[0].mu["w"].dequantize(), requant, rtol=1e-5, atol=1e-9)
        assert np.mean(close) > 0.99  # the rest: f64 vs f32 arithmetic next to a tie
        if fmt == "factorized":
            np.testing.assert_allclose(state[0].nu["w"].row, row, rtol=1e-5)
            np.testing.assert_allclose(state[0].nu["w"].col, col, rtol=1e-5)
        # f32 leaves are plain Adam.
        b_ref, _, _ = _numpy_adam_step(
            np.asarray(g["b"], np.float64), np.asarray(s.mu["b"]), np.asarray(s.nu["b"]), t
        )
        np.testing.assert_allclose(-u["b"] / 1e-2, b_ref, rtol=1e-4, atol=1e-6)


def _least_squares(opt, steps=400):
    kx, kw, kn = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (256, 64))
    w_true = jax.random.normal(kw, (64, 32))
    y = x @ w_true + 0.1 * jax.random.normal(kn, (256, 32))
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)  # noqa: E731
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        u, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, u), state

    for _ in range(steps):
        params, state = step(params, state)
    start = float(loss({"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}))
    return float(loss(params)), start


@functools.cache
def _f32_least_squares():
    """The f32 baseline, the same for every recipe: run once per worker."""
    return _least_squares(adamw(3e-2, weight_decay=1e-4))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("bits, fmt", RECIPES)
def test_each_recipe_converges_like_float_on_least_squares(bits, fmt, rounding):
    """Measured (400 steps, start 65.3): f32 0.00739; 8-bit dynamic/E4M3 and 4-bit factorized
    within 0.3% of it with either rounding; 4-bit 'rank1' (NF4 first moment) 0.00741
    stochastic (its default), 0.00806 nearest (+9%: the second moment freezes); the paper's
    'rank1_dynamic' 0.0335 nearest and 0.0186 stochastic, 4.5x and 2.5x f32 (the noise floor
    is 0.01: f32 has begun to fit the noise), the failure that made NF4 + stochastic rounding
    the default."""
    l32, start = _f32_least_squares()
    kw = dict(state_bits=bits, state_format=fmt, min_quantized_size=1024, rounding=rounding)
    lq, _ = _least_squares(adamw(3e-2, weight_decay=1e-4, **kw))
    assert l32 < 0.05 * start
    if fmt == "rank1_dynamic":
        assert lq - l32 <= (0.0005 if rounding == "nearest" else 0.0002) * start, (lq, l32)
        assert lq > 2 * l32, (lq, l32)  # the failure is real: it is why it is not the default
    elif (fmt, rounding) == ("rank1", "nearest"):
        assert abs(lq - l32) <= 0.15 * l32, (lq, l32)
    else:
        assert abs(lq - l32) <= 0.02 * l32, (lq, l32)


def test_4bit_state_bytes_are_exact():
    params = {"w": jnp.zeros((1000, 1000)), "b": jnp.zeros((1000,))}
    f32_rest = 2 * 1000 * 4 + 4  # f32 bias moments, count
    state = adamw(1e-3, state_bits=4).init(params)  # 'factorized', block 16
    blocks = math.ceil(1_000_000 / 16)
    mu16 = blocks * 16 // 2 + 4 * blocks  # packed 4-bit codes + f32 block scales
    assert state_nbytes(state) == mu16 + 2 * 1000 * 4 + f32_rest  # f32 rows and columns
    assert bytes_per_param(state, params) <= 0.8
    rank1 = adamw(1e-3, state_bits=4, state_format="rank1").init(params)
    blocks = math.ceil(1_000_000 / 128)
    mu = blocks * 128 // 2 + 4 * blocks
    nu = 1000 * 500 + 4 + 2 * 1000 * 4  # 4-bit codes, the unit tensor scale, row and col max
    assert state_nbytes(rank1) == mu + nu + f32_rest
    assert bytes_per_param(rank1, params) <= 1.1
    e4 = adamw(1e-3, state_bits=8, state_format="e4m3").init(params)
    blocks = math.ceil(1_000_000 / 256)
    assert state_nbytes(e4) == 2 * (blocks * 256 + 4 * blocks) + 2 * 1000 * 4 + 4


def test_resumed_4bit_run_equals_uninterrupted(tmp_path):
    params = _params(jax.random.key(0))
    opt = adamw(1e-2, state_bits=4)
    full, _, p_full = _run(opt, params, 4)
    _, half, p_half = _run(opt, params, 2)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "s", {"params": p_half, "opt": half})
    abstract = jax.eval_shape(lambda: {"params": p_half, "opt": opt.init(p_half)})
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "s", abstract)
    for a, b in zip(jax.tree.leaves(restored["opt"]), jax.tree.leaves(half), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state, p = restored["opt"], restored["params"]
    update = jax.jit(opt.update)
    for t in (2, 3):
        u, state = update(_grads(t), state, p)
        p = optax.apply_updates(p, u)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_full), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- Lion, SGD


def _close_trees(a, b, **kw):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **kw), a, b)


def test_f32_lion_and_sgd_equal_optax():
    params = _params(jax.random.key(1))
    pairs = [
        (lion(1e-3, weight_decay=0.1), optax.lion(1e-3, weight_decay=0.1)),
        (sgd(1e-2, momentum=0.9), optax.sgd(1e-2, momentum=0.9)),
        (sgd(1e-2, momentum=0.9, nesterov=True), optax.sgd(1e-2, momentum=0.9, nesterov=True)),
        (sgd(1e-2), optax.sgd(1e-2)),
    ]
    for ours, ref in pairs:
        a, _, pa = _run(ours, params, 4)
        b, _, pb = _run(ref, params, 4)
        _close_trees(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits, fmt", [(8, "dynamic"), (8, "e4m3"), (4, "rank1")])
def test_quantized_momentum_tracks_float(bits, fmt):
    params = _params(jax.random.key(2))
    for make in (
        lambda **kw: sgd(1e-2, momentum=0.9, **kw),
        lambda **kw: lion(1e-3, **kw),
    ):
        q_out, q_state, _ = _run(make(state_bits=bits, state_format=fmt), params, 5)
        f_out, _, _ = _run(make(), params, 5)
        mu = q_state[0].mu["w"]
        assert isinstance(mu, QuantizedMoment) and mu.q.format.bits == bits
        for a, b in zip(q_out, f_out, strict=True):
            rel = np.linalg.norm(a["w"] - b["w"]) / np.linalg.norm(b["w"])
            # Lion's sign flips where b1·mu + (1-b1)·g is near 0; SGD's error is the map's.
            assert rel < (0.1 if bits == 8 else 0.35), rel
        np.testing.assert_allclose(q_out[-1]["b"], f_out[-1]["b"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_lets_quantized_lion_converge_like_float(bits):
    """Lion's momentum decays by b2 = 0.99: with nearest rounding a step of 0.01·g below half a
    map step is lost and the momentum freezes. Measured (600 steps): f32 1.273; 8-bit 6.83
    nearest, 1.272 stochastic; 4-bit (NF4, block 16) 29.2 nearest, 1.45 stochastic (the
    default). 4-bit Lion stays 14% behind f32 here: its sign update flips wherever the
    momentum's rounding noise exceeds |b1·mu + (1 − b1)·g| (BENCHMARKS.md measures more)."""
    kw = dict(weight_decay=0.0, state_bits=bits, min_quantized_size=1024)
    l32, start = _least_squares(lion(3e-3, weight_decay=0.0), steps=600)
    near, _ = _least_squares(lion(3e-3, rounding="nearest", **kw), steps=600)
    sto, _ = _least_squares(lion(3e-3, rounding="stochastic", **kw), steps=600)
    assert l32 < 0.05 * start
    assert abs(sto - l32) <= (0.05 if bits == 8 else 0.2) * l32, (sto, l32)
    default, _ = _least_squares(lion(3e-3, **kw), steps=600)
    assert default == (near if bits == 8 else sto), (default, near, sto)  # the default rounding
    assert near > 2 * sto, (near, sto)


def test_stochastic_state_rounding_is_unbiased_and_reproducible():
    x = jax.random.normal(jax.random.key(0), (512,)) * jnp.exp(jnp.linspace(-5, 0, 512))
    quantizer = moment_storage(4, "rank1").first
    keys = jax.random.split(jax.random.key(1), 2000)
    mean = jax.vmap(lambda k: quantizer.quantize(x, k).dequantize())(keys).mean(0)
    nearest_err = float(jnp.abs(quantizer.quantize(x).dequantize() - x).mean())
    assert float(jnp.abs(mean - x).mean()) < 0.1 * nearest_err
    store = moment_storage(8, rounding="stochastic")
    a = store.keys({"w": x, "b": x}, jnp.int32(3))
    b = store.keys({"w": x, "b": x}, jnp.int32(3))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), a, b))


# ---------------------------------------------------------------- quantized_state


@pytest.mark.parametrize("bits, fmt", RECIPES)
def test_quantized_state_of_optax_adam_equals_our_adam(bits, fmt):
    params = _params(jax.random.key(4))
    # Nearest rounding: the two draw their stochastic-rounding keys over different trees.
    kw = dict(state_bits=bits, state_format=fmt, rounding="nearest")
    wrapped = quantized_state(optax.adam(1e-2), **kw)
    ours = adam(1e-2, **kw)
    a, sa, pa = _run(wrapped, params, 4)
    b, sb, pb = _run(ours, params, 4)
    assert isinstance(sa, CompressedState)
    inner_adam = sa.inner[0]
    assert type(inner_adam.mu["w"]) is type(sb[0].mu["w"])
    assert type(inner_adam.nu["w"]) is type(sb[0].nu["w"])
    if fmt == "factorized":
        # Same stored Adafactor rows and columns; the wrapped step's own update uses its full
        # v_t = b2·v̂ + (1 − b2)·g² rather than v_t's rank-1 reconstruction.
        _close_trees(inner_adam.nu["w"], sb[0].nu["w"], rtol=1e-4, atol=0)
        return
    _close_trees(pa, pb, rtol=1e-4, atol=1e-6)
    assert state_nbytes(sa) == state_nbytes(sb) + 4  # the wrapper's step count


def test_quantized_state_keeps_counts_and_small_leaves_and_jits_once():
    params = _params(jax.random.key(5))
    opt = quantized_state(optax.sgd(1e-2, momentum=0.9), state_bits=8)
    state = opt.init(params)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedMoment))
    kinds = sorted(type(x).__name__ for x in leaves)
    assert kinds.count("QuantizedMoment") == 1  # only w (8192 elements) is large enough
    traces = []

    @jax.jit
    def update(g, s, p):
        traces.append(1)
        return opt.update(g, s, p)

    for t in range(3):
        _, state = update(_grads(t), state, params)
    assert len(traces) == 1
    # Equals our own 8-bit SGD momentum.
    a, _, pa = _run(opt, params, 3)
    b, _, pb = _run(sgd(1e-2, momentum=0.9, state_bits=8), params, 3)
    _close_trees(pa, pb, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: quantized_state(optax.adam(1e-3), state_bits=6), "state_bits"),
        (lambda: quantized_state("adam"), "inner"),
        (lambda: quantized_state(optax.adam(1e-3), second_moment="("), "second_moment"),
        (lambda: sgd(1e-2, state_bits=8), "state_bits"),
        (lambda: lion(1e-3, state_bits=4, state_format="dynamic"), "state_format"),
        (lambda: lion(1e-3, block_size=0), "block_size"),
        (lambda: StateQuantizer(formats.E4M3, 0), "block_size"),
        (lambda: StateQuantizer(formats.E4M3, 64, "rows"), "normalization"),
        (lambda: StateQuantizer("e4m3"), "fmt"),
        (lambda: adamw(1e-3, state_bits=8, rounding="up"), "rounding"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_dynamic_map_is_the_first_moment_map_of_4bit_adam():
    """'rank1_dynamic' is the paper's recipe: the first moment on the 4-bit dynamic map."""
    q = adamw(1e-3, state_bits=4, state_format="rank1_dynamic").init({"w": jnp.zeros((64, 128))})
    q = q[0].mu["w"]
    np.testing.assert_array_equal(np.asarray(q.q.format.values), dynamic_map(True, 4))


def test_nearest_rounding_freezes_a_decaying_second_moment_and_stochastic_tracks_it():
    """The cause of the paper recipe's drift on long fits. The diagonal of nu keeps a constant
    gradient (it holds every row's and column's maximum, so the rank-1 normalizer stays 1)
    while the off-diagonal entries stop receiving gradient: their true nu decays as
    0.5 · 0.999**t. Under nearest rounding each step's change (0.1% of nu) is far below half a
    4-bit step (1/32 of the normalizer), so the stored nu never moves: after 1,500 steps it is
    1/0.999**1500 = 4.5x the truth. Stochastic rounding is unbiased: the mean of the 4,032
    off-diagonal entries (independent draws, each within one map step, 1/16, of its value)
    stays within a few percent of the truth; 10% is asserted."""
    n = 64
    off = ~np.eye(n, dtype=bool)
    v0 = jnp.asarray(np.where(off, 0.5, 1.0), jnp.float32)
    g2 = jnp.asarray(np.eye(n), jnp.float32)
    truth = 0.5 * 0.999**1500
    for rounding in ("nearest", "stochastic"):
        store = moment_storage(4, "rank1", rounding=rounding, min_quantized_size=0)
        stochastic = rounding == "stochastic"

        @jax.jit
        def run(stored, store=store, stochastic=stochastic):
            def body(t, s):
                key = jax.random.fold_in(jax.random.key(0), t) if stochastic else None
                return store.update_second(s, g2, 0.999, key)[1]

            return jax.lax.fori_loop(0, 1500, body, stored)

        got = np.asarray(run(store.store_second(v0)).dequantize())
        np.testing.assert_allclose(np.diag(got), 1.0, rtol=1e-6)
        if rounding == "nearest":
            np.testing.assert_array_equal(got[off], 0.5)  # frozen at its first value
        else:
            assert abs(got[off].mean() / truth - 1) < 0.1, got[off].mean() / truth


def test_nf4_first_moment_stores_either_signs_absmax_and_the_dynamic_map_does_not():
    """The other cause: the 4-bit dynamic map holds +1 but not -1, so a block whose absmax is
    negative stores it 11% closer to 0 (-0.8875) at every step, biasing momentum toward
    positive values. NF4, the default first moment's map, holds both -1 and +1."""
    nf4 = moment_storage(4, "rank1", min_quantized_size=0).first
    dyn = moment_storage(4, "rank1_dynamic", min_quantized_size=0).first
    v = jnp.full((128,), 0.1).at[3].set(-1.0)
    np.testing.assert_allclose(dyn.quantize(v).dequantize()[3], -0.8875, rtol=1e-6)
    np.testing.assert_allclose(dyn.quantize(-v).dequantize()[3], 1.0, rtol=1e-6)
    np.testing.assert_allclose(nf4.quantize(v).dequantize()[3], -1.0, rtol=1e-6)
    np.testing.assert_allclose(nf4.quantize(-v).dequantize()[3], 1.0, rtol=1e-6)
