"""A QArray behaves like any array under JAX transforms: jit, vmap, sharding, orbax.

Every comparison is bit-exact (leaves compared as raw bytes, with equal dtype and shape): the
same quantization must give the same codes and scales whichever way it is run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.numerics import (
    INT4_G128,
    MXFP4,
    NF4,
    NVFP4,
    PRESETS,
    QArray,
    ScalarQuantizer,
    Scaling,
    quantize,
)

PRESET_NAMES = sorted(PRESETS)
STATIC_FIELDS = ("shape", "dtype", "format", "scaling")


def _data(shape, seed=0, dtype=jnp.float32):
    """Normal data with per-column spread and offset, so blocks differ in range and sign balance."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x = x * rng.uniform(0.1, 4.0, shape[-1]).astype(np.float32)
    x = x + rng.uniform(-0.5, 0.5, shape[-1]).astype(np.float32)
    return jnp.asarray(x, dtype)


def _bits(a) -> np.ndarray:
    """The raw bytes of an array (so -0.0 != 0.0 and NaN payloads count)."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.reshape(-1).view(np.uint8)


def _assert_bit_equal(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"{what}: bits differ")


def _assert_same_static(q: QArray, r: QArray):
    for field in STATIC_FIELDS:
        assert getattr(q, field) == getattr(r, field), field


def _assert_qarray_bit_equal(q: QArray, r: QArray):
    """Same static fields, same leaf structure (None leaves included), bit-identical leaves."""
    assert isinstance(q, QArray) and isinstance(r, QArray)
    _assert_same_static(q, r)
    assert jax.tree.structure(q) == jax.tree.structure(r)
    leaves = zip(jax.tree_util.tree_leaves_with_path(q), jax.tree.leaves(r), strict=True)
    for (path, a), b in leaves:
        _assert_bit_equal(a, b, jax.tree_util.keystr(path))
    assert (q.zero is None) == (r.zero is None)
    assert (q.tensor_scale is None) == (r.tensor_scale is None)


# 1. jit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_quantize_and_dequantize_under_jit_bit_identical_to_eager(name):
    preset = PRESETS[name]
    quantize_jit = jax.jit(lambda x: quantize(x, preset))
    dequantize_jit = jax.jit(lambda q: q.dequantize())
    for seed in range(4):  # a one-ulp scale difference shows on some inputs only
        x = _data((256, 64), seed=seed)
        q_eager = quantize(x, preset)
        _assert_qarray_bit_equal(q_eager, quantize_jit(x))

        d_eager = q_eager.dequantize()
        _assert_bit_equal(d_eager, dequantize_jit(q_eager), "dequantize")
        assert d_eager.shape == x.shape and d_eager.dtype == x.dtype


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_qarray_passes_into_and_out_of_jit_with_static_fields_and_leaves(name):
    preset = PRESETS[name]
    x = _data((256, 64), seed=1)
    q = quantize(x, preset)
    seen = {}

    @jax.jit
    def f(q):
        # Static fields stay Python values while tracing; the array leaves are traced.
        seen.update({field: getattr(q, field) for field in STATIC_FIELDS})
        seen["traced"] = all(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(q))
        return q, q.dequantize()

    r, d = f(q)
    assert seen == {**{field: getattr(q, field) for field in STATIC_FIELDS}, "traced": True}
    _assert_qarray_bit_equal(q, r)
    _assert_bit_equal(q.dequantize(), d, "dequantize")


# 2. vmap --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_vmap_quantize_equals_quantizing_each_slice(name):
    preset = PRESETS[name]
    batch = 3
    xs = jnp.stack([_data((256, 64), seed=10 + i) for i in range(batch)])
    qb = jax.vmap(lambda x: quantize(x, preset))(xs)
    slices = [quantize(xs[i], preset) for i in range(batch)]

    assert qb.shape == (256, 64) and qb.dtype == xs.dtype
    _assert_same_static(qb, slices[0])
    assert jax.tree.structure(qb) == jax.tree.structure(slices[0])
    for i, qi in enumerate(slices):
        leaves = zip(jax.tree_util.tree_leaves_with_path(qb), jax.tree.leaves(qi), strict=True)
        for (path, a), b in leaves:
            _assert_bit_equal(a[i], b, f"slice {i} {jax.tree_util.keystr(path)}")

    # dequantize of the batched QArray (outside vmap) maps over the batch axis.
    db = qb.dequantize()
    _assert_bit_equal(db, jnp.stack([qi.dequantize() for qi in slices]), "dequantize")
    assert db.shape == xs.shape and db.dtype == xs.dtype
    assert qb.bits_per_weight == slices[0].bits_per_weight
    assert qb.nbytes == batch * slices[0].nbytes


# 3. sharding ----------------------------------------------------------------------------------


@pytest.fixture(params=["mesh8", "auto"], ids=["mesh8_make_mesh_default", "auto_axes"])
def mesh(request):
    """conftest's ``mesh8`` (``jax.make_mesh``'s default axis types, Explicit on recent JAX), and
    the same 8-device mesh with Auto axes (sharding propagated by the compiler)."""
    if request.param == "mesh8":
        return request.getfixturevalue("mesh8")
    return jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))


def _assert_sharded_8_ways(leaf, what):
    assert isinstance(leaf.sharding, NamedSharding), f"{what}: {leaf.sharding}"
    assert not leaf.sharding.is_fully_replicated, f"{what}: replicated {leaf.sharding}"
    shards = leaf.addressable_shards
    assert len(shards) == 8, what
    assert len({s.device for s in shards}) == 8, what
    for s in shards:
        assert s.data.size < leaf.size, f"{what}: shard {s.data.shape} of {leaf.shape}"


# One preset per distinct layout: per channel, 3-bit codes straddling bytes, a zero point, one
# per-tensor scale (replicated), 6-bit codes with E8M0 scales, E4M3 scales with a scalar tensor
# scale, a lookup table, split-sign scales with their leading 2.
SHARDING_PRESETS = [
    "int8",
    "int3_g128",
    "int4_asym_g128",
    "fp8_e4m3",
    "mxfp6",
    "nvfp4",
    "nf4",
    "fp4_afpq_g128",
]


@pytest.mark.parametrize("name", SHARDING_PRESETS)
def test_quantize_under_jit_on_sharded_input_gives_sharded_leaves_and_same_values(name, mesh):
    preset = PRESETS[name]
    x = _data((256, 512), seed=2)
    sharding = NamedSharding(mesh, P(None, "x"))
    xs = jax.device_put(x, sharding)
    q_sharded = jax.jit(lambda x: quantize(x, preset), in_shardings=sharding)(xs)
    q_ref = jax.jit(lambda x: quantize(x, preset))(x)  # unsharded, on one device
    assert len(q_ref.codes.addressable_shards) == 1

    _assert_sharded_8_ways(q_sharded.codes, "codes")
    if q_sharded.scale.shape[-1] == 512:  # per-channel / per-group scales follow x's columns
        _assert_sharded_8_ways(q_sharded.scale, "scale")
    if q_sharded.zero is not None:
        _assert_sharded_8_ways(q_sharded.zero, "zero")

    _assert_qarray_bit_equal(q_sharded, q_ref)
    _assert_bit_equal(q_sharded.dequantize(), q_ref.dequantize(), "dequantize")


def _sharding_tree(q: QArray, mesh):
    """P(None, 'x') for every array leaf (a leading 2 of split-sign scales stays unsharded),
    replicated for scalars such as NVFP4's tensor_scale."""
    return jax.tree.map(
        lambda a: NamedSharding(mesh, P() if a.ndim == 0 else P(*([None] * (a.ndim - 1)), "x")),
        q,
    )


@pytest.mark.parametrize("preset", [INT4_G128, MXFP4], ids=str)
def test_device_put_whole_qarray_with_one_sharding(preset, mesh):
    x = _data((256, 512), seed=3)
    q = quantize(x, preset)
    assert q.zero is None and q.tensor_scale is None and q.scale.ndim == 2
    qs = jax.device_put(q, NamedSharding(mesh, P(None, "x")))
    assert isinstance(qs, QArray)
    _assert_sharded_8_ways(qs.codes, "codes")
    _assert_sharded_8_ways(qs.scale, "scale")
    _assert_qarray_bit_equal(qs, q)
    _assert_bit_equal(qs.dequantize(), q.dequantize(), "dequantize")
    _assert_bit_equal(jax.jit(lambda q: q.dequantize())(qs), q.dequantize(), "jit dequantize")


def test_device_put_nvfp4_with_sharding_tree_replicating_tensor_scale(mesh):
    x = _data((256, 512), seed=4)
    q = quantize(x, NVFP4)
    assert q.tensor_scale is not None and q.tensor_scale.ndim == 0
    qs = jax.device_put(q, _sharding_tree(q, mesh))
    assert isinstance(qs, QArray)
    _assert_sharded_8_ways(qs.codes, "codes")
    _assert_sharded_8_ways(qs.scale, "scale")
    assert qs.tensor_scale.sharding.is_fully_replicated
    _assert_qarray_bit_equal(qs, q)
    _assert_bit_equal(qs.dequantize(), q.dequantize(), "dequantize")
    _assert_bit_equal(jax.jit(lambda q: q.dequantize())(qs), q.dequantize(), "jit dequantize")


# 4. orbax -------------------------------------------------------------------------------------

# Every preset, plus a bfloat16 scale (no preset stores one) on a bfloat16 input.
ORBAX_CASES = {name: (PRESETS[name], None, jnp.float32) for name in PRESET_NAMES}
ORBAX_CASES["nf4_g64_bf16_scale_bf16_input"] = (
    NF4.format,
    Scaling(axis=0, group_size=64, scale_dtype="bfloat16"),
    jnp.bfloat16,
)


def _orbax_case(name):
    fmt, scaling, dtype = ORBAX_CASES[name]
    quantizer = fmt if scaling is None else ScalarQuantizer(fmt, scaling)
    return quantize(_data((256, 64), seed=5, dtype=dtype), quantizer)


@pytest.mark.parametrize("name", list(ORBAX_CASES))
def test_orbax_round_trip_restores_bit_identical_qarray(name, tmp_path):
    q = _orbax_case(name)
    state = {"w": q, "step": jnp.int32(3)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    assert isinstance(abstract["w"], QArray)

    path = tmp_path / "ckpt"
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(path, abstract)
    finally:
        checkpointer.close()

    assert set(restored) == {"w", "step"}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    _assert_bit_equal(restored["step"], state["step"], "step")
    _assert_qarray_bit_equal(restored["w"], q)
    _assert_bit_equal(restored["w"].dequantize(), q.dequantize(), "dequantize")


def test_orbax_cases_cover_every_scale_dtype_and_optional_leaf():
    """The round trip above meets every stored scale dtype, and QArrays with and without
    ``zero`` and ``tensor_scale``."""
    qs = [_orbax_case(name) for name in ORBAX_CASES]
    assert {np.dtype(q.scale.dtype) for q in qs} == {
        np.dtype(jnp.float32),
        np.dtype(jnp.bfloat16),
        np.dtype(jnp.uint8),
        np.dtype(jnp.float8_e4m3fn),
    }
    assert any(q.zero is None for q in qs) and any(q.zero is not None for q in qs)
    assert any(q.tensor_scale is None for q in qs) and any(q.tensor_scale is not None for q in qs)
    assert {np.dtype(q.dtype) for q in qs} == {np.dtype(jnp.float32), np.dtype(jnp.bfloat16)}


# 5. nbytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_nbytes_is_sum_of_leaf_nbytes_for_concrete_and_abstract_qarray(name):
    preset = PRESETS[name]
    x = _data((256, 64), seed=6)
    q = quantize(x, preset)
    leaves = jax.tree_util.tree_leaves(q)
    assert q.nbytes == sum(leaf.nbytes for leaf in leaves)
    assert isinstance(q.nbytes, int)

    aq = jax.eval_shape(lambda x: quantize(x, preset), x)
    assert isinstance(aq, QArray)
    _assert_same_static(aq, q)
    a_leaves = jax.tree_util.tree_leaves(aq)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in a_leaves)
    assert [(a.shape, a.dtype) for a in a_leaves] == [(b.shape, b.dtype) for b in leaves]
    assert aq.nbytes == q.nbytes
    assert aq.bits_per_weight == q.bits_per_weight
