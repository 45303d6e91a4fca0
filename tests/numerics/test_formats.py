"""Element formats against independent references: ml_dtypes, numpy, and the QLoRA NF4 table."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxquant.numerics import formats as F

FLOAT_FORMATS = [
    (F.E4M3, ml_dtypes.float8_e4m3fn, 448.0),
    (F.E5M2, ml_dtypes.float8_e5m2, 57344.0),
    (F.E3M2, ml_dtypes.float6_e3m2fn, 28.0),
    (F.E2M3, ml_dtypes.float6_e2m3fn, 7.5),
    (F.E2M1, ml_dtypes.float4_e2m1fn, 6.0),
]
FLOAT_IDS = [f.name for f, _, _ in FLOAT_FORMATS]


@pytest.mark.parametrize("fmt,dtype,max_value", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_float_grid_and_max_match_ml_dtypes(fmt, dtype, max_value):
    assert fmt.max_value == max_value == float(ml_dtypes.finfo(dtype).max)
    assert fmt.min_value == -max_value
    if fmt.bits == 8:  # every bit pattern, NaN/inf positions included
        ref = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float64)
        np.testing.assert_array_equal(fmt.table(), ref)
    else:
        # every grid value survives the ml_dtypes cast unchanged, and the grid is the right size
        assert np.array_equal(fmt.grid.astype(dtype).astype(np.float64), fmt.grid)
        assert fmt.grid.size == 2**fmt.bits - 1  # +0 and -0 fold into one value
    tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
    assert fmt.grid[fmt.grid > 0].min() == tiny


@pytest.mark.parametrize("fmt,dtype,max_value", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_float_round_is_bit_exact_with_ml_dtypes_on_all_values_and_midpoints(fmt, dtype, max_value):
    del max_value
    g = fmt.grid
    mids = (g[1:] + g[:-1]) / 2
    eps = np.diff(g) * 1e-3
    xs = np.concatenate([g, mids, mids + eps, mids - eps, -mids]).astype(np.float32)
    ours = np.asarray(fmt.round(jnp.asarray(xs)))
    theirs = xs.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(theirs))  # -0 as ml_dtypes
    if fmt.bits == 8:
        codes = np.asarray(fmt.quantize_values(jnp.asarray(xs)))
        np.testing.assert_array_equal(codes, xs.astype(dtype).view(np.uint8))
    # codes decode back to the rounded values
    decoded = np.asarray(fmt.decode(fmt.quantize_values(jnp.asarray(xs))))
    np.testing.assert_array_equal(decoded, ours)


@pytest.mark.parametrize("fmt,dtype,max_value", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_float_round_saturates_instead_of_overflowing(fmt, dtype, max_value):
    del dtype
    xs = jnp.array([max_value * 1.01, max_value * 1e3, 3e38, -3e38, -max_value * 1.5])
    np.testing.assert_array_equal(
        np.asarray(fmt.round(xs)), [max_value, max_value, max_value, -max_value, -max_value]
    )


def test_float_random_inputs_match_ml_dtypes():
    rng = np.random.default_rng(0)
    for fmt, dtype, max_value in FLOAT_FORMATS:
        x = rng.standard_normal(20000) * max_value / 3 * np.exp(rng.uniform(-8, 0, 20000))
        x = np.clip(x, -max_value, max_value).astype(np.float32)
        np.testing.assert_array_equal(
            np.asarray(fmt.round(jnp.asarray(x))), x.astype(dtype).astype(np.float32)
        )


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_int_round_and_codes_match_numpy(bits, signed):
    fmt = F.IntFormat(bits, signed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    rng = np.random.default_rng(bits)
    y = np.concatenate(
        [rng.uniform(lo - 3, hi + 3, 5000), np.arange(lo, hi + 1) + 0.5, np.arange(lo, hi + 1)]
    ).astype(np.float32)
    ref = np.clip(np.round(y), lo, hi)  # numpy rounds half to even
    np.testing.assert_array_equal(np.asarray(fmt.round(jnp.asarray(y))), ref)
    codes = np.asarray(fmt.quantize_values(jnp.asarray(y))).astype(np.int64)
    ref_codes = np.where(ref < 0, ref + 2**bits, ref).astype(np.int64)  # two's complement
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(np.asarray(fmt.decode(jnp.asarray(codes))), ref)
    assert fmt.max_value == hi and fmt.min_value == lo


def test_nf4_construction_reproduces_the_published_table():
    built = np.array(F.LookupFormat.normal_float(4).values)
    np.testing.assert_allclose(built, F.NF4_VALUES, atol=2e-7)
    assert F.NF4.bits == 4 and F.NF4.values == F.NF4_VALUES
    assert 0.0 in F.NF4.values


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_normal_float_other_widths_are_zero_exact_and_normalized(bits):
    fmt = F.LookupFormat.normal_float(bits)
    v = np.array(fmt.values)
    assert len(v) == 2**bits and 0.0 in v and v.max() == 1.0 and v.min() == -1.0


def _nearest_ref(grid, y):
    """Index of the nearest grid value; ties to the lower index (float64 numpy)."""
    return np.argmin(np.abs(grid[None, :] - y[:, None].astype(np.float64)), axis=1)


@pytest.mark.parametrize("fmt", [F.NF4, F.LookupFormat([-3.0, -0.5, 0.0, 0.25, 7.0])])
def test_lookup_nearest_matches_argmin_reference(fmt):
    rng = np.random.default_rng(1)
    grid = np.array(fmt.values)
    y = rng.uniform(grid[0] - 1, grid[-1] + 1, 30001).astype(np.float32)
    codes = np.asarray(fmt.quantize_values(jnp.asarray(y)))
    np.testing.assert_array_equal(codes, _nearest_ref(grid, y))
    np.testing.assert_array_equal(
        np.asarray(fmt.round(jnp.asarray(y))), grid.astype(np.float32)[codes]
    )


def test_quantile_codebook_sits_at_data_quantiles():
    rng = np.random.default_rng(2)
    x = rng.standard_t(df=4, size=50000)
    fmt = F.LookupFormat.from_quantiles(x, 3)
    q = np.quantile(x, (np.arange(8) + 0.5) / 8)
    np.testing.assert_allclose(np.array(fmt.values), q / np.abs(q).max(), rtol=1e-12)
    assert fmt.bits == 3
    # about 1/8 of normalized data rounds to each code
    codes = np.asarray(fmt.quantize_values(jnp.asarray(x / np.abs(q).max(), jnp.float32)))
    counts = np.bincount(codes, minlength=8) / x.size
    assert np.all(np.abs(counts - 1 / 8) < 0.03)


ALL_FORMATS = [F.INT2, F.INT4, F.INT8, F.UINT4, F.E4M3, F.E5M2, F.E3M2, F.E2M3, F.E2M1, F.NF4]


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_stochastic_rounding_is_unbiased(fmt):
    g = fmt.grid.astype(np.float32).astype(np.float64)  # the values as f32 computes them
    rng = np.random.default_rng(3)
    # 40 points strictly inside the grid, each rounded 20000 times with independent noise
    pts = rng.uniform(g[0], g[-1], 40).astype(np.float32)
    n = 20000
    y = jnp.asarray(np.repeat(pts, n))
    r = np.asarray(fmt.round(y, "stochastic", jax.random.key(7))).reshape(40, n)
    idx = np.clip(np.searchsorted(g, pts, side="right") - 1, 0, g.size - 2)
    lo, hi = g[idx], g[idx + 1]
    assert np.all((r >= lo[:, None]) & (r <= hi[:, None])), "rounded outside the neighbours"
    p = (pts - lo) / (hi - lo)
    std_of_mean = (hi - lo) * np.sqrt(p * (1 - p) / n)
    err = r.mean(axis=1) - pts
    assert np.all(np.abs(err) <= 5 * std_of_mean + 1e-6 * (hi - lo)), err / (std_of_mean + 1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: F.IntFormat(1),
        lambda: F.IntFormat(9),
        lambda: F.IntFormat(4.0),
        lambda: F.FloatFormat(0, 3),
        lambda: F.FloatFormat(4, 4),
        lambda: F.FloatFormat(4, 3, special="weird"),
        lambda: F.LookupFormat([1.0]),
        lambda: F.LookupFormat([0.0, 1.0, 0.5]),
        lambda: F.LookupFormat([0.0, np.nan]),
        lambda: F.LookupFormat.normal_float(9),
        lambda: F.LookupFormat.from_quantiles(np.ones(10), 2),
    ],
)
def test_bad_format_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_rounding_arguments_are_checked():
    with pytest.raises(ValueError, match="needs a PRNG key"):
        F.INT4.round(jnp.ones(3), "stochastic")
    with pytest.raises(ValueError, match="rounding='up'"):
        F.E2M1.round(jnp.ones(3), "up")


def test_formats_are_hashable_static_values():
    assert F.IntFormat(4) == F.INT4 and hash(F.IntFormat(4)) == hash(F.INT4)
    assert len({F.E4M3, F.FloatFormat(4, 3, special="fn"), F.E5M2}) == 2
    f = jax.jit(lambda x, fmt: fmt.round(x), static_argnums=1)
    np.testing.assert_array_equal(f(jnp.array([0.3, 2.6]), F.INT4), [0.0, 3.0])
