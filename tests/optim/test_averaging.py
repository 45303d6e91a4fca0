"""Tests of jaxquant.optim.averaging: averagers against numpy, schedules against closed forms,
averaging on a noisy quadratic, with_averaging in chains (optax and 8-bit AdamW), jit, orbax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax import lax

from jaxquant.optim.adam import adamw
from jaxquant.optim.averaging import (
    EmaState,
    LawaState,
    WithAveragingState,
    averaged_params,
    constant_schedule,
    ema,
    ema_growing,
    inverse_sqrt_schedule,
    lawa,
    with_averaging,
)
from jaxquant.optim.state import QuantizedMoment

# ---------------------------------------------------------------- helpers

TREE_SHAPES = {"a": (5, 3), "b": (7,)}


def _iterates(seed, steps, shapes=TREE_SHAPES):
    """θ_0 and θ_1 … θ_T (each leaf stacked [T, *shape]), float32, random walk + noise."""
    rng = np.random.default_rng(seed)
    p0 = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    its = {
        n: (
            np.cumsum(rng.standard_normal((steps, *s)), 0) * 0.1 + rng.standard_normal((steps, *s))
        ).astype(np.float32)
        for n, s in shapes.items()
    }
    return p0, its


def _averages(averager, p0, iterates, dtype=jnp.float32):
    """θ̄_1 … θ̄_T from the averager (leaves [T, *shape]) and its final state."""

    def body(state, it):
        state = averager.update(it, state)
        return state, state.average()

    run = jax.jit(lambda s, its: lax.scan(body, s, its))
    state, out = run(averager.init(p0, dtype), iterates)
    return jax.tree.map(np.asarray, out), state


def _ref_ema(p0, iterates, betas):
    """float64: θ̄_t = β_t θ̄_{t−1} + (1 − β_t) θ_t from θ̄_0 = p0; returns θ̄_1 … θ̄_T."""
    avg, out = np.asarray(p0, np.float64), []
    for it, b in zip(iterates, betas, strict=True):
        avg = b * avg + (1 - b) * np.asarray(it, np.float64)
        out.append(avg)
    return np.stack(out)


def _ref_lawa(p0, iterates, k, every):
    """float64: the mean of the last k snapshots taken at t = every, 2·every, …; p0 before the
    first; returns θ̄_1 … θ̄_T."""
    snaps, out = [], []
    for t, it in enumerate(iterates, start=1):
        if t % every == 0:
            snaps.append(np.asarray(it, np.float64))
        out.append(np.mean(snaps[-k:], axis=0) if snaps else np.asarray(p0, np.float64))
    return np.stack(out)


# ---------------------------------------------------------------- averagers vs numpy


@pytest.mark.parametrize("fraction", [1 / 25, 0.1, 1.0])
def test_ema_growing_matches_numpy_reference(fraction):
    steps = 400
    p0, its = _iterates(0, steps)
    got, state = _averages(ema_growing(fraction), p0, its)
    t = np.arange(1, steps + 1, dtype=np.float64)
    betas = 2.0 ** (-1.0 / (fraction * t))
    for name in TREE_SHAPES:
        ref = _ref_ema(p0[name], its[name], betas)
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=2e-6)
    assert isinstance(state, EmaState) and int(state.count) == steps
    assert state.ema["a"].dtype == jnp.float32


def test_ema_growing_half_life_is_the_fraction_of_t():
    # Impulses: θ_0 = e_0 and θ_s = e_s, so θ̄_t[s] is the weight of θ_s in θ̄_t.
    steps, fraction = 400, 1 / 25
    eye = np.eye(steps + 1, dtype=np.float32)
    got, _ = _averages(ema_growing(fraction), {"w": eye[0]}, {"w": eye[1:]})
    for t in (100, 200, 400):
        weights = got["w"][t - 1]
        assert weights.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.all(weights[t + 1 :] == 0)
        # Exactly 2^(−(1/f)(H_t − H_{t−h})) · (1 − β_{t−h}) / (1 − β_t) ≈ 1/2 for h = f·t.
        h = round(fraction * t)
        assert weights[t - h] / weights[t] == pytest.approx(0.5, abs=0.04)
        # The weights grow monotonically toward the newest iterate (the oldest underflow f32).
        assert np.all(np.diff(weights[t // 2 : t + 1]) > 0)


@pytest.mark.parametrize("decay", [0.0, 0.9, 0.999])
def test_ema_constant_matches_numpy_reference(decay):
    steps = 300
    p0, its = _iterates(1, steps)
    got, _ = _averages(ema(decay), p0, its)
    for name in TREE_SHAPES:
        ref = _ref_ema(p0[name], its[name], np.full(steps, decay))
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=2e-6)
    if decay == 0.0:
        # Tracks the last iterate (to rounding: the update is θ̄ + 1·(θ − θ̄)).
        np.testing.assert_allclose(got["a"], its["a"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k, every", [(3, 4), (1, 1), (5, 1), (4, 7), (2, 30)])
def test_lawa_matches_numpy_reference(k, every):
    # 60 steps: before the first snapshot, with a partly filled buffer, and wrapped around.
    steps = 60
    p0, its = _iterates(2, steps)
    got, state = _averages(lawa(k, every), p0, its)
    for name in TREE_SHAPES:
        ref = _ref_lawa(p0[name], its[name], k, every)
        np.testing.assert_allclose(got[name], ref, rtol=1e-6, atol=1e-6)
        # Before the first snapshot the average is exactly the params given to init.
        np.testing.assert_array_equal(
            got[name][: every - 1], np.broadcast_to(p0[name], got[name][: every - 1].shape)
        )
    assert isinstance(state, LawaState)
    assert int(state.num_snapshots) == steps // every and int(state.count) == steps


def test_lawa_memory_is_k_copies_of_the_params():
    params = {"w": jnp.zeros((16, 8), jnp.bfloat16), "b": jnp.zeros((8,))}
    state = lawa(k=4, every=10).init(params, jnp.float32)
    assert state.snapshots["w"].shape == (4, 16, 8) and state.snapshots["w"].dtype == jnp.float32
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.snapshots))
    assert nbytes == 4 * 4 * (16 * 8 + 8)
    state16 = lawa(k=4, every=10).init(params, jnp.bfloat16)
    assert state16.snapshots["w"].dtype == jnp.bfloat16


# ---------------------------------------------------------------- schedules


def _inv_sqrt_closed_form(t, peak, w, alpha, init):
    if t < w:
        return init + (peak - init) * t / w
    return peak * math.sqrt(alpha / (t - w + alpha))


@pytest.mark.parametrize(
    "peak, warmup, offset, init",
    [(3e-3, 100, None, 0.0), (3e-3, 100, 1024.0, 3e-4), (1.0, 0, 50.0, 0.0), (0.5, 1, None, 0.1)],
)
def test_inverse_sqrt_schedule_matches_closed_form(peak, warmup, offset, init):
    sched = inverse_sqrt_schedule(peak, warmup, offset=offset, init_value=init)
    alpha = warmup if offset is None else offset
    steps = [0, 1, max(warmup - 1, 0), warmup, warmup + 1, 2 * warmup + 3, 10 * warmup + 7, 10**6]
    jitted = jax.jit(sched)
    for t in steps:
        want = _inv_sqrt_closed_form(t, peak, warmup, alpha, init)
        assert float(sched(t)) == pytest.approx(want, rel=1e-6, abs=1e-12), t
        assert float(jitted(jnp.int32(t))) == pytest.approx(want, rel=1e-6, abs=1e-12), t
    assert float(sched(0)) == pytest.approx(init if warmup else peak)
    assert float(sched(warmup)) == pytest.approx(peak)  # continuous at the end of warm-up
    if offset is None:  # the default: peak · sqrt(warmup / t)
        assert float(sched(9 * warmup)) == pytest.approx(peak / 3, rel=1e-6)
    assert sched(jnp.int32(5)).dtype == jnp.float32


@pytest.mark.parametrize("peak, warmup, init", [(3e-3, 100, 0.0), (1.0, 0, 0.0), (2.0, 7, 0.5)])
def test_constant_schedule_matches_closed_form(peak, warmup, init):
    sched = constant_schedule(peak, warmup, init_value=init)
    for t in [0, 1, max(warmup - 1, 0), warmup, warmup + 1, 10**7]:
        want = init + (peak - init) * t / warmup if t < warmup else peak
        assert float(sched(t)) == pytest.approx(want, rel=1e-6), t
        assert float(jax.jit(sched)(jnp.int32(t))) == pytest.approx(want, rel=1e-6), t


def test_schedules_drive_optax_adamw_without_a_horizon():
    opt = optax.adamw(inverse_sqrt_schedule(1e-2, 3, offset=10.0))
    params = {"w": jnp.ones(4)}
    state = opt.init(params)
    for _ in range(5):
        u, state = jax.jit(opt.update)({"w": jnp.ones(4)}, state, params)
    assert bool(jnp.all(jnp.isfinite(u["w"])))


# ---------------------------------------------------------------- noisy quadratic


@pytest.mark.parametrize(
    "averager", [ema_growing(), ema(0.99), lawa(10, 20)], ids=["ema_growing", "ema", "lawa"]
)
def test_averages_beat_the_last_iterate_on_a_noisy_quadratic(averager):
    # f(w) = ½ Σ λ_i (w_i − w*_i)², SGD with N(0, 1) gradient noise at a constant rate: the
    # last iterate keeps a noise floor; the averages remove most of it.
    d, steps, lr = 256, 2000, 0.5
    lam = jnp.asarray(np.geomspace(0.1, 1.0, d), jnp.float32)
    w_star = jnp.asarray(np.random.default_rng(0).standard_normal(d), jnp.float32)
    opt = with_averaging(optax.sgd(lr), averager)

    def body(carry, key):
        params, state = carry
        g = {"w": lam * (params["w"] - w_star) + jax.random.normal(key, (d,))}
        u, state = opt.update(g, state, params)
        return (optax.apply_updates(params, u), state), None

    params = {"w": jnp.zeros(d)}
    keys = jax.random.split(jax.random.key(0), steps)
    (params, state), _ = jax.jit(lambda c: lax.scan(body, c, keys))((params, opt.init(params)))
    last = float(jnp.linalg.norm(params["w"] - w_star))
    avg = float(jnp.linalg.norm(averaged_params(state)["w"] - w_star))
    # Measured over seeds 0-2: avg/last ≈ 0.27-0.28 (ema_growing), 0.28-0.31 (ema 0.99),
    # 0.35-0.37 (lawa 10×20). Averaging that did nothing would give 1.
    assert avg < 0.5 * last, (avg, last)


# ---------------------------------------------------------------- with_averaging in chains

SHAPES = {"w": (64, 128), "b": (128,), "v": (5, 3, 7)}


def _params(key):
    keys = jax.random.split(key, len(SHAPES))
    return {n: jax.random.normal(k, s) for k, (n, s) in zip(keys, SHAPES.items(), strict=True)}


def _grads(step):
    return _params(jax.random.key(100 + step))


def _run(opt, params, steps):
    state = opt.init(params)
    update = jax.jit(opt.update)
    updates, trajectory = [], []
    for t in range(steps):
        u, state = update(_grads(t), state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
        trajectory.append(params)
    return updates, trajectory, state


INNERS = {
    "optax_adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "adamw_8bit": lambda: adamw(1e-2, weight_decay=0.1, state_bits=8),
}


@pytest.mark.parametrize("inner", list(INNERS), ids=list(INNERS))
def test_with_averaging_in_chain_passes_updates_and_tracks_the_params(inner):
    params = _params(jax.random.key(0))
    steps = 6
    clip = lambda: optax.clip_by_global_norm(1.0)
    # Nested tuples: a chain inside a chain.
    opt = optax.chain(clip(), optax.chain(with_averaging(INNERS[inner](), ema_growing())))
    ref = optax.chain(clip(), optax.chain(INNERS[inner]()))
    ours, traj, state = _run(opt, params, steps)
    theirs, traj_ref, _ = _run(ref, params, steps)
    for a, b in zip(ours, theirs, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)

    avg = averaged_params(state)
    t = np.arange(1, steps + 1, dtype=np.float64)
    betas = 2.0 ** (-25.0 / t)
    for name in SHAPES:
        ref_avg = _ref_ema(params[name], [p[name] for p in traj_ref], betas)[-1]
        assert avg[name].dtype == jnp.float32 and avg[name].shape == SHAPES[name]
        np.testing.assert_allclose(avg[name], ref_avg, rtol=1e-5, atol=1e-6)
    if inner == "adamw_8bit":
        inner_state = state[1][0].inner_state
        assert isinstance(inner_state[0].mu["w"], QuantizedMoment)


def test_with_averaging_update_is_jitted_once():
    params = _params(jax.random.key(0))
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        with_averaging(adamw(inverse_sqrt_schedule(1e-2, 2), state_bits=8), lawa(2, 2)),
    )
    traces = []

    @jax.jit
    def update(g, state, params):
        traces.append(1)
        return opt.update(g, state, params)

    state = opt.init(params)
    for t in range(5):
        u, state = update(_grads(t), state, params)
        params = optax.apply_updates(params, u)
    assert len(traces) == 1
    assert int(state[1].averager_state.num_snapshots) == 2
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(averaged_params(state)))


@pytest.mark.parametrize("averager", [ema_growing(), lawa(3, 2)], ids=["ema_growing", "lawa"])
def test_orbax_round_trip_of_averaged_state_is_bit_exact(tmp_path, averager):
    params = _params(jax.random.key(0))
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), with_averaging(adamw(1e-2, state_bits=8), averager)
    )
    _, _, state = _run(opt, params, 3)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "opt", state)
    abstract = jax.eval_shape(opt.init, params)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "opt", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored[1], WithAveragingState)
    assert isinstance(restored[1].inner_state[0].mu["w"], QuantizedMoment)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
        jax.tree.leaves(averaged_params(restored)),
        jax.tree.leaves(averaged_params(state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_average_is_f32_for_bf16_params_and_init_is_abstract():
    params = {"w": jnp.ones((4, 8), jnp.bfloat16), "b": jnp.zeros((8,), jnp.bfloat16)}
    opt = with_averaging(optax.sgd(1e-3), ema_growing())
    abstract = jax.eval_shape(opt.init, params)
    assert abstract.averager_state.ema["w"].dtype == jnp.float32
    state = opt.init(params)
    u, state = jax.jit(opt.update)(
        {"w": jnp.ones((4, 8), jnp.bfloat16), "b": params["b"]}, state, params
    )
    assert u["w"].dtype == jnp.bfloat16
    # After one step the average is the iterate 1 − 1e-3 (to bf16 resolution: XLA may keep the
    # sum params + updates at more than bf16 precision), stored in f32.
    avg = averaged_params(state)["w"]
    assert avg.dtype == jnp.float32
    np.testing.assert_allclose(avg, 1 - 1e-3, rtol=0, atol=2**-8)
    lawa16 = with_averaging(optax.sgd(1e-3), lawa(2, 1), dtype=jnp.bfloat16)
    assert averaged_params(lawa16.init(params))["w"].dtype == jnp.bfloat16


def test_averaged_params_finds_the_state_under_inject_hyperparams():
    params = {"w": jnp.ones(3)}
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2)
    opt = optax.chain(optax.identity(), with_averaging(inner, ema(0.5)))
    state = opt.init(params)
    _, state = opt.update({"w": jnp.ones(3)}, state, params)
    assert averaged_params(state)["w"].shape == (3,)


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: ema_growing(0.0), "half_life_fraction"),
        (lambda: ema_growing(-0.1), "half_life_fraction"),
        (lambda: ema_growing(float("nan")), "half_life_fraction"),
        (lambda: ema_growing(True), "half_life_fraction"),
        (lambda: ema(1.0), "decay"),
        (lambda: ema(-0.01), "decay"),
        (lambda: lawa(0, 1), "k"),
        (lambda: lawa(2.0, 1), "k"),
        (lambda: lawa(2, 0), "every"),
        (lambda: inverse_sqrt_schedule(-1.0, 10), "peak_value"),
        (lambda: inverse_sqrt_schedule(1.0, -1), "warmup_steps"),
        (lambda: inverse_sqrt_schedule(1.0, 1.5), "warmup_steps"),
        (lambda: inverse_sqrt_schedule(1.0, 10, offset=0.0), "offset"),
        (lambda: inverse_sqrt_schedule(1.0, 0), "offset"),
        (lambda: inverse_sqrt_schedule(1.0, 10, init_value=float("inf")), "init_value"),
        (lambda: constant_schedule(float("nan"), 10), "peak_value"),
        (lambda: constant_schedule(1.0, -5), "warmup_steps"),
        (lambda: with_averaging(optax.sgd(1.0), ema(0.9), dtype=jnp.int32), "dtype"),
        (lambda: averaged_params(optax.adamw(1e-3).init({"w": jnp.ones(2)})), "opt_state"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_update_without_params_raises_naming_params():
    opt = with_averaging(optax.sgd(1.0), ema_growing())
    state = opt.init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="params"):
        opt.update({"w": jnp.ones(2)}, state)


def test_wrong_types_raise_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="inner"):
        with_averaging(lambda g: g, ema(0.9))
    with pytest.raises(TypeError, match="averager"):
        with_averaging(optax.sgd(1.0), 0.999)


def test_two_averaging_states_are_ambiguous():
    params = {"w": jnp.ones(2)}
    both = (with_averaging(optax.sgd(1.0), ema(0.9)).init(params),) * 2
    with pytest.raises(ValueError, match="exactly one"):
        averaged_params(both)
