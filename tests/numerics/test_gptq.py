"""GPTQ against an independent float64 numpy implementation; the Babai equivalence and bound."""

import numpy as np
import pytest

import jaxquant.numerics as jn
from jaxquant.numerics import (
    babai_error_bound,
    babai_nearest_plane,
    babai_order,
    gptq,
    layer_error,
    quantize,
)


def _problem(k=48, n=6, seed=0, correlated=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k))
    if correlated:
        x = x @ rng.standard_normal((k, k)) * 0.5 + x  # correlated inputs
    w = rng.standard_normal((k, n)).astype(np.float32)
    return w, (x.T @ x).astype(np.float32)


def _np_gptq(w, h, bits, group, *, sym=True, act_order=False, block=16, damp=0.01):
    """GPTQ as in the reference (W = wᵀ: rows are output channels), float64 numpy, except
    that dead inputs keep their weights (the reference zeroes them)."""
    W = w.T.astype(np.float64).copy()
    H = h.astype(np.float64).copy()
    cols = W.shape[1]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    qmax = 2**bits - 1 if not sym else 2 ** (bits - 1) - 1
    qmin = 0 if not sym else -(2 ** (bits - 1))

    def params(block_w):
        if sym:
            s = np.abs(block_w).max(axis=1) / qmax
            s[s == 0] = 1
            return s, np.zeros_like(s)
        lo = np.minimum(block_w.min(axis=1), 0)
        hi = np.maximum(block_w.max(axis=1), 0)
        s = (hi - lo) / qmax
        s[s == 0] = 1
        return s, np.clip(np.round(-lo / s), 0, qmax)

    def quant(x, s, z):
        q = np.clip(np.round(x / s + z), qmin, qmax)
        return (q - z) * s, q

    g = group or cols
    static = [params(W[:, i : i + g]) for i in range(0, cols, g)]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    H += damp * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    codes = np.zeros(W.shape, np.int64)
    cur = static[0]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1))
        for i in range(i2 - i1):
            col = i1 + i
            if act_order or group is None:
                cur = static[perm[col] // g]
            elif col % g == 0:
                cur = params(W[:, col : col + g])
            Q[:, col], codes[:, col] = quant(W1[:, i], *cur)
            e = (W1[:, i] - Q[:, col]) / U[col, col]
            W1[:, i:] -= np.outer(e, U[col, i1 + i : i2])
            Err1[:, i] = e
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = np.argsort(perm)
    return Q[:, inv].T, codes[:, inv].T


def _codes(q):
    """Signed integer codes of a QArray of an int format."""
    c = np.asarray(jn.unpack(q.codes, q.format.bits, q.shape[-1])).astype(np.int64)
    if q.format.signed:
        c = np.where(c >= 2 ** (q.format.bits - 1), c - 2**q.format.bits, c)
    return c


CASES = [
    ("int4_channel", jn.IntFormat(4), None, True, False),
    ("int3_g16", jn.IntFormat(3), 16, True, False),
    ("uint4_g16_asym", jn.UINT4, 16, False, False),
    ("int4_g16_actorder", jn.IntFormat(4), 16, True, True),
    ("int2_channel_actorder", jn.IntFormat(2), None, True, True),
]


@pytest.mark.parametrize("name,fmt,group,sym,act_order", CASES, ids=[c[0] for c in CASES])
def test_gptq_codes_equal_a_numpy_reference(name, fmt, group, sym, act_order):
    w, h = _problem(seed=len(name))
    h[5, :] = h[:, 5] = 0  # a dead input
    bits = fmt.bits
    scaling = jn.Scaling(axis=0, group_size=group, zero_point=not sym)
    quantizer = jn.ScalarQuantizer(fmt, scaling)
    with pytest.warns(UserWarning, match=r"1 of 48 inputs are dead .*inputs 5\); their weights"):
        q = gptq(w, h, quantizer, order="act" if act_order else None, lazy_batch=16)
    ref_deq, ref_codes = _np_gptq(w, h, bits, group, sym=sym, act_order=act_order)
    codes = _codes(q) if sym else np.asarray(jn.unpack(q.codes, bits, q.shape[-1]))
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_allclose(np.asarray(q.dequantize())[:, :], ref_deq, atol=1e-4)
    # the dead input's weights are kept (the reference GPTQ would zero them)
    assert np.count_nonzero(np.asarray(q.dequantize())[5]) >= w.shape[1] // 2


@pytest.mark.parametrize("lazy_batch", [32, 20, 7])
def test_a_lazy_batch_that_does_not_divide_in_features_gives_the_same_codes(lazy_batch):
    """Rows are padded to whole batches; padding must not touch real rows or group scales."""
    w, h = _problem(k=48, n=6, seed=7)
    fmt = jn.ScalarQuantizer(jn.IntFormat(3), jn.Scaling(axis=0, group_size=16))
    q = gptq(w, h, fmt, lazy_batch=lazy_batch)
    ref_deq, ref_codes = _np_gptq(w, h, 3, 16, block=lazy_batch)
    np.testing.assert_array_equal(_codes(q), ref_codes)
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref_deq, atol=1e-4)


@pytest.mark.parametrize(
    "preset", [jn.INT4_G128, jn.MXFP4, jn.NVFP4, jn.NF4, jn.INT3_G128], ids=str
)
def test_gptq_beats_rtn_on_correlated_inputs_for_every_format(preset):
    w, h = _problem(k=128, n=16, seed=3)
    g = {"mxfp4": 32, "nvfp4": 16, "nf4": 64}.get(preset.name, 32)
    preset = preset.with_group_size(g)
    e_gptq = float(layer_error(w, gptq(w, h, preset, lazy_batch=32), h))
    e_rtn = float(layer_error(w, quantize(w, preset), h))
    # quantize with a Hessian runs the same GPTQ (default lazy batch of 128 rows)
    e_quantize = float(layer_error(w, quantize(w, preset, hessian=h), h))
    assert e_quantize == float(layer_error(w, gptq(w, h, preset), h))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_gptq_back_to_front_equals_babai_nearest_plane():
    fmt = jn.ScalarQuantizer(jn.IntFormat(4), jn.Scaling(axis=0))
    same = total = 0
    for seed in range(4):
        w, h = _problem(k=40, n=6, seed=10 + seed)
        back_to_front = gptq(w, h, fmt, order=np.arange(40)[::-1], lazy_batch=8)
        babai = babai_nearest_plane(w, h, fmt)  # the same per-channel scales, from w
        np.testing.assert_array_equal(back_to_front.scale, babai.scale)
        same += int((_codes(back_to_front) == _codes(babai)).sum())
        total += w.size
    assert same == total, f"{total - same} of {total} codes differ"


def test_babai_error_is_within_its_bound_when_nothing_clips():
    w, h = _problem(k=40, n=6, seed=20)
    fmt = jn.ScalarQuantizer(jn.IntFormat(6), jn.Scaling(axis=0))
    wide = 4 * w  # scales from 4x the weights: no value reaches the ends of the grid
    q = babai_nearest_plane(w, h, fmt, scale_from=wide)
    s = np.abs(wide).max(0, keepdims=True) / 31
    np.testing.assert_allclose(np.asarray(q.scale), s, rtol=1e-6)
    assert np.abs(_codes(q)).max() < 31
    err = np.asarray(w, np.float64) - np.asarray(q.dequantize(), np.float64)
    h_damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(40)
    per_channel = np.einsum("kn,kj,jn->n", err, h_damped.astype(np.float64), err)
    bound = np.asarray(babai_error_bound(h, s))
    assert np.all(per_channel <= bound[0] * (1 + 1e-4))
    assert np.all(per_channel > 0.05 * bound[0])  # the bound is not vacuous here


BAD = [
    (lambda w, h: gptq(w, h[:-1], jn.INT4), "hessian: expected shape"),
    (lambda w, h: gptq(w, h * np.nan, jn.INT4), "NaN"),
    (lambda w, h: gptq(w[None], h, jn.INT4), "w: expected"),
    (lambda w, h: gptq(w, h, jn.INT4, order="zigzag"), "order='zigzag'"),
    (lambda w, h: gptq(w, h, jn.INT4, lazy_batch=0), "lazy_batch=0"),
    (lambda w, h: gptq(w, h, jn.INT4_G128), "group_size=128 does not divide"),
    (lambda w, h: gptq(w, h, jn.FP4_AFPQ_G128.with_group_size(16)), "split-sign"),
    (lambda w, h: gptq(w, -np.eye(48, dtype=np.float32) * 1e3, jn.INT4), "not positive definite"),
    (lambda w, h: gptq(w, h, jn.INT4, order=np.zeros(48, int)), "permutation"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[b[1] for b in BAD])
def test_bad_input_raises(call, match):
    w, h = _problem()
    with pytest.raises(ValueError, match=match):
        call(w, h)


def test_gptq_takes_only_scalar_quantizers():
    w, h = _problem()
    with pytest.raises(TypeError, match="ScalarQuantizer"):
        gptq(w, h, "int4")


def _scaled_problem(seed, k=96, n=16):
    """Correlated inputs whose features differ in scale (as activations do)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k)) * np.exp(rng.normal(0, 1, k))
    x = x @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    return rng.standard_normal((k, n)).astype(np.float32), (x.T @ x).astype(np.float32)


def test_babai_order_lowers_the_bound_and_the_error_below_act_order():
    fmt = jn.ScalarQuantizer(jn.IntFormat(3), jn.Scaling(axis=0))
    for seed in range(3):
        w, h = _scaled_problem(seed)
        hd = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(96)
        order = babai_order(hd)
        assert sorted(order.tolist()) == list(range(96))

        def bound_sum(gptq_order, hd=hd):
            basis = np.asarray(gptq_order)[::-1]  # Babai's basis: GPTQ's order reversed
            return np.sum(np.diag(np.linalg.cholesky(hd[np.ix_(basis, basis)])) ** 2)

        act = np.argsort(-np.diag(hd), kind="stable")
        assert bound_sum(order) < bound_sum(act) < bound_sum(np.arange(96))
        e_babai = float(layer_error(w, gptq(w, h, fmt, order="babai", lazy_batch=32), h))
        e_act = float(layer_error(w, gptq(w, h, fmt, order="act", lazy_batch=32), h))
        assert e_babai < e_act, (seed, e_babai, e_act)
