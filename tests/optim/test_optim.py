"""Tests of jaxquant.optim: dynamic map, 8-bit states, Adam/AdamW, memory, jit, orbax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxquant.numerics import ScalarQuantizer, quantize
from jaxquant.numerics.scaling import Scaling
from jaxquant.optim import (
    QuantizedMoment,
    adam,
    adamw,
    bytes_per_param,
    dequantize_state,
    dynamic_map,
    quantize_state,
    state_nbytes,
)
from jaxquant.optim.state import dynamic_format

# ---------------------------------------------------------------- the map


def _map_by_decoding_codes(signed: bool, bits: int) -> np.ndarray:
    """Independent reference: decode every code bit by bit (sign, zero run, indicator 1,
    fraction), float64. The two codes without an indicator bit are 0 and 1."""
    out = []
    width = bits - 1 if signed else bits
    for code in range(2**bits):
        sign = -1.0 if signed and code >> width else 1.0
        r = code & (2**width - 1)
        if r == 0:
            out.append(0.0 if sign > 0 else 1.0)  # the "negative zero" code stands for 1
            continue
        k = width - r.bit_length()  # leading zeros: the decade
        f = r.bit_length() - 1  # bits after the indicator
        if not signed and f == 0:
            out.append(1.0)  # unsigned: the lone code of the decade 10**-(bits-1) is 1
            continue
        j = r & (2**f - 1)
        out.append(sign * 10.0**-k * (0.1 + 0.9 * (j + 0.5) / 2**f))
    return np.sort(np.asarray(out))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitwise_decoding(signed, bits):
    m = dynamic_map(signed, bits)
    np.testing.assert_allclose(m, _map_by_decoding_codes(signed, bits), rtol=1e-12, atol=0)
    assert m.shape == (2**bits,) and m.dtype == np.float64
    assert np.all(np.diff(m) > 0)
    assert m[-1] == 1.0 and 0.0 in m
    if signed:
        # bitsandbytes' signed map is asymmetric: 1 but no -1; its bottom is half a step above.
        assert m[0] == pytest.approx(-(1 - 0.9 / 2 ** (bits - 1)), rel=1e-12)
        assert -1.0 not in m
    else:
        assert m[0] == 0.0


def test_dynamic_map_8bit_decades():
    m = dynamic_map(True)
    pos = m[m > 0][:-1]  # without the 1
    counts = [int(np.sum((pos >= 10.0**-k / 10) & (pos < 10.0**-k))) for k in range(7)]
    assert counts == [64, 32, 16, 8, 4, 2, 1]
    assert m[m > 0][0] == pytest.approx(5.5e-7)
    assert dynamic_map(False)[1] == pytest.approx(3.25e-7)


@pytest.mark.parametrize("bits", [1, 9, 8.0, True])
def test_dynamic_map_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        dynamic_map(True, bits)


# ---------------------------------------------------------------- 8-bit states


def _reference_state(x, signed, block_size):
    """numpy: block absmax, nearest map value (ties low), sign nudge. Returns (x_hat, y, idx,
    nudged) over the padded flat array."""
    m = dynamic_map(signed)
    flat = np.asarray(x, np.float32).ravel()
    n_pad = max(1, math.ceil(flat.size / block_size)) * block_size
    flat = np.pad(flat, (0, n_pad - flat.size)).reshape(-1, block_size)
    s = np.abs(flat).max(axis=1, keepdims=True)
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    y = (flat / s).astype(np.float64)
    idx = np.searchsorted((m[1:] + m[:-1]) / 2, y, side="left")
    nudged = np.zeros(y.shape, bool)
    if signed:
        nudged = (flat != 0) & (np.signbit(m[idx]) != np.signbit(flat))
        idx = idx + np.where(nudged, np.where(flat > 0, 1, -1), 0)
    return (m[idx] * s).ravel(), y.ravel(), idx.ravel(), nudged.ravel(), np.repeat(s, block_size)


@pytest.mark.parametrize("shape", [(1,), (255,), (257,), (1000,), (3, 7, 11)])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [256, 64])
def test_quantize_state_round_trip_matches_numpy_reference(shape, signed, block_size):
    rng = np.random.default_rng(hash((shape, signed, block_size)) % 2**32)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-8, 2, shape))  # many decades
    if not signed:
        x = x**2
    x = x.astype(np.float32)
    q = quantize_state(x, signed=signed, block_size=block_size)
    assert isinstance(q, QuantizedMoment) and q.shape == shape
    assert q.q.codes.dtype == jnp.uint8 and q.q.scale.dtype == jnp.float32
    n_pad = max(1, math.ceil(x.size / block_size)) * block_size
    assert q.q.codes.shape == (n_pad,) and q.q.scale.shape == (n_pad // block_size,)

    x_hat = np.asarray(dequantize_state(q), np.float64)
    assert x_hat.shape == shape and dequantize_state(q).dtype == jnp.float32
    ref, y, idx, nudged, s = _reference_state(x, signed, block_size)
    m = dynamic_map(signed)
    mids = (m[1:] + m[:-1]) / 2
    near_tie = np.min(np.abs(y[:, None] - mids[None, :]), axis=1) < 1e-6
    same = np.isclose(x_hat.ravel(), ref[: x.size], rtol=1e-6, atol=0)
    assert np.all(same | near_tie[: x.size])
    assert np.mean(same) > 0.99

    # Half the local map step times the block absmax (a full step where the sign was nudged).
    ext = np.concatenate([[m[0] - (m[1] - m[0])] if signed else [], m])
    i = np.clip(np.searchsorted(ext, y, side="right") - 1, 0, ext.size - 2)
    bound = np.where(nudged, 1.0, 0.5) * (ext[i + 1] - ext[i]) * s * (1 + 1e-5)
    err = np.abs(x_hat.ravel() - x.ravel().astype(np.float64))
    assert np.all(err <= bound[: x.size])


def test_quantize_state_sign_nudge():
    x = np.zeros(256, np.float32)
    x[:4] = [1.0, -1e-9, 1e-9, -0.3]
    q = quantize_state(x, signed=True)
    x_hat = np.asarray(dequantize_state(q))
    smallest = dynamic_map(True)[dynamic_map(True) < 0][-1]  # -5.5e-7
    # Without the nudge the tiny negative value rounds to 0 ...
    plain = quantize(
        x, ScalarQuantizer(dynamic_format(True), Scaling(axis=0, group_size=256))
    ).dequantize()
    assert float(plain[1]) == 0.0
    # ... with it, it keeps its sign at the smallest negative map value; +0 counts as positive,
    # so the tiny positive value stays 0 (bitsandbytes' sign-bit rule), and 0 stays 0.
    assert x_hat[1] == pytest.approx(smallest, rel=1e-6) and x_hat[1] < 0
    assert x_hat[2] == 0.0 and np.all(x_hat[4:] == 0.0)
    assert not np.any(np.signbit(x_hat) != np.signbit(x))
    # The unsigned map has no nudge (and saturates negatives at 0).
    assert float(dequantize_state(quantize_state(x, signed=False))[1]) == 0.0


def test_quantize_state_under_jit_equals_eager():
    x = jax.random.normal(jax.random.key(0), (300,))
    f = jax.jit(lambda x: quantize_state(x, signed=True))
    np.testing.assert_array_equal(f(x).q.codes, quantize_state(x, signed=True).q.codes)


# ---------------------------------------------------------------- Adam / AdamW


def _params(key, shapes):
    keys = jax.random.split(key, len(shapes))
    return {n: jax.random.normal(k, s) for k, (n, s) in zip(keys, shapes.items(), strict=True)}


SHAPES = {"w": (64, 128), "b": (128,), "v": (5, 3, 7)}


def _grads(step):
    return _params(jax.random.key(100 + step), SHAPES)


def _run(opt, params, steps):
    state = opt.init(params)
    update = jax.jit(opt.update)
    outs = []
    for t in range(steps):
        u, state = update(_grads(t), state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, state, params


@pytest.mark.parametrize(
    "lr", [1e-2, optax.linear_schedule(1e-2, 1e-3, 4)], ids=["float", "schedule"]
)
def test_f32_adamw_equals_optax(lr):
    params = _params(jax.random.key(0), SHAPES)
    mask = {"w": True, "b": False, "v": True}
    ours, _, p1 = _run(adamw(lr, weight_decay=0.1, mask=mask), params, 5)
    ref, _, p2 = _run(optax.adamw(lr, weight_decay=0.1, mask=mask), params, 5)
    for a, b in zip(ours, ref, strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), a, b)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p2)


def test_f32_adam_equals_optax():
    params = _params(jax.random.key(1), SHAPES)
    ours, _, _ = _run(adam(3e-3), params, 4)
    ref, _, _ = _run(optax.adam(3e-3), params, 4)
    for a, b in zip(ours, ref, strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), a, b)


def test_8bit_state_layout():
    params = _params(jax.random.key(0), SHAPES)
    state = adamw(1e-3, state_bits=8).init(params)[0]
    assert isinstance(state.mu["w"], QuantizedMoment) and isinstance(state.nu["w"], QuantizedMoment)
    assert state.mu["w"].q.format.name == "dynamic8s"
    assert state.nu["w"].q.format.name == "dynamic8u"
    for name in ("b", "v"):  # below min_quantized_size: f32
        assert state.mu[name].dtype == jnp.float32 and state.mu[name].shape == SHAPES[name]
    assert state.count.dtype == jnp.int32


def test_8bit_step_is_the_float_step_from_the_dequantized_moments():
    params = _params(jax.random.key(0), SHAPES)
    lr = 1e-2
    _, ref_state, params = _run(optax.adamw(lr), params, 3)
    adam_ref = ref_state[0]
    # The 8-bit state holding optax's moments.
    opt8 = adamw(lr, state_bits=8)
    state8 = opt8.init(params)
    q = lambda m, signed: quantize_state(m, signed=signed) if m.size >= 4096 else m
    mu8 = {k: q(v, True) for k, v in adam_ref.mu.items()}
    nu8 = {k: q(v, False) for k, v in adam_ref.nu.items()}
    state8 = (state8[0]._replace(count=adam_ref.count, mu=mu8, nu=nu8),) + state8[1:]
    deq = lambda m: dequantize_state(m) if isinstance(m, QuantizedMoment) else m
    deq_mu, deq_nu = ({k: deq(v) for k, v in m.items()} for m in (mu8, nu8))
    from_deq = (adam_ref._replace(mu=deq_mu, nu=deq_nu),)
    from_deq += ref_state[1:]

    g = _grads(3)
    u8, new8 = jax.jit(opt8.update)(g, state8, params)
    u_deq, new_deq = optax.adamw(lr).update(g, from_deq, params)
    u32, new32 = optax.adamw(lr).update(g, ref_state, params)
    # Same arithmetic as float Adam on the stored (dequantized) moments.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u8, u_deq)
    # New moments: half a map step of the block absmax from the float moments of this step;
    # from optax's (never quantized) moments, that plus the decayed error of the old ones.
    blockmax = lambda m: np.abs(m.ravel()).reshape(-1, 256).max(axis=1).repeat(256)
    for name, decay in (("mu", 0.9), ("nu", 0.999)):
        a = np.asarray(dequantize_state(getattr(new8[0], name)["w"])).ravel()
        b = np.asarray(getattr(new_deq[0], name)["w"]).ravel()
        c = np.asarray(getattr(new32[0], name)["w"]).ravel()
        old = np.asarray(getattr(adam_ref, name)["w"]).ravel()
        step = 0.9 / 128 * (1 + 1e-4)  # the largest half step of either map (+ f32 slack)
        assert np.all(np.abs(a - b) <= step * blockmax(b))
        assert np.all(np.abs(a - c) <= step * (blockmax(b) + decay * blockmax(old)))
    rel = np.linalg.norm(u8["w"] - u32["w"]) / np.linalg.norm(u32["w"])
    assert rel < 0.05


def test_8bit_adamw_first_steps_track_float():
    params = _params(jax.random.key(2), SHAPES)
    ours, _, _ = _run(adamw(1e-2, state_bits=8), params, 5)
    ref, _, _ = _run(optax.adamw(1e-2), params, 5)
    # Step 1 starts from exact zeros, so it is the float step.
    np.testing.assert_allclose(ours[0]["w"], ref[0]["w"], rtol=1e-6, atol=1e-8)
    for a, b in zip(ours, ref, strict=True):
        rel = np.linalg.norm(a["w"] - b["w"]) / np.linalg.norm(b["w"])
        assert rel < 0.05
        np.testing.assert_allclose(a["b"], b["b"], rtol=1e-5, atol=1e-7)  # f32 leaf


def test_8bit_adamw_converges_like_float_on_least_squares():
    kx, kw, kn = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (256, 64))
    w_true = jax.random.normal(kw, (64, 32))
    y = x @ w_true + 0.1 * jax.random.normal(kn, (256, 32))
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    def train(opt):
        params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
        state = opt.init(params)

        @jax.jit
        def step(params, state):
            g = jax.grad(loss)(params)
            u, state = opt.update(g, state, params)
            return optax.apply_updates(params, u), state

        for _ in range(400):
            params, state = step(params, state)
        return float(loss(params))

    l32 = train(adamw(3e-2, weight_decay=1e-4))
    l8 = train(adamw(3e-2, weight_decay=1e-4, state_bits=8, min_quantized_size=1024))
    start = float(loss({"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}))
    assert l32 < 0.05 * start
    assert abs(l8 - l32) <= 0.03 * l32, (l8, l32)


# ---------------------------------------------------------------- memory, jit, orbax


def test_state_nbytes_8bit_is_about_two_bytes_per_param():
    params = {"w": jnp.zeros((1000, 1000)), "b": jnp.zeros((1000,))}
    opt8 = adamw(1e-3, state_bits=8)
    abstract = jax.eval_shape(opt8.init, params)
    state = opt8.init(params)
    blocks = math.ceil(1_000_000 / 256)
    expected = 2 * (blocks * 256 + blocks * 4) + 2 * 1000 * 4 + 4  # codes+scales, f32 bias, count
    assert state_nbytes(state) == state_nbytes(abstract) == expected
    assert bytes_per_param(state, params) <= 2.05
    state32 = adamw(1e-3).init(params)
    assert state_nbytes(state32) == 2 * 4 * 1_001_000 + 4
    q = quantize_state(jnp.ones((3, 7, 11)), signed=True)
    assert state_nbytes(q) == 256 + 4


def test_update_is_jitted_once():
    params = _params(jax.random.key(0), SHAPES)
    opt = adamw(optax.cosine_decay_schedule(1e-2, 10), state_bits=8)
    traces = []

    @jax.jit
    def update(g, state, params):
        traces.append(1)
        return opt.update(g, state, params)

    state = opt.init(params)
    for t in range(3):
        u, state = update(_grads(t), state, params)
    assert len(traces) == 1
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(u))


def test_orbax_round_trip_of_8bit_state_is_bit_exact(tmp_path):
    params = _params(jax.random.key(0), SHAPES)
    opt = adamw(1e-2, state_bits=8)
    _, state, _ = _run(opt, params, 2)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "opt", state)
    abstract = jax.eval_shape(opt.init, params)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "opt", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored[0].mu["w"], QuantizedMoment)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"state_bits": 2}, "state_bits"),
        ({"state_bits": 16}, "state_bits"),
        ({"state_bits": True}, "state_bits"),
        ({"state_bits": 8, "state_format": "rank1"}, "state_format"),
        ({"state_bits": 4, "state_format": "e4m3"}, "state_format"),
        ({"state_bits": 32, "state_format": "dynamic"}, "state_format"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 64.0}, "block_size"),
        ({"min_quantized_size": -1}, "min_quantized_size"),
    ],
)
@pytest.mark.parametrize("factory", [adam, adamw])
def test_bad_arguments_raise_naming_the_argument(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(1e-3, **kwargs)


def test_quantize_state_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        quantize_state(jnp.ones(4), signed=True, block_size=-2)
