"""quantize / QArray.dequantize against a slow numpy reference written from the equations."""

import dataclasses
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxquant.numerics as jn
from jaxquant.numerics import formats as F
from jaxquant.numerics.scaling import Scaling


def sq(fmt, scaling=None, **kw):
    """The scalar quantizer of an element format and a scaling (default: per tensor)."""
    return jn.ScalarQuantizer(fmt, Scaling() if scaling is None else scaling, **kw)


def _blocks(x: np.ndarray, scaling: Scaling):
    """x as [rows, blocks_per_row, block_size], plus the inverse map back to x's shape."""
    nd = x.ndim
    if scaling.axis is None:
        return x.reshape(1, 1, -1), lambda b: b.reshape(x.shape)
    axes = scaling.axis if isinstance(scaling.axis, tuple) else (scaling.axis,)
    axes = sorted(a % nd for a in axes)
    others = [a for a in range(nd) if a not in axes]
    perm = others + axes
    moved = np.transpose(x, perm)
    size = math.prod(x.shape[a] for a in axes)
    g = scaling.group_size or size
    blocks = moved.reshape(-1, size // g, g)
    inv = np.argsort(perm)
    return blocks, lambda b: np.transpose(b.reshape(moved.shape), inv)


def _cast_scale(extent, grid_extent, fmt, scaling):
    """Stored-dtype rounding of ``extent / grid_extent``, from ml_dtypes and numpy (not the
    library); E8M0 per OCP MX: 2**(floor(log2(amax)) - floor(log2(max)))."""
    if scaling.scale_dtype == "e8m0":
        with np.errstate(divide="ignore"):  # log2(0) of all-zero blocks, replaced below
            e = np.floor(np.log2(extent.astype(np.float64))) - np.floor(np.log2(grid_extent))
        return np.where(extent > 0, np.exp2(e), 1.0).astype(np.float32)
    s = (extent / np.float32(grid_extent)).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1))
    if scaling.scale_dtype == "float32":
        return s
    if scaling.scale_dtype == "bfloat16":
        return s.astype(ml_dtypes.bfloat16).astype(np.float32)
    return np.maximum(s.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), 2.0**-9)


def reference_qdq(x: np.ndarray, fmt, scaling: Scaling) -> np.ndarray:
    """Absmax quantize-dequantize, nearest rounding by argmin over the grid, in numpy."""
    x = x.astype(np.float32)
    b, back = _blocks(x, scaling)
    grid = fmt.grid.astype(np.float32)
    qmax, qmin = np.float32(fmt.max_value), np.float32(fmt.min_value)
    lo = np.minimum(b.min(-1, keepdims=True), 0)
    hi = np.maximum(b.max(-1, keepdims=True), 0)
    if scaling.zero_point:
        extent, grid_extent = hi - lo, qmax - qmin
    elif scaling.split_sign:
        extent, grid_extent = np.stack([-lo, hi]), np.array([-qmin, qmax]).reshape(2, 1, 1, 1)
    else:
        extent, grid_extent = np.maximum(-lo, hi), qmax
    t = np.float32(1)
    if scaling.tensor_scale:
        t = (extent / grid_extent).max() / np.float32({"e4m3": 448.0}.get(scaling.scale_dtype, 1.0))
        t = t if t > 0 else np.float32(1)
    if isinstance(grid_extent, np.ndarray):  # split sign: one cast per half
        s = np.stack([_cast_scale(extent[i] / t, grid_extent[i], fmt, scaling) for i in (0, 1)])
    else:
        s = _cast_scale(extent / t, grid_extent, fmt, scaling)
    s = s * t
    if scaling.zero_point:
        z = np.clip(np.round(-lo / s), qmin, qmax)
        y = b / s + z
    elif scaling.split_sign:
        y = b / np.where(b < 0, s[0], s[1])
    else:
        y = b / s
    v = grid[np.argmin(np.abs(grid[None, :] - y.reshape(-1, 1)), axis=1)].reshape(y.shape)
    if scaling.zero_point:
        out = (v - z) * s
    elif scaling.split_sign:
        out = v * np.where(v < 0, s[0], s[1])
    else:
        out = v * s
    # elements whose y sits within a hair of a rounding midpoint may differ by one tie rule
    mids = (grid[1:] + grid[:-1]) / 2
    dist = np.abs(y.reshape(-1, 1) - mids[None, :])
    nearest = np.argmin(dist, axis=1)
    gap = (grid[1:] - grid[:-1])[nearest]
    near_tie = (dist[np.arange(dist.shape[0]), nearest] < 1e-4 * gap).reshape(y.shape)
    return back(out), back(near_tie)


CASES = [
    ("int4_tensor", F.INT4, Scaling()),
    ("int8_channel0", F.INT8, Scaling(axis=0)),
    ("int4_channel1", F.INT4, Scaling(axis=1)),
    ("int3_axes02", F.INT3, Scaling(axis=(0, 2))),
    ("int4_g32_axis0", F.INT4, Scaling(axis=0, group_size=32)),
    ("int2_g16_last", F.INT2, Scaling(axis=-1, group_size=16)),
    ("uint4_g32_zero", F.UINT4, Scaling(axis=0, group_size=32, zero_point=True)),
    ("e2m1_g32_e8m0", F.E2M1, Scaling(axis=0, group_size=32, scale_dtype="e8m0")),
    ("e4m3_g32_e8m0", F.E4M3, Scaling(axis=0, group_size=32, scale_dtype="e8m0")),
    (
        "e2m1_g16_nvfp4",
        F.E2M1,
        Scaling(axis=0, group_size=16, scale_dtype="e4m3", tensor_scale=True),
    ),
    ("nf4_g64_bf16", F.NF4, Scaling(axis=0, group_size=64, scale_dtype="bfloat16")),
    ("e2m1_g32_split", F.E2M1, Scaling(axis=0, group_size=32, split_sign=True)),
    ("e3m2_channel_split", F.E3M2, Scaling(axis=1, split_sign=True)),
    ("e5m2_tensor", F.E5M2, Scaling()),
]


@pytest.mark.parametrize("name,fmt,scaling", CASES, ids=[c[0] for c in CASES])
def test_quantize_matches_numpy_reference(name, fmt, scaling):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    shape = (64, 48, 3) if name == "int3_axes02" else (128, 48)
    # heavy-tailed, with an all-zero column and one block of tiny values
    x = (rng.standard_t(5, shape) * np.exp(rng.uniform(-3, 3, shape[-1:]))).astype(np.float32)
    x[:, 1] = 0
    x[:32, 2] *= 1e-30
    q = jn.quantize(jnp.asarray(x), sq(fmt, scaling))
    ref, near_tie = reference_qdq(x, fmt, scaling)
    got = np.asarray(q.dequantize())
    assert got.shape == x.shape and got.dtype == x.dtype
    ok = ~near_tie
    assert ok.mean() > 0.99
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-6, atol=0)
    assert np.all(got[:, 1] == 0)


@pytest.mark.parametrize("name,fmt,scaling", CASES, ids=[c[0] for c in CASES])
def test_qarray_layout_and_bits_per_weight_are_exact(name, fmt, scaling):
    shape = (64, 48, 3) if name == "int3_axes02" else (128, 48)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.bfloat16)
    q = jn.quantize(x, sq(fmt, scaling))
    assert q.codes.dtype == jnp.uint8
    assert q.codes.shape == shape[:-1] + (jn.packed_length(shape[-1], fmt.bits),)
    scale_shape = ((2,) if scaling.split_sign else ()) + scaling.scale_shape(shape)
    assert q.scale.shape == scale_shape and q.scale.dtype == scaling.stored_dtype
    assert (q.zero is not None) == scaling.zero_point
    assert (q.tensor_scale is not None) == scaling.tensor_scale
    n = math.prod(shape)
    expected = (
        q.codes.size
        + q.scale.size * np.dtype(scaling.stored_dtype).itemsize
        + (q.zero.size if q.zero is not None else 0)
        + (4 if q.tensor_scale is not None else 0)
    )
    assert q.nbytes == expected
    assert q.bits_per_weight == pytest.approx(8 * expected / n)
    assert q.dequantize().dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "preset,bpw",
    [
        (jn.INT8, 8 + 32 / 4096),
        (jn.INT4_G128, 4.25),
        (jn.INT4_G128_ASYM, 4 + 40 / 128),
        (jn.MXFP4, 4.25),
        (jn.MXFP6, 6.25),
        (jn.MXFP8, 8.25),
        (jn.NVFP4, 4.5 + 32 / 4096 / 256),
        (jn.NF4, 4.5),
        (jn.FP8_E4M3, 8 + 32 / 4096 / 256),
    ],
    ids=str,
)
def test_preset_bits_per_weight_count_every_overhead(preset, bpw):
    q = jn.quantize(jnp.ones((4096, 256)), preset)
    assert q.bits_per_weight == pytest.approx(bpw, rel=1e-9)


# Pinned MSE on numpy's N(0, 1) sample (PCG64, seed 0, shape [4096, 256]): a change here is a
# change of numerics, to be explained in the commit that makes it.
GOLDEN_MSE = {
    "int8": 7.5820e-05,
    # int7 .. int2 per channel: equal (to 2e-7) to numpy's round(x / s) * s, s = max|x| / qmax
    "int7": 3.0825e-04,
    "int6": 1.2739e-03,
    "int5": 5.4382e-03,
    "int4": 2.4950e-02,
    "int3": 1.3586e-01,
    "int2": 8.2941e-01,
    "int4_g128": 1.3822e-02,
    "int4_asym_g128": 1.0117e-02,
    "int3_g128": 7.5285e-02,
    "int2_g128": 5.8974e-01,
    "fp8_e4m3": 7.0233e-04,
    "fp8_e5m2": 2.7772e-03,
    "mxfp8": 8.6203e-04,
    "mxfp8_e5m2": 2.9177e-03,
    "mxfp6": 8.0571e-04,
    "mxfp6_e3m2": 2.9178e-03,
    "mxfp4": 1.3229e-02,
    "nvfp4": 9.0678e-03,
    "nf4": 8.4794e-03,
    "fp4_afpq_g128": 1.1208e-02,
}


@pytest.fixture(scope="module")
def gaussian():
    return jnp.asarray(np.random.default_rng(0).standard_normal((4096, 256)), jnp.float32)


def test_golden_mse_covers_every_preset():
    assert set(GOLDEN_MSE) == set(jn.PRESETS)


@pytest.mark.parametrize("name", sorted(GOLDEN_MSE))
def test_golden_mse_per_preset(name, gaussian):
    q = jn.quantize(gaussian, jn.PRESETS[name])
    mse = float(jnp.mean(jnp.square(q.dequantize() - gaussian)))
    assert mse == pytest.approx(GOLDEN_MSE[name], rel=2e-3)


@pytest.mark.parametrize(
    "fmt", [F.INT2, F.INT4, F.INT8, F.E4M3, F.E5M2, F.E3M2, F.E2M3, F.E2M1, F.NF4]
)
def test_values_the_format_represents_round_trip_exactly(fmt):
    grid = fmt.grid.astype(np.float32)
    if isinstance(fmt, F.IntFormat):
        grid = grid[grid >= -fmt.max_value]  # -2**(b-1) is outside the symmetric absmax range
    x = np.concatenate([grid * 2.0**-3, grid * 2.0**5]).reshape(2, -1).astype(np.float32)
    q = jn.quantize(jnp.asarray(x), sq(fmt, Scaling(axis=1)))
    np.testing.assert_array_equal(np.asarray(q.dequantize()), x)


@st.composite
def _array_and_scaling(draw):
    shape = draw(st.sampled_from([(64, 8), (32, 3, 4), (128,)]))
    fmt = draw(st.sampled_from([F.INT2, F.INT3, F.INT4, F.INT8, F.E2M1, F.E4M3, F.NF4]))
    scaling = draw(
        st.sampled_from(
            [
                Scaling(),
                Scaling(axis=0),
                Scaling(axis=0, group_size=16),
                Scaling(axis=-1),
                Scaling(axis=0, group_size=32, scale_dtype="bfloat16"),
            ]
        )
    )
    elems = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
    x = draw(hnp.arrays(np.float32, shape, elements=elems))
    return x, fmt, scaling


@settings(max_examples=60, deadline=None)
@given(_array_and_scaling())
def test_error_is_within_half_a_step_of_each_block_scale(case):
    x, fmt, scaling = case
    q = jn.quantize(jnp.asarray(x), sq(fmt, scaling))
    deq = np.asarray(q.dequantize(), np.float64)
    view, red = scaling.block_view(x.shape)
    s = np.asarray(q.scale.astype(jnp.float32), np.float64).reshape(
        tuple(1 if i in red else d for i, d in enumerate(view))
    )
    y = (x.astype(np.float64).reshape(view) / s).reshape(x.shape)
    grid = fmt.grid
    # half of the gap between the two grid values around y, in units of the block scale
    idx = np.clip(np.searchsorted(grid, y, side="right") - 1, 0, grid.size - 2)
    half_gap = (grid[idx + 1] - grid[idx]) / 2
    s_full = np.broadcast_to(s, view).reshape(x.shape)
    err = np.abs(deq - x)
    bound = half_gap * s_full * (1 + 1e-5) + 1e-30
    slack = 1e-5 * max(-grid[0], grid[-1])  # f32 scales put the block max a hair outside
    inside = (y >= grid[0] - slack) & (y <= grid[-1] + slack)
    assert np.all(err[inside] <= bound[inside])
    if scaling.scale_dtype == "float32":
        assert inside.all()  # absmax with an exact scale clips nothing
    if isinstance(fmt, F.IntFormat):
        assert np.all(err <= 0.5 * s_full * (1 + 1e-5) + 1e-30)


def test_stochastic_quantize_is_unbiased_and_needs_a_key():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((128, 64)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 400)
    deq = jax.vmap(
        lambda k: jn.quantize(
            x, sq(jn.INT4_G128.format, jn.INT4_G128.scaling, rounding="stochastic"), key=k
        ).dequantize()
    )(keys)
    s = np.asarray(jn.quantize(x, jn.INT4_G128).scale)
    bias = np.asarray(deq.mean(0) - x)
    # per element, the mean of 400 draws has std <= s/2/sqrt(400) = s/40
    assert np.all(np.abs(bias) <= 5 * np.broadcast_to(s, x.shape) / 40)
    with pytest.raises(ValueError, match="PRNG key"):
        jn.quantize(x, dataclasses.replace(jn.INT4, rounding="stochastic"))


def test_mse_and_percentile_calibration_lower_the_error_on_heavy_tails():
    x = jnp.asarray(np.random.default_rng(6).standard_t(3, (1024, 64)), jnp.float32)

    def err(cal):
        return float(
            jnp.mean(
                jnp.square(
                    jn.quantize(x, dataclasses.replace(jn.INT3_G128, calibration=cal)).dequantize()
                    - x
                )
            )
        )

    absmax, mse = err("absmax"), err("mse")
    pct = err(jn.Calibration(method="percentile", percentile=99.0))
    assert mse < 0.8 * absmax and pct < absmax
    # the searched ratio is optimal among its grid: no single grid ratio does better per block
    q_mse = jn.quantize(x, dataclasses.replace(jn.INT3_G128, calibration="mse")).dequantize()
    for r in jn.Calibration(method="mse").ratios[::7]:
        from jaxquant.numerics import calibration as C

        view, red = jn.INT3_G128.scaling.block_view(x.shape)
        xv = x.reshape(view)
        lo, hi = C.block_range(xv, red, jn.INT3_G128.scaling, C.Calibration())
        deq, _ = C.qdq_view(xv, lo * r, hi * r, jn.INT3_G128.format, jn.INT3_G128.scaling)
        e_r = jnp.sum(jnp.square(deq - xv), axis=red)
        e_best = jnp.sum(jnp.square(q_mse.reshape(view) - xv), axis=red)
        assert bool(jnp.all(e_best <= e_r * (1 + 1e-6)))


BAD_INPUTS = [
    (
        lambda: jn.quantize(jnp.ones((100, 8)), jn.INT4_G128),
        ValueError,
        "group_size=128 does not divide",
    ),
    (lambda: jn.quantize(jnp.array([1.0, jnp.nan]), jn.INT8), ValueError, "NaN/Inf"),
    (lambda: jn.quantize(jnp.array([1.0, jnp.inf]), jn.INT8), ValueError, "NaN/Inf"),
    (lambda: jn.quantize(jnp.arange(4), jn.INT8), TypeError, "floating-point"),
    (lambda: jn.quantize(jnp.float32(1.0), F.INT8), ValueError, "scalar"),
    (lambda: jn.quantize(jnp.ones(4), 4), TypeError, "expected a Quantizer"),
    (lambda: jn.quantize(jnp.ones(4), "int5_g7x"), ValueError, "g7x"),
    (
        lambda: jn.quantize(jnp.ones((4, 4)), sq(F.INT4, Scaling(axis=2))),
        ValueError,
        "out of range",
    ),
    (lambda: jn.quantize(jnp.ones((4, 4)), jn.INT8, axis=3), ValueError, "out of range"),
    (lambda: sq(F.INT4, calibration="minmax"), ValueError, "minmax"),
    (lambda: sq(F.INT4, Scaling(zero_point=True)), ValueError, "unsigned integer"),
    (lambda: jn.quantize(jnp.ones(4), F.UINT4), ValueError, "unsigned"),
    (lambda: sq(F.UINT4, Scaling(split_sign=True)), ValueError, "signed format"),
    (lambda: sq(F.INT4, rounding="floor"), ValueError, "rounding='floor'"),
    (lambda: sq(F.INT4, qat="pact"), ValueError, "qat='pact'"),
    (lambda: sq(F.INT4, Scaling(axis=0, zero_point=True)), ValueError, "unsigned integer"),
    (lambda: sq(F.UINT4, Scaling(axis=0, zero_point=True), qat="lsq"), ValueError, "qat='lsq'"),
    (lambda: sq("int4"), TypeError, "element Format"),
    (lambda: Scaling(axis=0, scale_dtype="e4m3"), ValueError, "tensor_scale=True"),
    (lambda: Scaling(axis=0, scale_dtype="fp16"), ValueError, "scale_dtype='fp16'"),
    (lambda: Scaling(axis=(0, 1), group_size=32), ValueError, "single int axis"),
    (lambda: Scaling(axis=0, group_size=0), ValueError, "group_size=0"),
    (lambda: Scaling(tensor_scale=True), ValueError, "per-channel or per-group"),
    (lambda: Scaling(zero_point=True, split_sign=True), ValueError, "cannot be combined"),
    (lambda: jn.Calibration(method="mse", num_ratios=0), ValueError, "num_ratios"),
    (lambda: jn.Calibration(method="percentile", percentile=20), ValueError, "percentile=20"),
    (lambda: jn.get_quantizer("int9"), ValueError, "int9"),
    (lambda: jn.get_quantizer("int4_bogus"), ValueError, "bogus"),
]


@pytest.mark.parametrize("call,exc,match", BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_presets_regroup_and_retarget():
    p = jn.INT4_G128.with_group_size(64)
    assert p.scaling.group_size == 64 and p.format == jn.INT4_G128.format
    assert p.name == "int4_g64" and jn.get_quantizer("int4_g64") == p
    q = jn.quantize(jnp.ones((8, 256)), jn.MXFP4.on_axis(-1))
    assert q.scale.shape == (8, 8)
    assert jn.quantize(jnp.ones((8, 256)), jn.MXFP4, axis=-1).scale.shape == (8, 8)
    assert jn.get_quantizer("mxfp4") == jn.MXFP4


def test_quantize_with_a_given_scale_uses_it_exactly():
    x = jnp.asarray(np.random.default_rng(9).standard_normal((64, 8)), jnp.float32)
    s = jnp.asarray(np.random.default_rng(10).uniform(0.05, 0.5, (1, 8)), jnp.float32)
    q = jn.quantize(x, sq(F.INT4, Scaling(axis=0)), learned={"scale": s})
    np.testing.assert_array_equal(q.scale, s)
    ref = np.clip(np.round(np.asarray(x) / np.asarray(s)), -8, 7) * np.asarray(s)
    np.testing.assert_allclose(q.dequantize(), ref, rtol=1e-6)
    np.testing.assert_array_equal(
        q.dequantize(), jn.fake_quant(x, sq(F.INT4, Scaling(axis=0)), learned={"scale": s})
    )
    with pytest.raises(ValueError, match=r"expected shape \(1, 8\)"):
        jn.quantize(x, sq(F.INT4, Scaling(axis=0)), learned={"scale": s[0]})
    with pytest.raises(ValueError, match="symmetric"):
        jn.quantize(x, sq(F.UINT4, Scaling(axis=0, zero_point=True)), learned={"scale": s})
    with pytest.raises(ValueError, match="float32"):
        jn.quantize(x, sq(F.E2M1, Scaling(axis=0, scale_dtype="bfloat16")), learned={"scale": s})
    with pytest.raises(ValueError, match="learns 'scale'"):
        jn.quantize(x, sq(F.INT4, Scaling(axis=0)), learned={"codebook": s})
