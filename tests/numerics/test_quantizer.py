"""The Quantizer protocol for scalar formats: the name registry, shapes, GPTQ at every
granularity and axis, the matmul, damping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.numerics as jn
from jaxquant.numerics import formats as F
from jaxquant.numerics.scaling import Scaling


@pytest.mark.parametrize("name", sorted(jn.PRESETS))
def test_every_preset_name_parses_back_to_the_preset(name):
    preset = jn.PRESETS[name]
    assert preset.name == name
    assert jn.get_quantizer(name) == preset
    assert jn.get_quantizer(name.upper()) == preset  # case-insensitive


ROUND_TRIPS = [
    jn.ScalarQuantizer(F.INT8),  # one scale per tensor
    jn.ScalarQuantizer(F.INT3, Scaling(axis=0)),
    jn.INT4.with_group_size(64),
    jn.INT4_G128.with_group_size(None),
    jn.ScalarQuantizer(F.UINT8, Scaling(axis=0, group_size=32, zero_point=True)),
    jn.ScalarQuantizer(F.E2M1, Scaling(axis=0, group_size=64, split_sign=True)),
    jn.ScalarQuantizer(F.INT4, Scaling(axis=0, group_size=32, scale_dtype="bfloat16")),
    jn.ScalarQuantizer(F.E2M1, Scaling(axis=0, group_size=16, scale_dtype="e8m0")),
    dataclasses.replace(jn.NF4, calibration="mse"),
    dataclasses.replace(jn.INT4_G128, calibration=jn.Calibration(method="mse", num_ratios=32)),
    dataclasses.replace(
        jn.INT4_G128, calibration=jn.Calibration(method="percentile", percentile=99.5)
    ),
    dataclasses.replace(jn.INT8, qat="lsq"),
    dataclasses.replace(jn.INT4_G128, rounding="stochastic"),
    jn.ScalarQuantizer(F.FloatFormat(3, 4), Scaling(axis=0)),
    jn.ScalarQuantizer(F.FloatFormat(4, 3, special="ieee"), Scaling()),
    jn.ScalarQuantizer(F.FloatFormat(3, 2, bias=2), Scaling(axis=0, group_size=32)),
    jn.ScalarQuantizer(F.LookupFormat.normal_float(3), Scaling(axis=0, group_size=64)),
    jn.INT8.on_axis(-1),
    jn.ScalarQuantizer(F.INT8, Scaling(axis=(0, 2))),
    jn.ScalarQuantizer(
        F.E4M3, Scaling(axis=0, group_size=16, scale_dtype="e4m3", tensor_scale=True)
    ),
    dataclasses.replace(jn.NVFP4, scaling=dataclasses.replace(jn.NVFP4.scaling, group_size=32)),
    jn.ScalarQuantizer(F.UINT4, Scaling(zero_point=True)),  # asym, one scale per tensor
    jn.ScalarQuantizer(F.INT4, Scaling(axis=1, group_size=32)),
    jn.ScalarQuantizer(F.E2M1, Scaling(axis=0, group_size=16, tensor_scale=True)),
    jn.ScalarQuantizer(F.FloatFormat(3, 4), Scaling(), rounding="stochastic"),
    jn.FP8_E4M3.with_group_size(32),
    jn.MXFP4.with_group_size(None),
    jn.ScalarQuantizer(F.UINT8, Scaling(axis=-1, zero_point=True)),
    dataclasses.replace(
        jn.INT4, calibration=jn.Calibration(method="mse", num_ratios=10, min_ratio=1e-5)
    ),
]


@pytest.mark.parametrize("quantizer", ROUND_TRIPS, ids=lambda q: q.name)
def test_names_of_other_scalar_quantizers_parse_back(quantizer):
    assert jn.get_quantizer(quantizer.name) == quantizer


@pytest.mark.parametrize(
    "name,match",
    [
        ("int4_g64_bogus", "unknown option 'bogus'"),
        ("nvfp4_g16x", "unknown option 'g16x'"),
        ("int9", "'int9': no family matches"),
        ("fp8_e4m3_asym", "'asym' needs an int family"),
        ("nf4_asym", "'asym' needs an int family"),
        ("mxfp4_sbf17", "unknown option 'sbf17'"),
        ("int4_p20", "percentile=20"),
        ("int4_tensor_axis1", "'axis' with one scale per tensor"),
        ("int4_g0", "group_size=0"),
        ("", "non-empty"),
    ],
)
def test_bad_names_raise_a_value_error_naming_the_part(name, match):
    with pytest.raises(ValueError, match=match):
        jn.get_quantizer(name)


def test_a_name_string_quantizes_as_its_quantizer():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((96, 40)), jnp.float32)
    key = jax.random.key(7)
    for name in ("int3_g32", "nvfp4", "int4_asym_g32", "mxfp4_mse", "int4_g16_sr"):
        a = jn.quantize(w, name, key=key).dequantize()
        b = jn.quantize(w, jn.get_quantizer(name), key=key).dequantize()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        fq = jn.fake_quant(w, name, key=key)
        np.testing.assert_array_equal(np.asarray(fq), np.asarray(b))


# (name, shape, axis): 2-D, 3-D and 1-D tensors, odd sizes, a contracted axis other than 0.
BITS_CASES = [
    ("int8", (128, 48), None),
    ("int8", (97, 5, 3), None),
    ("int8", (33, 40), 1),
    ("int4_g32", (96, 40), None),
    ("int4_g32", (256, 3, 16), None),
    ("int4_g32", (7, 160), 1),
    ("nvfp4", (48, 24), None),
    ("nvfp4", (64,), None),
    ("fp8_e4m3", (13, 11), None),
    ("fp8_e4m3", (256, 3, 16), None),
    ("int4_asym_g64", (192, 9), None),
    ("int4_asym_g64", (64,), None),
    ("mxfp6", (96, 7, 5), None),
    ("fp4_afpq_g128", (384, 5), None),
    ("nf4", (5, 128), -1),
]


@pytest.mark.parametrize("name,shape,axis", BITS_CASES, ids=str)
def test_bits_per_weight_of_a_shape_equals_the_quantized_tensors(name, shape, axis):
    q = jn.get_quantizer(name)
    expected = jn.quantize(jnp.zeros(shape), q, axis=axis).bits_per_weight
    assert q.bits_per_weight(shape, axis=axis) == expected


def _correlated(k, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k)) * np.exp(rng.normal(0, 0.7, k))
    x = x @ (np.eye(k) + 0.4 * rng.standard_normal((k, k)))
    return rng.standard_normal((k, n)).astype(np.float32), (x.T @ x).astype(np.float32)


def test_gptq_with_one_scale_per_tensor_beats_rtn_and_stores_one_scale():
    w, h = _correlated(72, 13, seed=1)
    q = jn.ScalarQuantizer(F.IntFormat(3))  # per tensor
    g = jn.quantize(w, q, hessian=h)
    assert g.scale.shape == (1, 1) and g.scaling.axis is None
    np.testing.assert_array_equal(
        np.asarray(g.dequantize()), np.asarray(jn.gptq(w, h, q).dequantize())
    )
    r = jn.quantize(w, q)
    np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(r.scale))  # same absmax scale
    assert float(jn.layer_error(w, g, h)) < 0.8 * float(jn.layer_error(w, r, h))


@pytest.mark.parametrize(
    "quantizer",
    [
        jn.INT4.with_group_size(16),
        jn.get_quantizer("int4_asym_g16"),
        jn.INT8,  # per channel
        jn.NVFP4,  # E4M3 group scales and a tensor scale
        jn.ScalarQuantizer(F.IntFormat(3)),  # one scale per tensor
    ],
    ids=str,
)
@pytest.mark.parametrize("axis", [1, -2])
def test_gptq_on_a_non_leading_axis_equals_gptq_on_the_moved_matrix(quantizer, axis):
    rng = np.random.default_rng(2)
    w3 = jnp.asarray(rng.standard_normal((5, 48, 7)), jnp.float32)
    x = rng.standard_normal((200, 48)) @ (np.eye(48) + 0.3 * rng.standard_normal((48, 48)))
    h = jnp.asarray(x.T @ x, jnp.float32)
    got = jn.quantize(w3, quantizer, axis=axis, hessian=h)
    assert got.shape == (5, 48, 7)
    rtn = jn.quantize(w3, quantizer, axis=axis)  # the same layout, rounded to nearest
    assert got.scaling == rtn.scaling and got.scale.shape == rtn.scale.shape
    assert got.codes.shape == rtn.codes.shape
    w2 = jnp.moveaxis(w3, 1, 0).reshape(48, 35)
    ref = jn.gptq(w2, h, quantizer)
    moved = jnp.moveaxis(ref.dequantize().reshape(48, 5, 7), 0, 1)
    np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(moved))
    assert not np.array_equal(np.asarray(got.dequantize()), np.asarray(rtn.dequantize()))


@pytest.mark.parametrize("w_shape", [(192, 24), (192, 3, 10)])  # K a multiple of every group
def test_the_matmul_of_a_qarray_equals_the_dequantized_matmul(w_shape):
    rng = np.random.default_rng(3)
    k = w_shape[0]
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 5, k)), jnp.float32)
    # the kernel path (2/4/8-bit ints, NF4, NVFP4, E4M3) and the dequantize path (3 bits, E5M2)
    names = (
        "int4_g32",
        "int3_g32",
        "int4_asym_g64",
        "int8",
        "nf4",
        "nvfp4",
        "fp8_e4m3",
        "fp8_e5m2",
    )
    for name in names:
        q = jn.quantize(w, name)
        got = np.asarray(x @ q)
        ref = np.tensordot(np.asarray(x, np.float64), np.asarray(q.dequantize(), np.float64), 1)
        assert got.shape == (3, 5) + w_shape[1:] and got.dtype == np.float32
        # float32 sums of K products: rounding grows like sqrt(K)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.sqrt(k) * np.abs(ref).max())


def test_lsq_needs_a_symmetric_float32_scaling():
    with pytest.raises(ValueError, match="qat='lsq'"):
        jn.ScalarQuantizer(F.UINT4, Scaling(axis=0, zero_point=True), qat="lsq")
    with pytest.raises(ValueError, match="qat='lsq'"):
        dataclasses.replace(jn.MXFP4, qat="lsq")


def test_learned_names_and_init_follow_the_qat_mode():
    w = jnp.asarray(np.random.default_rng(4).standard_normal((64, 8)), jnp.float32)
    assert jn.INT4_G128.learned_names == () and jn.INT4_G128.init_learned(w) == {}
    lsq = dataclasses.replace(jn.INT4.with_group_size(16), qat="lsq")
    assert lsq.learned_names == ("scale",)
    assert lsq.init_learned(w)["scale"].shape == (4, 8)
    channel = dataclasses.replace(jn.INT8, qat="lsq")
    assert channel.init_learned(w, axis=1)["scale"].shape == (64, 1)


def test_damp_hessian_marks_dead_inputs_and_rejects_indefinite_matrices():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 8))
    x[:, 3] = 0
    with pytest.warns(UserWarning, match=r"1 of 8 inputs are dead .*inputs 3\); their weights"):
        damped = jn.damp_hessian(jnp.asarray(x.T @ x, jnp.float32), 0.01)
    assert np.asarray(damped.dead).tolist() == [i == 3 for i in range(8)]
    assert damped.damping > 0
    # the dead diagonal entry is set to 1, then damped like the others
    assert float(damped.matrix[3, 3]) == pytest.approx(1.0 + damped.damping, rel=1e-6)
    np.linalg.cholesky(np.asarray(damped.matrix, np.float64))
    # a negative eigenvalue that no damping fixes: on the diagonal, and hidden by a positive
    # diagonal (eigenvalues 1 +- 1e4; the largest damping adds 0.01 x 10^5 x mean(diag) = 1e3)
    for indefinite in (np.diag([1.0, 2.0, -500.0, 1.0]), np.array([[1.0, 1e4], [1e4, 1.0]])):
        assert np.all(np.isfinite(indefinite))
        with pytest.raises(ValueError, match="not positive definite"):
            jn.damp_hessian(indefinite.astype(np.float32), 0.01)
    # a positive diagonal but an eigenvalue of -1e4: more than the largest damping
    # (0.01 * 10^5 * mean diagonal = 1000) can lift
    saddle = np.array([[1.0, 1e4, 0.0], [1e4, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    assert np.linalg.eigvalsh(saddle).min() < -1000 and np.all(np.isfinite(saddle))
    with pytest.raises(ValueError, match="not positive definite"):
        jn.damp_hessian(saddle, 0.01)


@pytest.mark.parametrize("order", [None, "reversed"])
def test_damp_hessian_grows_the_damping_tenfold_until_positive_definite(order):
    """An eigenvalue of -0.5 (mean diagonal 1): damping 0.01 and 0.1 leave it negative, 1.0
    lifts it; the inverse factor is that of the reordered damped matrix (numpy reference)."""
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    eig = np.array([-0.5, 0.4, 0.9, 1.3, 1.6, 2.3])  # mean 1.0 = mean diagonal
    h = (q * eig) @ q.T
    perm = None if order is None else np.arange(6)[::-1].copy()
    damped = jn.damp_hessian(jnp.asarray(h, jnp.float32), 0.01, order=perm)
    lam = 0.01 * 100 * np.mean(np.diag(h))
    assert damped.damping == pytest.approx(lam, rel=1e-5)
    np.testing.assert_allclose(np.asarray(damped.matrix), h + lam * np.eye(6), atol=1e-5)
    p = np.arange(6) if perm is None else perm
    hp = (h + lam * np.eye(6))[p][:, p]
    u = np.asarray(damped.inverse_factor, np.float64)
    assert np.allclose(u, np.triu(u), atol=0)  # upper triangular
    # U^T U = P^-1, to float32 factorization accuracy (condition number of P: 3.3 / 0.5)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(hp), atol=1e-4)


def test_damp_hessian_rejects_bad_arguments_by_name():
    h = jnp.eye(4, dtype=jnp.float32)
    for kwargs, match in [
        (dict(order=[0, 1, 1, 3]), "order: expected a permutation of range\\(4\\)"),
        (dict(order=[0, 1, 2]), "order: expected a permutation"),
        (dict(max_tries=0), "max_tries=0"),
        (dict(damp=-1.0), "damp=-1.0"),
    ]:
        with pytest.raises(ValueError, match=match):
            jn.damp_hessian(h, **{"damp": 0.01, **kwargs})
    with pytest.raises(ValueError, match="square"):
        jn.damp_hessian(jnp.ones((4, 3)), 0.01)


def test_quantize_and_fake_quant_take_a_bare_format_as_one_scale_per_tensor():
    w = jnp.asarray(np.random.default_rng(6).standard_normal((32, 8)), jnp.float32)
    q = jn.quantize(w, F.E4M3)
    assert q.scale.shape == (1, 1)
    fq = jax.jit(lambda w: jn.fake_quant(w, F.E4M3))(w)
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(q.dequantize()))
