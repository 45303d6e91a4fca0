"""Tests of jaxquant.optim.shampoo: f32 and 4-bit Shampoo, the Linear-2 eigenvector storage,
Björck rectification, convergence, memory, jit and orbax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxquant.numerics.qarray import QArray
from jaxquant.optim import QuantizedMoment, adamw, state_nbytes
from jaxquant.optim.shampoo import (
    STATIC_ARGS,
    EigenFactor,
    MatrixFactor,
    ScaleByShampooState,
    bjorck,
    dequantize_eigenvectors,
    linear2_format,
    quantize_eigenvectors,
    scale_by_shampoo,
    shampoo,
)

# ---------------------------------------------------------------- float64 numpy references


def _np_inverse_root(a, exponent, matrix_eps):
    lam, v = np.linalg.eigh(a)
    lam = np.maximum(lam, 0.0)
    damping = matrix_eps * (lam.max() if lam.max() > 0 else 1.0)
    return (v * (lam + damping) ** exponent) @ v.T


def _np_shampoo(grads, *, b1=0.9, b2=0.999, eps=1e-8, beta=0.95, matrix_eps=1e-6, t1=1, t2=1):
    """Shampoo with Adam grafting in float64: statistics every t1 steps, roots every t2."""
    m, n = grads[0].shape
    left, right = np.zeros((m, m)), np.zeros((n, n))
    root_l, root_r = np.eye(m), np.eye(n)
    mu, nu = np.zeros((m, n)), np.zeros((m, n))
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        if (t - 1) % t1 == 0:
            left = beta * left + (1 - beta) * g @ g.T
            right = beta * right + (1 - beta) * g.T @ g
        if (t - 1) % t2 == 0:
            root_l = _np_inverse_root(left, -0.25, matrix_eps)
            root_r = _np_inverse_root(right, -0.25, matrix_eps)
        m_hat = mu / (1 - b1**t)
        adam = m_hat / (np.sqrt(nu / (1 - b2**t)) + eps)
        d = root_l @ m_hat @ root_r
        out.append(d * np.linalg.norm(adam) / np.linalg.norm(d))
    return out


def _np_linear2():
    return np.array([np.sign(t) * t * t for t in (-1 + 2 * j / 15 for j in range(16))])


def _np_blockwise_linear2(x, block_size):
    """Flatten, zero-pad, per-block absmax, nearest Linear-2 value (ties to the lower one).
    Returns (x_hat over the padded array, y = x / s)."""
    m = _np_linear2()
    flat = np.asarray(x, np.float32).ravel()
    n_pad = max(1, math.ceil(flat.size / block_size)) * block_size
    flat = np.pad(flat, (0, n_pad - flat.size)).reshape(-1, block_size)
    s = np.abs(flat).max(axis=1, keepdims=True)
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    y = (flat / s).astype(np.float64)
    idx = np.searchsorted((m[1:] + m[:-1]) / 2, y, side="left")
    return (m[idx] * s).ravel(), y.ravel()


def _np_bjorck(v, iterations):
    for _ in range(iterations):
        v = 1.5 * v - 0.5 * v @ (v.T @ v)
    return v


def _orthogonal(rng, d):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def _spd(rng, d, cond):
    q = _orthogonal(rng, d)
    return (q * np.geomspace(1.0, cond, d)) @ q.T


def _run(opt, grads, params=None):
    params = {"w": jnp.zeros(grads[0].shape)} if params is None else params
    state = opt.init(params)
    update = jax.jit(opt.update)
    outs = []
    for g in grads:
        u, state = update({"w": jnp.asarray(g)}, state, params)
        outs.append(np.asarray(u["w"], np.float64))
    return outs, state


def _root(factor, dim):
    """The inverse root a factor applies, in float64 numpy."""
    if isinstance(factor, MatrixFactor):
        return np.asarray(factor.inverse_root, np.float64)
    v = np.asarray(dequantize_eigenvectors(factor.root_eigenvectors, dim), np.float64)
    v = _np_bjorck(v, 1)
    return (v * np.asarray(factor.root_eigenvalues, np.float64)) @ v.T


# ---------------------------------------------------------------- f32 Shampoo


@pytest.mark.parametrize(
    "shape, t1, t2, matrix_eps, tol",
    # The tolerance is f32 eigh against float64: its eigenvalue error (~1e-7 · λmax) relative
    # to the damping. With intervals the momentum leaves the span of the statistics, where the
    # damping alone sets the root, so those cases use a larger damping. Measured largest
    # errors: 2.4e-5 at the default damping, 5.4e-5 with intervals.
    [
        ((16, 24), 1, 1, 1e-6, 3e-4),
        ((8, 40), 1, 1, 1e-6, 3e-4),
        ((7, 13), 1, 1, 1e-6, 3e-4),
        ((16, 24), 2, 3, 1e-3, 1e-4),
        ((8, 40), 3, 2, 1e-3, 1e-4),
        ((7, 13), 2, 3, 1e-3, 1e-4),
    ],
)
def test_f32_steps_match_float64_reference(shape, t1, t2, matrix_eps, tol):
    rng = np.random.default_rng(sum(shape) + 10 * t1 + t2)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(7)]
    opt = scale_by_shampoo(
        statistics_interval=t1, preconditioner_interval=t2, matrix_eps=matrix_eps
    )
    ours, _ = _run(opt, grads)
    ref = _np_shampoo(grads, matrix_eps=matrix_eps, t1=t1, t2=t2)
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err < tol, (t, err)


def test_unpreconditioned_leaves_are_optax_adam():
    shapes = {"b": (24,), "v": (3, 4, 5), "row": (1, 24), "wide": (4, 40)}
    rng = np.random.default_rng(0)
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    ours = scale_by_shampoo(max_preconditioner_dim=32)  # "wide" is too wide
    ref = optax.scale_by_adam()
    s1, s2 = ours.init(params), ref.init(params)
    assert all(s1.preconditioners[k] == () for k in shapes)
    update1, update2 = jax.jit(ours.update), jax.jit(ref.update)
    for _ in range(3):
        g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        u1, s1 = update1(g, s1)
        u2, s2 = update2(g, s2)
        for k in shapes:
            np.testing.assert_allclose(u1[k], u2[k], rtol=1e-6, atol=1e-7)


def test_first_step_is_orthogonalized_gradient_at_adams_norm():
    g = np.random.default_rng(1).standard_normal((8, 40)).astype(np.float32)
    (u,), _ = _run(scale_by_shampoo(), [g])
    uu, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    polar = uu @ vt
    adam = g / (np.abs(g) + 1e-8)  # Adam's first step: sign(g)
    expected = polar * np.linalg.norm(adam) / np.linalg.norm(polar)
    np.testing.assert_allclose(u, expected, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- 4-bit storage


def test_linear2_map_values():
    fmt = linear2_format()
    values = np.asarray(fmt.values)
    np.testing.assert_allclose(values, _np_linear2(), rtol=0, atol=1e-15)
    assert fmt.bits == 4 and fmt.name == "linear4s_p2" and values.size == 16
    assert values[0] == -1.0 and values[-1] == 1.0 and 0.0 not in values
    np.testing.assert_allclose(values, -values[::-1], atol=1e-15)  # symmetric
    assert values[8] == pytest.approx((1 / 15) ** 2)  # the smallest magnitude


@pytest.mark.parametrize("dim, block_size", [(7, 64), (13, 32), (64, 64), (96, 64), (96, 32)])
def test_quantize_eigenvectors_round_trip_matches_numpy(dim, block_size):
    rng = np.random.default_rng(dim * block_size)
    u = _orthogonal(rng, dim).astype(np.float32)
    q = quantize_eigenvectors(jnp.asarray(u), block_size)
    n_pad = max(1, math.ceil(dim * dim / block_size)) * block_size
    assert isinstance(q, QArray) and q.format == linear2_format()
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (n_pad // 2,)
    assert q.scale.dtype == jnp.float32 and q.scale.shape == (n_pad // block_size,)
    assert q.nbytes == n_pad // 2 + 4 * (n_pad // block_size)

    u_hat = np.asarray(dequantize_eigenvectors(q, dim), np.float64)
    assert u_hat.shape == (dim, dim)
    ref, y = _np_blockwise_linear2(u, block_size)
    m = _np_linear2()
    near_tie = np.min(np.abs(y[:, None] - (m[1:] + m[:-1])[None, :] / 2), axis=1) < 1e-6
    same = np.isclose(u_hat.ravel(), ref[: dim * dim], rtol=1e-6, atol=0)
    assert np.all(same | near_tie[: dim * dim])
    # Half the widest step of the map (from (13/15)² to 1) times the block's absmax.
    s = np.abs(np.pad(u.ravel(), (0, n_pad - u.size))).reshape(-1, block_size).max(1)
    bound = 0.5 * (1 - (13 / 15) ** 2) * np.repeat(s, block_size)[: u.size] * (1 + 1e-6)
    assert np.all(np.abs(u_hat.ravel() - u.ravel()) <= bound)


def test_bjorck_reduces_orthogonality_error():
    rng = np.random.default_rng(2)
    dim = 96
    v = np.asarray(dequantize_eigenvectors(quantize_eigenvectors(_orthogonal(rng, dim)), dim))
    errs = [
        np.linalg.norm(w.T @ w - np.eye(dim))
        for w in (np.asarray(bjorck(jnp.asarray(v), k), np.float64) for k in range(4))
    ]
    # Measured: 1.51, 0.24, 0.0083, 1.4e-5 (after 0..3 steps).
    assert errs[0] > 1.0
    assert errs[1] < 0.2 * errs[0] and errs[2] < 0.1 * errs[1] and errs[3] < 1e-3
    # Björck equals its float64 reference and keeps an orthogonal matrix.
    np.testing.assert_allclose(bjorck(jnp.asarray(v), 2), _np_bjorck(v, 2), atol=1e-5)
    q = _orthogonal(rng, 16)
    np.testing.assert_allclose(bjorck(jnp.asarray(q, jnp.float32), 3), q, atol=1e-5)


def test_4bit_inverse_root_of_an_exact_eigendecomposition():
    """One quantize → dequantize → rectify of exact eigenvectors: the paper's storage error."""
    rng = np.random.default_rng(3)
    dim = 96
    a = _spd(rng, dim, 1e-3)
    lam, u = np.linalg.eigh(a)
    r = (lam + 1e-6 * lam.max()) ** -0.25
    exact = (u * r) @ u.T
    v = np.asarray(dequantize_eigenvectors(quantize_eigenvectors(u), dim), np.float64)
    err = [
        np.linalg.norm((w * r) @ w.T - exact) / np.linalg.norm(exact)
        for w in (_np_bjorck(v, k) for k in range(3))
    ]
    # Measured: 0.150 without rectification, 0.053 after one Björck step, 0.048 after two.
    assert err[0] > 0.1
    assert err[1] < 0.07 and err[2] < err[1]


@pytest.mark.parametrize("iterations", [1, 2])
def test_4bit_eigenvalues_approach_eigh_of_a_fixed_statistic(iterations):
    # A constant gradient: L_t = (1 − β**t) g gᵀ, a fixed target for the subspace iteration.
    rng = np.random.default_rng(4)
    g = (_orthogonal(rng, 64) * np.geomspace(3, 3e-2, 64)) @ _orthogonal(rng, 80)[:64]
    g = g.astype(np.float32)
    expected = np.linalg.eigvalsh((1 - 0.95**30) * g.astype(np.float64) @ g.T)[::-1]
    opt = scale_by_shampoo(
        state_bits=4,
        min_quantized_size=0,
        preconditioner_interval=1000,
        bjorck_iterations=iterations,
    )
    _, state = _run(opt, [g] * 30)
    left = state.preconditioners["w"][0]
    assert isinstance(left, EigenFactor)
    got = np.asarray(left.eigenvalues, np.float64)
    assert np.all(np.diff(got) <= 0)  # stored in descending order
    trace = got.sum() / expected.sum()
    shape_err = np.abs(got / got.sum() - expected / expected.sum()).max() * expected.sum()
    if iterations == 2:
        # Measured after 30 updates: trace ratio 0.998, largest error 0.013 · λmax.
        assert trace == pytest.approx(1, abs=0.01)
        assert np.abs(got - expected).max() < 0.03 * expected[0]
    else:
        # One Björck step leaves every singular value of V at or below 1, so each rebuild
        # V diag(λ) Vᵀ loses a little: the statistics forget as with a slightly smaller β.
        # Measured: trace ratio 0.90, spectrum (each over its trace) off by 0.033 · λmax.
        assert 0.85 < trace < 0.95
    assert shape_err < 0.05 * expected[0]


def test_4bit_preconditioner_tracks_f32():
    """The same gradient stream through f32 and 4-bit Shampoo: roots and updates stay close."""
    rng = np.random.default_rng(5)
    m, n = 48, 64
    cl, cr = np.linalg.cholesky(_spd(rng, m, 1e-2)), np.linalg.cholesky(_spd(rng, n, 1e-2))
    grads = [(cl @ rng.standard_normal((m, n)) @ cr.T).astype(np.float32) for _ in range(40)]
    kw = dict(statistics_interval=1, preconditioner_interval=10)
    u32, s32 = _run(scale_by_shampoo(**kw), grads)
    u4, s4 = _run(scale_by_shampoo(state_bits=4, min_quantized_size=0, **kw), grads)
    for side, dim in ((0, m), (1, n)):
        exact = _root(s32.preconditioners["w"][side], dim)
        approx = _root(s4.preconditioners["w"][side], dim)
        # Measured: 0.117 (left) and 0.136 (right). Re-quantizing the eigenbasis at every
        # statistics update adds up to ~2.5x the one-shot error (0.053), which only the
        # (1 − β) share of each new gradient corrects.
        assert np.linalg.norm(approx - exact) / np.linalg.norm(exact) < 0.2
    rel = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(u4, u32, strict=True)]
    # Measured: at most 0.205 over the last 10 steps. The first step differs by 0.54: R is
    # then of rank 48 < 64, and the eigenvector error leaks the gradient into its null space,
    # whose damped root is (1e-6)^(-1/4) ≈ 32 times larger.
    assert max(rel[-10:]) < 0.3


def test_4bit_update_is_the_grafted_step_from_the_stored_roots():
    rng = np.random.default_rng(6)
    grads = [rng.standard_normal((16, 40)).astype(np.float32) for _ in range(4)]
    opt = scale_by_shampoo(state_bits=4, min_quantized_size=1000, preconditioner_interval=2)
    ours, state = _run(opt, grads)
    left, right = state.preconditioners["w"]
    assert isinstance(left, MatrixFactor) and isinstance(right, EigenFactor)  # 16² < 1000 <= 40²
    mu, nu = (np.asarray(x["w"], np.float64) for x in (state.mu, state.nu))
    m_hat = mu / (1 - 0.9**4)
    adam = m_hat / (np.sqrt(nu / (1 - 0.999**4)) + 1e-8)
    d = _root(left, 16) @ m_hat @ _root(right, 40)
    expected = d * np.linalg.norm(adam) / np.linalg.norm(d)
    np.testing.assert_allclose(ours[-1], expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max())


# ---------------------------------------------------------------- convergence


def _train(opt, x, y, steps):
    loss = lambda p: 0.5 * jnp.mean(jnp.sum((x @ p["w"] - y) ** 2, axis=1))

    @jax.jit
    def run(params):
        def body(carry, _):
            params, state = carry
            u, state = opt.update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, u)
            return (params, state), loss(params)

        return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)[1]

    return np.asarray(run({"w": jnp.zeros((x.shape[1], y.shape[1]))}))


def test_converges_on_ill_conditioned_least_squares():
    # Inputs with covariance eigenvalues from 1 to 1e-3 in a random basis: Adam's diagonal
    # cannot undo the rotation, Shampoo's left factor can.
    rng = np.random.default_rng(0)
    q = _orthogonal(rng, 64)
    x = rng.standard_normal((256, 64)) @ ((q * np.geomspace(1, 0.03, 64)) @ _orthogonal(rng, 64).T)
    y = x @ rng.standard_normal((64, 32))
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    start = float(0.5 * jnp.mean(jnp.sum(y**2, axis=1)))
    # One learning rate for all: the graft gives Shampoo's steps Adam's norms, so only the
    # directions differ.
    kw = dict(weight_decay=0.0)
    curves = {
        "adam": _train(adamw(0.1, **kw), x, y, 300) / start,
        "f32": _train(shampoo(0.1, **kw), x, y, 300) / start,
        "4bit": _train(shampoo(0.1, state_bits=4, min_quantized_size=1024, **kw), x, y, 300)
        / start,
    }
    final = {k: float(c[-1]) for k, c in curves.items()}
    steps = {
        k: int(np.argmax(c <= 1e-3)) + 1 if np.any(c <= 1e-3) else 10**9 for k, c in curves.items()
    }
    # Measured final losses / start: adam 2.8e-4, f32 2.7e-6, 4-bit 6.3e-5;
    # steps to 1e-3 · start: adam 174, f32 59, 4-bit 95.
    assert final["f32"] < 1e-5 and final["4bit"] < 2e-4, final
    assert steps["4bit"] <= 2 * steps["f32"], steps
    assert final["4bit"] < 0.5 * final["adam"] and final["f32"] < 0.05 * final["adam"], final
    assert steps["4bit"] < 0.7 * steps["adam"], steps


def test_quantized_grafting_moments_train_like_f32_moments():
    """moment_bits=8 / 4 stores Adam's mu and nu by jaxquant.optim's recipes; the
    preconditioners are unchanged, the state shrinks by exactly the moments' saving."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    y = x @ jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    start = float(0.5 * jnp.mean(jnp.sum(y**2, axis=1)))
    kw = dict(weight_decay=0.0, state_bits=4, min_quantized_size=1024)
    f32 = float(_train(shampoo(0.1, **kw), x, y, 150)[-1]) / start
    for bits in (8, 4):
        q = float(_train(shampoo(0.1, moment_bits=bits, **kw), x, y, 150)[-1]) / start
        assert q < max(3 * f32, 1e-5), (bits, q, f32)
    params = {"w": jnp.zeros((128, 96)), "b": jnp.zeros((96,))}
    s32 = scale_by_shampoo().init(params)
    s8 = scale_by_shampoo(moment_bits=8).init(params)
    assert isinstance(s8.mu["w"], QuantizedMoment) and isinstance(s8.nu["w"], QuantizedMoment)
    blocks = 128 * 96 // 256
    assert state_nbytes(s32) - state_nbytes(s8) == 2 * (4 * 128 * 96 - 128 * 96 - 4 * blocks)


# ---------------------------------------------------------------- state, memory, jit, orbax


def test_4bit_state_layout_and_eval_shape():
    params = {"w": jnp.zeros((40, 96)), "b": jnp.zeros((96,))}
    opt = scale_by_shampoo(state_bits=4)
    state = opt.init(params)
    assert isinstance(state, ScaleByShampooState) and state.count.dtype == jnp.int32
    left, right = state.preconditioners["w"]
    assert isinstance(left, MatrixFactor)  # 40² = 1600 < min_quantized_size
    assert left.statistics.shape == left.inverse_root.shape == (40, 40)
    assert isinstance(right, EigenFactor) and right.eigenvalues.shape == (96,)
    assert right.eigenvectors.format.name == "linear4s_p2" and right.eigenvectors.format.bits == 4
    assert state.preconditioners["b"] == ()
    assert state.mu["w"].dtype == state.nu["b"].dtype == jnp.float32
    abstract = jax.eval_shape(opt.init, params)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_state_nbytes_4bit_saves_the_exact_byte_count():
    params = {"w": jnp.zeros((40, 96)), "b": jnp.zeros((96,))}
    s32 = scale_by_shampoo().init(params)
    s4 = scale_by_shampoo(state_bits=4).init(params)
    adam = 2 * 4 * (40 * 96 + 96) + 4  # mu, nu, count
    assert state_nbytes(s32) == adam + 2 * 4 * (40 * 40 + 96 * 96)
    # The 96 × 96 factor (9216 = 144 blocks of 64): two f32 eigenvalue vectors and two sets of
    # 4-bit codes with one f32 scale per block; the 40 × 40 one stays f32.
    quantized = 2 * (4 * 96 + 9216 // 2 + 4 * 144)
    assert state_nbytes(s4) == adam + 2 * 4 * 40 * 40 + quantized
    assert state_nbytes(s32) - state_nbytes(s4) == 2 * 4 * 9216 - quantized == 62592
    assert state_nbytes(jax.eval_shape(scale_by_shampoo(state_bits=4).init, params)) == (
        state_nbytes(s4)
    )


@pytest.mark.parametrize("state_bits", [32, 4])
def test_update_is_jitted_once(state_bits):
    rng = np.random.default_rng(7)
    params = {"w": jnp.zeros((16, 40), jnp.bfloat16), "b": jnp.zeros((40,), jnp.bfloat16)}
    opt = shampoo(
        optax.cosine_decay_schedule(1e-2, 10),
        b1=0.9,
        b2=0.99,
        weight_decay=1e-4,
        state_bits=state_bits,
        min_quantized_size=0,
        statistics_interval=2,
        preconditioner_interval=3,
    )
    traces = []

    @jax.jit
    def update(g, state, params):
        traces.append(1)
        return opt.update(g, state, params)

    state = opt.init(params)
    for _ in range(7):  # crosses both intervals
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    assert len(traces) == 1
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(u))  # the grad's dtype
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(u))


def test_orbax_round_trip_of_4bit_state_is_bit_exact(tmp_path):
    rng = np.random.default_rng(8)
    params = {"w": jnp.zeros((16, 40)), "b": jnp.zeros((40,))}
    opt = shampoo(1e-2, state_bits=4, min_quantized_size=1000)
    state = opt.init(params)
    for _ in range(2):
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        _, state = jax.jit(opt.update)(g, state, params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "opt", state)
    abstract = jax.eval_shape(opt.init, params)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "opt", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored[0].preconditioners["w"][1].eigenvectors, QArray)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shampoo_is_the_chain_with_decoupled_weight_decay():
    rng = np.random.default_rng(9)
    params = {"w": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)}
    g = {"w": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)}
    ours = shampoo(0.5, weight_decay=0.1, beta_precond=0.9)
    chain = optax.chain(
        scale_by_shampoo(beta_precond=0.9),
        optax.add_decayed_weights(0.1),
        optax.scale_by_learning_rate(0.5),
    )
    u1, _ = jax.jit(ours.update)(g, ours.init(params), params)
    u2, _ = jax.jit(chain.update)(g, chain.init(params), params)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


def test_works_under_inject_hyperparams_and_multisteps():
    rng = np.random.default_rng(10)
    # Square, so L and R are full rank from step 1: a rank-deficient factor's null space has
    # the 32-times-larger damped root, which amplifies the last-bit differences of
    # hyperparameters held as f32 arrays.
    params = {"w": jnp.zeros((16, 16)), "b": jnp.zeros((16,))}
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        for _ in range(4)
    ]
    kw = dict(state_bits=4, min_quantized_size=0, preconditioner_interval=2)
    injected = optax.inject_hyperparams(shampoo, static_args=STATIC_ARGS)(1e-2, **kw)
    plain = shampoo(1e-2, **kw)
    accumulated = optax.MultiSteps(plain, every_k_schedule=2)
    states = [opt.init(params) for opt in (injected, plain, accumulated)]
    updates = [jax.jit(opt.update) for opt in (injected, plain, accumulated)]
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3 * float(jnp.abs(b).max()))
    for t, g in enumerate(grads):
        (u1, u2, u3), states = zip(
            *(up(g, s, params) for up, s in zip(updates, states, strict=True)), strict=True
        )
        jax.tree.map(close, u1, u2)  # measured: 1.5e-4 of the largest entry
        if t % 2 == 0:  # MultiSteps accumulates: zero update on the first of every two
            assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(u3))
        else:
            assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(u3))
    assert float(jnp.abs(u3["w"]).sum()) > 0


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"state_bits": 8}, "state_bits"),
        ({"state_bits": True}, "state_bits"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 64.0}, "block_size"),
        ({"statistics_interval": 0}, "statistics_interval"),
        ({"preconditioner_interval": -1}, "preconditioner_interval"),
        ({"max_preconditioner_dim": 0}, "max_preconditioner_dim"),
        ({"min_quantized_size": -1}, "min_quantized_size"),
        ({"bjorck_iterations": -1}, "bjorck_iterations"),
        ({"grafting": "sgd"}, "grafting"),
        ({"beta_precond": 1.0}, "beta_precond"),
        ({"matrix_eps": 0.0}, "matrix_eps"),
        ({"exponent": 0.25}, "exponent"),
        ({"moment_bits": 16}, "moment_bits"),
        ({"moment_bits": 8, "moment_format": "rank1"}, "moment_format"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        scale_by_shampoo(**kwargs)
    with pytest.raises(ValueError, match=name):
        shampoo(1e-3, **kwargs)


def test_quantize_eigenvectors_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        quantize_eigenvectors(jnp.eye(4), block_size=0)
