"""Tests of jaxquant.optim.dct: the DCT basis, column choice, low-rank projection of inner."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxquant.optim.adam import adam, adamw
from jaxquant.optim.dct import DctLowRankState, dct_basis, dct_low_rank
from jaxquant.optim.state import QuantizedMoment, state_nbytes


def _np_dct(n: int) -> np.ndarray:
    """float64 reference from the cosine formula: column k is frequency k."""
    i, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    q = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    q[:, 0] /= np.sqrt(2.0)
    return q


def _np_scores(g, axis):
    """ℓ1 norm of each DCT coefficient column (axis 1) or row (axis 0) of g, float64."""
    q = _np_dct(g.shape[axis])
    s = g @ q if axis == 1 else q.T @ g
    return np.abs(s).sum(axis=1 - axis)


def _np_choose(g, axis, rank, old):
    """Brute force: the rank best columns; kept ones stay in their slot, new ones fill the
    freed slots best first."""
    scores = _np_scores(np.asarray(g, np.float64), axis)
    top = list(np.argsort(-scores, kind="stable")[:rank])
    fresh = iter(k for k in top if k not in old)
    return np.array([k if k in top else next(fresh) for k in old]), scores


def _np_project(x, idx, axis):
    qc = _np_dct(x.shape[axis])[:, idx]
    x = np.asarray(x, np.float64)
    return (x @ qc if axis == 1 else qc.T @ x), qc


def _random_tree(rng, shapes, dtype=np.float32):
    return {k: jnp.asarray(rng.standard_normal(s).astype(dtype)) for k, s in shapes.items()}


# ---------------------------------------------------------------- the basis


@pytest.mark.parametrize("n", [1, 2, 7, 12, 33, 64, 257])
def test_dct_basis_equals_cosine_formula_and_scipy_and_is_orthonormal(n):
    q = dct_basis(n)
    assert q.shape == (n, n) and q.dtype == jnp.float32
    q = np.asarray(q, np.float64)
    np.testing.assert_allclose(q, _np_dct(n), rtol=0, atol=5e-7)
    np.testing.assert_allclose(q.T @ q, np.eye(n), rtol=0, atol=1e-6)
    np.testing.assert_allclose(q @ q.T, np.eye(n), rtol=0, atol=1e-6)
    np.testing.assert_allclose(q[:, 0], 1 / np.sqrt(n), rtol=1e-6)
    scipy_fft = pytest.importorskip("scipy.fft")
    np.testing.assert_allclose(
        q, scipy_fft.dct(np.eye(n), norm="ortho", axis=0).T, rtol=0, atol=5e-7
    )
    x = np.random.default_rng(n).standard_normal((3, n))
    np.testing.assert_allclose(x @ q, scipy_fft.dct(x, norm="ortho", axis=-1), atol=5e-6)


def test_dct_basis_dtype_and_large_n_accuracy():
    assert dct_basis(8, jnp.bfloat16).dtype == jnp.bfloat16
    # The phase is reduced in integers, so a large f32 basis is as accurate as a small one.
    n = 3000
    q = np.asarray(dct_basis(n), np.float64)[:, ::7]
    i, k = np.meshgrid(np.arange(n), np.arange(0, n, 7), indexing="ij")
    ref = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    ref[:, 0] /= np.sqrt(2.0)
    assert np.max(np.abs(q - ref)) < 5e-7


@pytest.mark.parametrize("n", [0, -3, 2.0, True, 2**15 + 1])
def test_dct_basis_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n="):
        dct_basis(n)


# ---------------------------------------------------------------- column choice


@pytest.mark.parametrize(
    "shape, side, axis",
    [
        ((12, 20), "auto", 1),
        ((7, 33), "auto", 1),
        ((40, 9), "auto", 0),
        ((20, 20), "auto", 1),
        ((12, 20), "smaller", 0),
        ((40, 9), "smaller", 1),
        ((40, 9), "right", 1),
        ((12, 20), "left", 0),
    ],
)
def test_index_choice_is_top_rank_by_l1_alignment(shape, side, axis):
    rank = 4
    rng = np.random.default_rng(sum(shape))
    p = {"w": jnp.zeros(shape)}
    opt = dct_low_rank(optax.sgd(1.0), rank, side=side, update_interval=3)
    state = opt.init(p)
    np.testing.assert_array_equal(state.indices["w"], np.arange(rank))
    update = jax.jit(opt.update)
    old = list(range(rank))
    for t in range(7):
        g = rng.standard_normal(shape).astype(np.float32)
        _, state = update({"w": jnp.asarray(g)}, state, p)
        idx = np.asarray(state.indices["w"])
        assert idx.dtype == np.int32 and idx.shape == (rank,)
        if t % 3:
            np.testing.assert_array_equal(idx, old)  # between re-choices: unchanged
            continue
        ref, scores = _np_choose(g, axis, rank, old)
        srt = np.sort(scores)[::-1]
        assert srt[rank - 1] - srt[rank] > 1e-4 * srt[0]  # a choice f32 cannot flip
        np.testing.assert_array_equal(idx, ref)
        old = list(ref)


# ---------------------------------------------------------------- updates vs references

SHAPES = {
    "w": (12, 20),  # columns
    "v": (40, 9),  # rows
    "x": (7, 33),  # columns
    "small": (4, 30),  # smaller dim 4 < min_dim 6: full rank
    "b": (9,),
    "t": (3, 4, 5),
}


def test_sgd_momentum_inner_equals_numpy_projection_across_index_changes():
    rank, lr, beta, scale, interval = 5, 0.1, 0.9, 0.5, 2
    rng = np.random.default_rng(0)
    # A fixed part plus noise: re-choices keep some columns and replace others.
    base = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [
        {k: (base[k] + 0.7 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(7)
    ]
    params = _random_tree(rng, SHAPES)
    opt = dct_low_rank(optax.sgd(lr, momentum=beta), rank, update_interval=interval, scale=scale)
    state = opt.init(params)
    assert isinstance(state, DctLowRankState)
    axes = {"w": 1, "v": 0, "x": 1}
    assert set(k for k, v in state.indices.items() if isinstance(v, jax.Array)) == set(axes)
    update = jax.jit(opt.update)

    idx = {k: list(range(rank)) for k in axes}
    mom = {k: 0.0 for k in SHAPES}  # numpy momentum: low-rank for projected leaves
    kept = replaced = 0
    for t, g in enumerate(grads):
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        for k, gk in g.items():
            gk = gk.astype(np.float64)
            if k in axes:
                if t % interval == 0:
                    new, _ = _np_choose(gk, axes[k], rank, idx[k])
                    kept += np.sum(new == np.array(idx[k])) if t else 0
                    replaced += np.sum(new != np.array(idx[k])) if t else 0
                    idx[k] = list(new)
                np.testing.assert_array_equal(state.indices[k], idx[k])
                gr, qc = _np_project(gk, idx[k], axes[k])
                mom[k] = beta * mom[k] + gr
                ur = -lr * mom[k]
                ref = scale * (ur @ qc.T if axes[k] == 1 else qc @ ur)
            else:
                mom[k] = beta * mom[k] + gk
                ref = -lr * mom[k]
            assert u[k].shape == gk.shape and u[k].dtype == jnp.float32
            np.testing.assert_allclose(u[k], ref, rtol=2e-5, atol=2e-6, err_msg=f"{k} step {t}")
    assert kept > 0 and replaced > 0  # both kinds of slot occurred
    assert int(state.count) == len(grads)


@pytest.mark.parametrize(
    "side, shapes",
    [("right", {"w": (12, 20), "x": (7, 20)}), ("left", {"w": (20, 12), "x": (20, 7)})],
)
def test_full_rank_equals_inner_on_unprojected_gradient(side, shapes):
    # Q is orthogonal and the kept slots never move, so a linear inner (SGD with momentum,
    # whose state crosses re-choices) gives exactly its full-rank update.
    rng = np.random.default_rng(1)
    params = _random_tree(rng, shapes)
    inner = optax.sgd(0.05, momentum=0.9)
    opt = dct_low_rank(inner, 20, update_interval=2, min_dim=1, side=side)
    s1, s2 = opt.init(params), inner.init(params)
    assert all(isinstance(v, jax.Array) for v in s1.indices.values())
    update1, update2 = jax.jit(opt.update), jax.jit(inner.update)
    for _ in range(5):
        g = _random_tree(rng, shapes)
        u1, s1 = update1(g, s1, params)
        u2, s2 = update2(g, s2, params)
        for k in shapes:
            np.testing.assert_allclose(u1[k], u2[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s1.indices["w"], np.arange(20))


def test_rank_above_a_dimension_passes_the_leaf_through():
    params = {"w": jnp.ones((30, 6))}
    opt = dct_low_rank(optax.sgd(1.0), 8, side="right", min_dim=1)
    state = opt.init(params)
    assert isinstance(state.indices["w"], optax.MaskedNode)
    g = {"w": jnp.arange(180.0).reshape(30, 6)}
    u, _ = jax.jit(opt.update)(g, state, params)
    np.testing.assert_array_equal(u["w"], -g["w"])


def test_8bit_adamw_inner_runs_in_low_rank_space():
    rank, interval = 32, 2
    shapes = {"w": (64, 256), "b": (256,)}
    rng = np.random.default_rng(2)
    params = _random_tree(rng, shapes)

    def inner():
        return adamw(1e-2, weight_decay=0.1, state_bits=8, min_quantized_size=1024)

    opt = optax.chain(dct_low_rank(inner(), rank, update_interval=interval), optax.scale(0.5))
    state = jax.jit(opt.init)(params)
    mu = state[0].inner_state[0].mu
    assert isinstance(mu["w"], QuantizedMoment) and mu["w"].shape == (64, rank)
    assert mu["b"].shape == (256,) and mu["b"].dtype == jnp.float32
    update = jax.jit(opt.update)

    # Reference: the same inner on the low-rank tree (projected with dct_basis columns),
    # back-projected by hand; params are projected too (weight decay within the subspace).
    # Both are jitted: the same XLA arithmetic gives bit-identical codes.
    ref_inner = inner()

    @jax.jit
    def ref_step(g, params, idx, ref_state):
        qc = dct_basis(256)[:, idx]
        low_g = {"w": g["w"] @ qc, "b": g["b"]}
        low_p = {"w": params["w"] @ qc, "b": params["b"]}
        if ref_state is None:
            ref_state = ref_inner.init(low_p)
        ur, ref_state = ref_inner.update(low_g, ref_state, low_p)
        return {"w": 0.5 * ur["w"] @ qc.T, "b": 0.5 * ur["b"]}, ref_state

    ref_state, seen = None, []
    for _ in range(5):
        g = _random_tree(rng, shapes)
        u, state = update(g, state, params)
        seen.append(np.asarray(state[0].indices["w"]))
        ref, ref_state = ref_step(g, params, state[0].indices["w"], ref_state)
        np.testing.assert_allclose(u["w"], ref["w"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(u["b"], ref["b"], rtol=1e-6, atol=1e-8)
        params = optax.apply_updates(params, u)
    assert not np.array_equal(seen[0], seen[4])  # the indices changed on the way
    got = state[0].inner_state[0].mu["w"].q.codes
    np.testing.assert_array_equal(got, ref_state[0].mu["w"].q.codes)


def test_bf16_gradients_give_bf16_updates():
    params = {"w": jnp.ones((16, 24), jnp.bfloat16)}
    opt = dct_low_rank(optax.adam(1e-2), 4)
    state = opt.init(params)
    assert state.inner_state[0].mu["w"].shape == (16, 4)
    g = {"w": jnp.asarray(np.random.default_rng(3).standard_normal((16, 24)), jnp.bfloat16)}
    u, _ = jax.jit(opt.update)(g, state, params)
    assert u["w"].dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(u["w"])))


# ---------------------------------------------------------------- convergence


def test_low_rank_adam_converges_on_regression_with_smooth_low_rank_gradients():
    # y = x W* + b*, W* [24, 64] of rank 3 with smooth rows: every gradient x^T r / N has
    # rank <= 3 (+ the current W's) along the 64-side, where the DCT compacts smooth rows.
    rng = np.random.default_rng(0)
    m, n, batch = 24, 64, 256
    j = np.arange(n)
    bumps = np.stack([np.exp(-(((j - c) / w) ** 2)) for c, w in [(15, 6), (40, 9), (52, 4)]])
    w_true = rng.standard_normal((m, 3)) @ bumps
    x = rng.standard_normal((batch, m)) / np.sqrt(m)
    y = x @ w_true + 0.5 * rng.standard_normal(n)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((x @ p["w"] + p["b"] - y) ** 2, axis=1))

    def train(opt, steps=300):
        p = {"w": jnp.zeros((m, n)), "b": jnp.zeros(n)}
        state = opt.init(p)

        @jax.jit
        def step(p, state):
            u, state = opt.update(jax.grad(loss)(p), state, p)
            return optax.apply_updates(p, u), state

        for _ in range(steps):
            p, state = step(p, state)
        return float(loss(p))

    start = loss({"w": jnp.zeros((m, n)), "b": jnp.zeros(n)})
    low = train(dct_low_rank(adam(3e-2), 8, update_interval=50)) / start
    frozen = train(dct_low_rank(adam(3e-2), 8, update_interval=10**6)) / start
    # Measured: 5.1e-4 (re-chosen every 50 steps); the first choice alone plateaus higher.
    assert low < 2e-3, low
    assert frozen > 2 * low, (frozen, low)


# ---------------------------------------------------------------- memory, jit, args


def test_state_nbytes_is_smaller_by_the_projected_moments():
    rank = 16
    params = {"w": jnp.zeros((64, 256)), "k": jnp.zeros((300, 48)), "b": jnp.zeros((256,))}
    saved = 2 * 4 * (64 * (256 - rank) + 48 * (300 - rank))
    overhead = 4 + 2 * rank * 4  # count + the int32 indices of two leaves
    for inner in (adam(1e-3), optax.adam(1e-3)):
        full = state_nbytes(jax.eval_shape(inner.init, params))
        assert full == 4 + 2 * 4 * (64 * 256 + 300 * 48 + 256)
        opt = dct_low_rank(inner, rank)
        abstract = jax.eval_shape(opt.init, params)
        assert abstract.indices["k"].shape == (rank,)  # rows of k: moments [16, 48]
        assert abstract.inner_state[0].mu["k"].shape == (rank, 48)
        assert state_nbytes(abstract) == full - saved + overhead
    assert state_nbytes(jax.jit(opt.init)(params)) == full - saved + overhead
    # 8-bit moments of the low-rank [64, 16] leaf: 1024 codes + 4 f32 block scales each.
    opt8 = dct_low_rank(adam(1e-3, state_bits=8, min_quantized_size=1024), rank)
    low8 = 2 * (1024 + 4 * 4) + 2 * 4 * (16 * 48 + 256) + 4
    assert state_nbytes(jax.eval_shape(opt8.init, params)) == low8 + overhead


def test_update_is_jitted_once_across_rechoices():
    rng = np.random.default_rng(4)
    params = _random_tree(rng, SHAPES)
    opt = optax.chain(dct_low_rank(optax.scale_by_adam(), 5, update_interval=2), optax.scale(-1))
    traces = []

    @jax.jit
    def update(g, state, params):
        traces.append(1)
        return opt.update(g, state, params)

    state = opt.init(params)
    seen = []
    for _ in range(5):
        u, state = update(_random_tree(rng, SHAPES), state, params)
        seen.append(np.asarray(state[0].indices["w"]))
    assert len(traces) == 1
    assert not np.array_equal(seen[0], seen[2])  # a re-choice ran in the compiled step
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(u))
    abstract = jax.eval_shape(opt.init, params)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"rank": True}, "rank"),
        ({"update_interval": 0}, "update_interval"),
        ({"update_interval": 1.5}, "update_interval"),
        ({"scale": math.nan}, "scale"),
        ({"scale": "1"}, "scale"),
        ({"min_dim": 0}, "min_dim"),
        ({"side": "top"}, "side"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    kwargs = {"rank": 4} | kwargs
    with pytest.raises(ValueError, match=name):
        dct_low_rank(optax.sgd(1.0), **kwargs)


def test_a_huge_projected_dimension_is_refused_at_init():
    params = {"emb": jax.ShapeDtypeStruct((40_000, 64), jnp.float32)}
    with pytest.raises(ValueError, match=r"emb.*40000"):
        jax.eval_shape(dct_low_rank(optax.sgd(1.0), 8).init, params)
    # The smaller side is fine: a [64, 64] basis, moments [40000, 8].
    state = jax.eval_shape(dct_low_rank(optax.adam(1.0), 8, side="smaller").init, params)
    assert state.inner_state[0].mu["emb"].shape == (40_000, 8)


def test_inner_must_be_a_gradient_transformation():
    with pytest.raises(TypeError, match="inner"):
        dct_low_rank(optax.sgd, 4)
