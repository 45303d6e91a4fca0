"""Fully quantized training (numerics.training): operand quantizers against independent
references, the custom VJP against the products written out, unbiasedness, delayed scaling,
the native FP8 / block-scaled paths, and lowering for TPU and CUDA."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxquant import numerics
from jaxquant.numerics import formats as F
from jaxquant.numerics import training as T
from pallas_kernels.hadamard import hadamard_matrix

E2M1_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def _normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


# -- operand quantizers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "quantizer, op",
    [
        (numerics.FP8_E4M3, T.OperandQuant(format=F.E4M3)),
        (numerics.FP8_E5M2, T.OperandQuant(format=F.E5M2)),
        (
            numerics.ScalarQuantizer(F.E4M3, numerics.Scaling(axis=0)),
            T.OperandQuant(format=F.E4M3, granularity="channel"),
        ),
        (
            numerics.MXFP4,
            T.OperandQuant(format=F.E2M1, granularity="block", block=32, scale_dtype="e8m0"),
        ),
        (numerics.NVFP4, T.NVFP4_TRAIN.forward.lhs),
    ],
    ids=["fp8_tensor", "e5m2_tensor", "fp8_channel", "mxfp4", "nvfp4"],
)
@pytest.mark.parametrize("axis", [0, 1])
def test_operand_quantizer_equals_the_scalar_quantizer_bit_for_bit(quantizer, op, axis):
    """Tensor, channel and 1-D block operands are what ScalarQuantizer makes of the operand
    with scales along the contraction axis (awkward, non-square shapes)."""
    x = _normal(axis, (96, 160), 3.0)
    got = T.quantize_operand(x, op, axis).dequantize()
    want = quantizer.quantize(x, axis=axis).dequantize()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _e4m3(v):
    return np.asarray(v, np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _rtn_e2m1(y):
    a = np.minimum(np.abs(y), 6.0)
    return np.sign(y) * E2M1_GRID[np.abs(a[..., None] - E2M1_GRID).argmin(-1)]


def test_nvfp4_weight_tiles_match_a_numpy_reference_and_either_axis():
    """16x16 tiles: one E4M3 scale per tile under an f32 tensor scale, the same quantized
    weight whether contracted along K (forward) or N (input gradient)."""
    w = _normal(3, (64, 48), 0.05)
    op = T.NVFP4_TRAIN.forward.rhs
    got0 = np.asarray(T.quantize_operand(w, op, 0).dequantize())
    got1 = np.asarray(T.quantize_operand(w, op, 1).dequantize())
    np.testing.assert_array_equal(got0, got1)
    wn = np.asarray(w)
    tiles = wn.reshape(4, 16, 3, 16)
    amax = np.abs(tiles).max(axis=(1, 3), keepdims=True)
    t = np.float32(amax.max() / np.float32(6) / np.float32(448))
    s = _e4m3(amax / np.float32(6) / t) * t
    want = (_rtn_e2m1(tiles / s) * s).reshape(w.shape)
    # the same grid values and scales; the f32 product value * scale * tensor scale may be
    # associated differently (one ulp)
    np.testing.assert_allclose(got0, want, rtol=3e-7, atol=0)


def _quest_reference(x, how):
    """QuEST on blocks of 32 along the last axis, per the Quartet code (numpy, float64
    statistics): scale = 2.92247856 / 6 · std as a power of two, RTN onto E2M1."""
    xb = np.asarray(x, np.float64).reshape(x.shape[0], -1, 32)
    std = np.sqrt(np.maximum((xb**2).mean(-1, keepdims=True) - xb.mean(-1, keepdims=True) ** 2, 0))
    c = T.QUEST_GAUSSIAN_CLIP / 6 * std
    e = np.floor(np.log2(c))
    if how == "nearest":
        e = e + (c / 2**e >= np.sqrt(2))
    s = 2.0**e
    y = xb / s
    return (_rtn_e2m1(y) * s).reshape(x.shape), (np.abs(y) < 6).reshape(x.shape)


@pytest.mark.parametrize("how", ["nearest", "floor"])
def test_quest_matches_the_quartet_formula(how):
    x = _normal(4, (64, 256))
    op = dataclasses.replace(T.QUARTET_TRAIN.forward.lhs, quest_scale=how)
    q = T.quantize_operand(x, op, 1)
    want, mask = _quest_reference(x, how)
    got = np.asarray(q.dequantize())
    # float32 vs float64 statistics can move a block's std across a power-of-two boundary
    # (probability ~1e-6 per block); allow no more than one such block in 512
    assert np.mean(np.any(got.reshape(64, -1, 32) != want.reshape(64, -1, 32), -1)) <= 1 / 512
    assert np.mean(np.asarray(q.mask_2d()) != mask) <= 32 / x.size


@pytest.mark.parametrize(
    "name, paper",
    [("sr_absmax", 2.77e-2), ("rtn_absmax", 1.37e-2), ("quest", 1.32e-2)],
)
def test_forward_quantizers_reproduce_quartets_gaussian_mse_table(name, paper):
    """Quartet (arXiv 2505.14669) Table 2: MXFP4 on Gaussian data. Absmax = the backward's
    E8M0 scale on ¾ of the value; QuEST = Hadamard-normalized block, 2.92 sigma clip. With
    8M samples (32 scales of 8192 blocks) the estimate's standard error is < 0.5% (measured:
    +1.2%, -0.6%, +0.9%), so 3% is the paper's precision (two digits), not noise."""
    base = T.QUARTET_TRAIN.grad_input.lhs
    op = {
        "sr_absmax": dataclasses.replace(base, rounding="stochastic"),
        "rtn_absmax": base,
        "quest": T.QUARTET_TRAIN.forward.lhs,
    }[name]
    mse = T.gaussian_mse(op, n_scales=32, rows=8192)
    assert abs(mse / paper - 1) < 0.03, (name, mse)


def test_the_paper_codes_floored_quest_scale_clips_harder():
    """The Quartet kernel floors QuEST's scale to a power of two: the clip falls to between
    1.46 and 2.92 sigma, and the Gaussian MSE is far above the table's 1.32e-2 (BENCHMARKS.md)."""
    floor = dataclasses.replace(T.QUARTET_TRAIN.forward.lhs, quest_scale="floor")
    assert T.gaussian_mse(floor, n_scales=8, rows=8192) > 1.8e-2


@pytest.mark.parametrize("scale_rounding", ["up", "nearest"])
def test_stochastic_gradient_rounding_is_unbiased_only_with_scales_rounded_up(scale_rounding):
    """NVFP4's stochastically rounded gradients: E[dequantized] = g at every element when the
    E4M3 block scale rounds up; rounded to nearest (the paper) it clips the largest element of
    about half the blocks, a bias many standard errors wide."""
    op = dataclasses.replace(T.NVFP4_TRAIN.grad_input.lhs, scale_rounding=scale_rounding)
    g = _normal(6, (32, 64))
    n = 4000
    f = jax.jit(jax.vmap(lambda k: T.quantize_operand(g, op, 1, key=k).dequantize()))
    d = np.asarray(f(jax.random.split(jax.random.key(7), n)), np.float64)
    err = np.abs(d.mean(0) - np.asarray(g))
    # each sample is one of the two grid values around g, a gap apart: the mean's standard
    # error is <= gap / 2 / sqrt(n); 6 standard errors, plus the f32 ulp of x / (s * t)
    q = T.quantize_operand(g, op, 1, key=jax.random.key(0))
    unit = np.broadcast_to(np.asarray(q.block_scale * q.tensor_scale), q.values.shape)
    unit = unit.reshape(g.shape)
    y = np.abs(np.asarray(g)) / unit
    gap = unit * np.where(y < 2, 0.5, np.where(y < 4, 1.0, 2.0))
    bound = 6 * gap / 2 / np.sqrt(n) + 1e-6 * np.abs(np.asarray(g))
    if scale_rounding == "up":
        assert np.all(err <= bound)
    else:
        assert np.mean(err > bound) > 0.01


def test_the_input_gradient_estimate_is_unbiased_given_the_forwards_weight():
    """NVFP4's dx = Q_sr(g) @ w̃ᵀ with w̃ the forward's tile-quantized weight: its mean over
    keys is g @ w̃ᵀ (the product of the unbiased gradient with a fixed matrix)."""
    x, w, g = _normal(8, (16, 64)), _normal(9, (64, 32), 0.1), _normal(10, (16, 32))
    recipe = T.NVFP4_TRAIN

    def dx(key):
        return jax.vjp(lambda x: T.train_matmul(x, w, recipe, key=key), x)[1](g)[0]

    n = 2000
    d = np.asarray(jax.jit(jax.vmap(dx))(jax.random.split(jax.random.key(11), n)), np.float64)
    w_q = np.asarray(T.quantize_operand(w, recipe.forward.rhs, 0).dequantize(), np.float64)
    want = np.asarray(g, np.float64) @ w_q.T
    se = d.std(0) / np.sqrt(n)
    assert np.all(np.abs(d.mean(0) - want) <= 6 * se + 1e-5)


# -- the custom VJP against the products written out ------------------------------------------


def _deterministic(recipe):
    """The recipe with nearest rounding and fixed rotations (its random parts are tested
    statistically): then the reference can recompute every product."""

    def fix(p):
        ops = {
            side: None if q is None else dataclasses.replace(q, rounding="nearest")
            for side, q in (("lhs", p.lhs), ("rhs", p.rhs))
        }
        return dataclasses.replace(p, random_signs=False, **ops)

    return dataclasses.replace(recipe, **{p: fix(getattr(recipe, p)) for p in T.PRODUCTS})


def _rot(a, axis, block):
    """Rotate along ``axis`` with the dense orthonormal Hadamard matrix."""
    if block is None:
        return a
    h = jnp.asarray(hadamard_matrix(block) / np.sqrt(block), jnp.float32)
    v = a if axis == 1 else a.T
    v = jnp.matmul(v.reshape(v.shape[0], -1, block), h, precision="highest").reshape(v.shape)
    return v if axis == 1 else v.T


def _reference(x, w, g, r, histories):
    """y, dx, dw of recipe ``r`` computed product by product (deterministic recipes)."""

    def q(a, op, axis, name):
        if op is None:
            return a, None
        qa = T.quantize_operand(a, op, axis, history=histories.get(name))
        return qa.dequantize(), qa.mask_2d()

    hi = jax.lax.Precision.HIGHEST
    f = r.forward
    xr, wr = _rot(x, 1, f.rotation), _rot(w, 0, f.rotation)
    xq, mx = q(xr, f.lhs, 1, "forward_lhs")
    wq, mw = q(wr, f.rhs, 0, "forward_rhs")
    y = jnp.matmul(xq, wq, precision=hi)
    p = r.grad_input
    w_src = wq if r.w_source == "forward" else wr
    gi, wi = _rot(g, 1, p.rotation), _rot(w_src, 1, p.rotation)
    dx = jnp.matmul(
        q(gi, p.lhs, 1, "grad_input_lhs")[0], q(wi, p.rhs, 1, "grad_input_rhs")[0].T, precision=hi
    )
    p = r.grad_weight
    x_src = xq if r.x_source == "forward" else xr
    xw, gw = _rot(x_src, 0, p.rotation), _rot(g, 0, p.rotation)
    dw = jnp.matmul(
        q(xw, p.lhs, 0, "grad_weight_lhs")[0].T, q(gw, p.rhs, 0, "grad_weight_rhs")[0], precision=hi
    )
    if mx is not None:
        dx = jnp.where(mx, dx, 0)
    if mw is not None:
        dw = jnp.where(mw, dw, 0)
    return y, _rot(dx, 1, f.rotation), _rot(dw, 0, f.rotation)


def _vjp_cases():
    """Every recipe on a square-ish and an awkward shape; the per-tensor FP8 recipes' awkward
    case (no blocks to misalign) is in the slow run."""
    for shape, sid in (((64, 96, 32), "square"), ((96, 160, 224), "awkward")):
        for name in T.TRAINING_RECIPES:
            marks = pytest.mark.slow if sid == "awkward" and name in ("fp8", "fp8_delayed") else ()
            yield pytest.param(name, shape, id=f"{sid}-{name}", marks=marks)


@pytest.mark.parametrize("name, shape", list(_vjp_cases()))
def test_custom_vjp_equals_the_products_written_out(name, shape):
    m, k, n = shape
    recipe = _deterministic(T.TRAINING_RECIPES[name])
    x, w, g = _normal(12, (m, k), 2.0), _normal(13, (k, n), 0.1), _normal(14, (m, n), 1e-3)
    h = {key: jnp.abs(v) + 0.5 for key, v in recipe.init_histories().items()}

    @jax.jit
    def custom(x, w, g):
        y, vjp = jax.vjp(lambda x, w: T.train_matmul(x, w, recipe, histories=h), x, w)
        return y, *vjp(g)

    y, dx, dw = custom(x, w, g)
    y_ref, dx_ref, dw_ref = jax.jit(_reference, static_argnums=3)(x, w, g, recipe, h)
    # quantized operands are identical; the products' f32 sums differ only in order, and the
    # Hadamard (fast transform vs dense matrix) in the last bits
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * scale, rtol=0)


def test_float_recipe_is_the_plain_matmul_and_its_gradients():
    recipe = T.TrainingRecipe(name="float")
    x, w, g = _normal(15, (8, 16)), _normal(16, (16, 4)), _normal(17, (8, 4))
    y, vjp = jax.vjp(lambda x, w: T.train_matmul(x, w, recipe), x, w)
    dx, dw = vjp(g)
    hi = "highest"
    np.testing.assert_allclose(y, jnp.matmul(x, w, precision=hi), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, jnp.matmul(g, w.T, precision=hi), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, jnp.matmul(x.T, g, precision=hi), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mxfp4_quartet", "nvfp4"])
def test_random_signs_change_per_key_and_gradients_stay_close_to_float(name):
    recipe = T.TRAINING_RECIPES[name]
    x, w, g = _normal(18, (64, 128)), _normal(19, (128, 64), 0.1), _normal(20, (64, 64))

    @jax.jit
    def grads(key):
        return jax.vjp(lambda x, w: T.train_matmul(x, w, recipe, key=key), x, w)[1](g)

    (dx1, dw1), (_, dw2) = grads(jax.random.key(1)), grads(jax.random.key(2))
    assert not np.array_equal(np.asarray(dw1), np.asarray(dw2))

    def cos(a, b):
        return float(jnp.vdot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b))

    assert cos(dw1, x.T @ g) > 0.95 and cos(dx1, g @ w.T) > 0.95


# -- delayed scaling --------------------------------------------------------------------------


def test_delayed_scaling_uses_the_history_and_returns_it_rolled():
    recipe = T.FP8_DELAYED_TRAIN
    x, w, g = _normal(21, (16, 32)), _normal(22, (32, 8)), _normal(23, (16, 8))
    h = recipe.init_histories()
    h["forward_lhs"] = h["forward_lhs"].at[3].set(10.0)  # a past amax larger than today's

    @jax.jit
    def step(x, w, h):
        y, vjp = jax.vjp(lambda x, w, h: T.train_matmul(x, w, recipe, histories=h), x, w, h)
        return y, vjp(g)[2]

    y, new = step(x, w, h)
    # the new history: today's amax first, the rest shifted by one, the oldest dropped
    assert float(new["forward_lhs"][0]) == float(jnp.max(jnp.abs(x)))
    np.testing.assert_array_equal(new["forward_lhs"][1:], h["forward_lhs"][:-1])
    assert float(new["grad_input_lhs"][0]) == float(jnp.max(jnp.abs(g)))
    # x was scaled by the history's max (10 / 448), w by its own amax (a zero history)
    sx = np.float32(10.0) / np.float32(448.0)
    xq = (np.asarray(x) / sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * sx
    sw = float(jnp.max(jnp.abs(w))) / 448.0
    wq = numerics.FP8_E4M3.quantize(w).dequantize()
    np.testing.assert_allclose(y, xq @ np.asarray(wq), rtol=1e-5, atol=1e-5)
    assert sw > 0


def test_amax_histories_are_maxima_over_the_whole_sharded_tensor():
    """Under jit with x and g sharded by rows over 8 devices (data parallel: the trainer's
    mesh, automatic axes) the new histories are the unsharded ones exactly (a max has no
    summation order), and y is the unsharded product."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("x",))
    recipe = T.FP8_DELAYED_TRAIN
    x, w, g = _normal(27, (64, 32)), _normal(28, (32, 16)), _normal(29, (64, 16))
    h = recipe.init_histories()

    @jax.jit
    def step(x, w, g):
        y, vjp = jax.vjp(lambda x, w, h: T.train_matmul(x, w, recipe, histories=h), x, w, h)
        return y, vjp(g)[2]

    rows = NamedSharding(mesh, P("x", None))
    sharded = step(jax.device_put(x, rows), w, jax.device_put(g, rows))
    plain = step(x, w, g)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(plain[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-5, atol=1e-5)


def test_bad_histories_and_missing_keys_get_clear_errors():
    x, w = jnp.ones((16, 32)), jnp.ones((32, 16))
    with pytest.raises(ValueError, match="needs amax histories"):
        T.train_matmul(x, w, T.FP8_DELAYED_TRAIN)
    with pytest.raises(ValueError, match="rounds stochastically or draws random signs"):
        jax.eval_shape(jax.grad(lambda w: T.train_matmul(x, w, T.NVFP4_TRAIN).sum()), w)
    with pytest.raises(ValueError, match="forward product: x's blocks of 16 do not divide"):
        T.train_matmul(jnp.ones((16, 24)), jnp.ones((24, 16)), T.NVFP4_TRAIN)
    with pytest.raises(ValueError, match="grad_input product: its Hadamard block of 32"):
        T.train_matmul(jnp.ones((32, 32)), jnp.ones((32, 16)), T.QUARTET_TRAIN)
    with pytest.raises(ValueError, match="tiles do not divide its other axis of length 8"):
        T.train_matmul(jnp.ones((16, 32)), jnp.ones((32, 8)), T.NVFP4_TRAIN)
    with pytest.raises(ValueError, match="expected x \\[M, K\\]"):
        T.train_matmul(x, jnp.ones((16, 16)), T.FP8_TRAIN)
    with pytest.raises(ValueError, match="prescale=0.75"):
        T.OperandQuant(
            format=F.E2M1, granularity="block", block=32, scale_dtype="e8m0", rounding="stochastic"
        )
    with pytest.raises(ValueError, match="one amax history per tensor"):
        T.OperandQuant(format=F.E4M3, granularity="channel", delayed=True)
    with pytest.raises(ValueError, match="training recipe 'bogus'"):
        T.get_training_recipe("bogus")


# -- native paths and lowering ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["fp8", "fp8_rowwise", pytest.param("fp8_delayed", marks=pytest.mark.slow)],  # fp8's path
)
def test_native_fp8_products_equal_the_emulation(name):
    """FP8 operands multiplied as float8 in dot_general (scales on the f32 result) give the
    emulated products up to the rounding of the scaled values (f32 ulps)."""
    x, w, g = _normal(24, (32, 64), 2.0), _normal(25, (64, 48), 0.1), _normal(26, (32, 48))
    out = {}
    for impl in ("emulated", "native"):
        r = T.TRAINING_RECIPES[name].with_implementation(impl)
        h = r.init_histories()

        @jax.jit
        def step(x, w, g, r=r, h=h):
            y, vjp = jax.vjp(lambda x, w: T.train_matmul(x, w, r, histories=h), x, w)
            return y, *vjp(g)

        out[impl] = step(x, w, g)
    for a, b in zip(out["native"], out["emulated"], strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=0)


def _export(recipe, platform):
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((128, 96), jnp.float32)
    g = jax.ShapeDtypeStruct((64, 96), jnp.float32)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

    def step(x, w, g, key):
        h = recipe.init_histories()
        y, vjp = jax.vjp(lambda x, w: T.train_matmul(x, w, recipe, key=key, histories=h), x, w)
        return y, vjp(g)

    checks = [jax.export.DisabledSafetyCheck.custom_call("__op$block_scaled_dot")]
    return jax.export.export(jax.jit(step), platforms=[platform], disabled_checks=checks)(
        x, w, g, key
    ).mlir_module()


@pytest.mark.parametrize(
    "name",
    # fp8_delayed lowers fp8's products (plus the histories' max and roll)
    [
        n if n != "fp8_delayed" else pytest.param(n, marks=pytest.mark.slow)
        for n in T.TRAINING_RECIPES
    ],
)
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_every_recipe_lowers_for_tpu_and_cuda(name, platform):
    """The emulated training step lowers everywhere; native FP8 products lower to float8
    dot_generals on both, native block-scaled ones (MXFP4, NVFP4) to cuDNN's block-scaled dot,
    which exists on CUDA only (TPU has no block-scaled matmul in JAX: they run emulated)."""
    recipe = T.TRAINING_RECIPES[name]
    assert _export(recipe.with_implementation("emulated"), platform)
    if name.startswith("fp8"):
        assert "f8E4M3FN" in _export(recipe.with_implementation("native"), platform)
    elif platform == "cuda":
        mlir = _export(recipe.with_implementation("native"), platform)
        assert "block_scaled_dot" in mlir and "f4E2M1FN" in mlir
