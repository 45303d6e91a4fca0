"""k-means codebooks, VQArray and its matmul, rotations, vector quantizers by name, and vector
quantizers in rules on a model."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxquant import vq
from jaxquant.nn import QuantConfig, QuantRule, freeze, serving_params
from jaxquant.numerics import get_quantizer, kernel_options, quantize
from jaxquant.vq import E8P, KMeans, PyramidVQ, Trellis, e8p, pyramid, rotation, trellis
from jaxquant.vq import VectorQuantizer as VQ
from jaxquant.vq import vqarray as vqarray_lib


def _np_distortion(x, codebook, w=None):
    w = np.ones_like(x) if w is None else w
    d = np.sum(w[:, None, :] * (x[:, None, :] - codebook[None]) ** 2, axis=2)
    return d.min(axis=1).sum() / x.size, d.argmin(axis=1)


def test_assign_is_the_weighted_nearest_codeword_by_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((333, 3)).astype(np.float32)
    cb = rng.standard_normal((17, 3)).astype(np.float32)
    w = rng.uniform(0.1, 2.0, (333, 3)).astype(np.float32)
    for weights in (None, w):
        _, want = _np_distortion(x.astype(np.float64), cb, weights)
        got = np.asarray(vq.assign(x, cb, weights=weights))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("d, c", [(1, 4), (2, 16), (3, 37), (8, 300)])
def test_lloyd_never_raises_the_distortion(d, c):
    rng = np.random.default_rng(d)
    x = jnp.asarray(rng.standard_normal((2000, d)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.2, 1.0, (2000, d)), jnp.float32)
    prev = np.inf
    for iters in (0, 1, 2, 5, 10):
        cb = vq.kmeans(x, c, weights=w, iters=iters, key=jax.random.key(3))
        assert cb.shape == (c, d)
        dist, _ = _np_distortion(np.asarray(x, np.float64), np.asarray(cb, np.float64), w)
        assert dist <= prev * (1 + 1e-5)
        prev = dist


def test_kmeans_plus_plus_seeding_beats_random_seeding_and_hits_the_lloyd_max_mse():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((20000, 1)), jnp.float32)
    # 4-level Lloyd-Max quantizer of N(0, 1): MSE 0.1175.
    cb = vq.kmeans(x, 4, iters=50)
    assert float(vq.distortion(x, cb)) == pytest.approx(0.1175, rel=0.02)
    seeded = float(vq.distortion(x, vq.kmeans(x, 64, iters=0)))
    rand = np.mean(
        [float(vq.distortion(x, x[np.random.default_rng(s).choice(20000, 64)])) for s in range(3)]
    )
    assert seeded < rand
    # Seeding in rounds (C > SEED_ROUNDS) still gives distinct centroids.
    big = vq.kmeans(x.reshape(-1, 2), 600, iters=0)
    assert len(np.unique(np.asarray(big), axis=0)) == 600


def test_kmeans_rejects_bad_arguments():
    x = jnp.zeros((10, 2))
    with pytest.raises(ValueError, match="num_clusters"):
        vq.kmeans(x, 11)
    with pytest.raises(ValueError, match="num_clusters"):
        vq.kmeans(x, 0)
    with pytest.raises(ValueError, match="weights"):
        vq.kmeans(x, 2, weights=jnp.ones((10, 3)))
    with pytest.raises(ValueError, match="x"):
        vq.kmeans(jnp.zeros((10,)), 2)
    with pytest.raises(ValueError, match="iters"):
        vq.kmeans(x, 2, iters=-1)


def test_rotation_is_orthogonal_and_folds_into_the_activations():
    k, n = 96, 40  # blocks of 32 and 8
    key = jax.random.key(0)
    w = jax.random.normal(key, (k, n))
    s_in = rotation.unpack_signs(rotation.random_signs(jax.random.key(1), k), k)
    s_out = rotation.unpack_signs(rotation.random_signs(jax.random.key(2), n), n)
    wr = rotation.rotate_weight(w, s_in, s_out)
    np.testing.assert_allclose(rotation.unrotate_weight(wr, s_in, s_out), w, atol=1e-5)
    np.testing.assert_allclose(jnp.sum(wr**2), jnp.sum(w**2), rtol=1e-5)
    x = jax.random.normal(jax.random.key(3), (5, k))
    y = rotation.rotate_output(rotation.rotate_input(x, s_in) @ wr, s_out)
    np.testing.assert_allclose(y, x @ w, atol=1e-4)
    # The rotated Hessian keeps tr(ΔᵀHΔ).
    a = jax.random.normal(jax.random.key(4), (k, k))
    h = a @ a.T
    d = jax.random.normal(jax.random.key(5), (k, n))
    dr = rotation.rotate_weight(d, s_in, s_out)
    hr = rotation.rotate_hessian(h, s_in)
    np.testing.assert_allclose(jnp.sum(dr * (hr @ dr)), jnp.sum(d * (h @ d)), rtol=1e-4)
    bits = jnp.asarray(np.random.default_rng(0).integers(0, 2, 13), bool)
    np.testing.assert_array_equal(
        rotation.unpack_signs(rotation.pack_signs(bits), 13), np.where(bits, -1.0, 1.0)
    )
    assert rotation.hadamard_block(192) == 64 and rotation.hadamard_block(7) == 1


RECIPES = {
    "kmeans_d4_b8": VQ(format=KMeans(4, 8)),
    "kmeans_d2_b4_g32": VQ(format=KMeans(2, 4), group_size=32),
    "kmeans_d1_b3_rht": VQ(format=KMeans(1, 3), rotate=True),
    "kmeans_d4_b9_cb2": VQ(format=KMeans(4, 9, iters=3), codebook_groups=2),
    "e8p2": VQ(format=E8P(2)),
    "e8p3_rht_g64": VQ(format=E8P(3), rotate=True, group_size=64),
    "e8p4": VQ(format=E8P(4)),
    "pvq_n8_k6_b1": VQ(format=PyramidVQ(8, 6, 1)),
    "pvq_n4_k7_b2_rht_g32": VQ(format=PyramidVQ(4, 7, 2), rotate=True, group_size=32),
    "pvq_n8_k13_b2": VQ(format=PyramidVQ(8, 13, 2)),  # 24-bit codes: no lookup table
    "trellis2_t64_rht": VQ(format=Trellis(2, 64), rotate=True),
    "trellis3_t32_g128": VQ(format=Trellis(3, 32), group_size=128),
}


def _np_trellis(words, bits, length):
    """[..., T] values of tail-biting bitshift-trellis streams (bytes, little-endian uint16
    words, stream bit p = bit 15 - p % 16 of word p // 16), by the 1MAD code in numpy."""
    w16 = words[..., 0::2] + 256 * words[..., 1::2]  # [..., T*bits/16]
    p = np.arange(16 * w16.shape[-1])
    stream = (w16[..., p // 16] >> (15 - p % 16)) & 1  # [..., T*bits]
    out = np.zeros(words.shape[:-1] + (length,))
    for t in range(length):
        pos = (np.arange((t + 1) * bits - 16, (t + 1) * bits)) % (bits * length)
        state = np.sum(stream[..., pos] << np.arange(15, -1, -1), axis=-1).astype(np.uint64)
        x = (np.uint64(34038481) * state + np.uint64(76625530)) % np.uint64(2**32)
        byte_sum = sum((x >> np.uint64(8 * i)) & np.uint64(255) for i in range(4))
        out[..., t] = (byte_sum.astype(np.float64) - 510) / 147.800537109375
    return out * trellis.gaussian_scale(bits)


def _np_vectors(q):
    """[K/d, N, d] float64 from the codes' bytes and numpy tables (the equation, in numpy)."""
    words = np.asarray(q.code_words(), np.int64)  # [K/d, N, B]
    fmt, n = q.format, q.matrix_shape[1]
    if isinstance(fmt, KMeans):
        idx = words[..., 0] + (256 * words[..., 1] if words.shape[-1] > 1 else 0)
        cols = n // q.codebook_groups
        cb = np.asarray(q.codebook, np.float64)
        return np.stack([cb[c // cols][idx[:, c]] for c in range(n)], axis=1)
    if isinstance(fmt, Trellis):
        return _np_trellis(words, fmt.bits, fmt.length)
    if isinstance(fmt, PyramidVQ):
        word = sum(words[..., i] << (8 * i) for i in range(words.shape[-1]))
        v = pyramid.pvq_count(fmt.vector_dim, fmt.pulses)
        y = np.asarray(
            pyramid.pvq_decode(jnp.asarray(word % v, jnp.uint32), fmt.vector_dim, fmt.pulses)
        )
        levels = pyramid.gain_codebook(fmt.vector_dim, fmt.pulses, fmt.gain_bits)
        u = y / np.linalg.norm(y, axis=-1, keepdims=True)
        return levels[word // v][..., None] * u
    tables = e8p.residual_codebooks(fmt.bits)
    widths = {2: (2,), 3: (2, 1), 4: (2, 2)}[fmt.bits]
    out, i = 0.0, 0
    for table, width in zip(tables, widths, strict=True):
        idx = words[..., i] + (256 * words[..., i + 1] if width == 2 else 0)
        out = out + np.asarray(table, np.float64)[idx]
        i += width
    return out


# In the slow run, each covered by faster cases: d = 4 k-means lookups by kmeans_d4_b9_cb2; PVQ's
# equation by the two n = 8 cases, rotation and groups by the k-means, E8P and trellis cases.
_SLOW_RECIPES = ("kmeans_d4_b8", "pvq_n4_k7_b2_rht_g32")


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_RECIPES else n for n in RECIPES],
)
def test_vqarray_dequantizes_by_its_equation_and_its_matmul_matches(name):
    recipe = RECIPES[name]
    k, n = 256, 24
    w = jax.random.normal(jax.random.key(0), (k, 4, n // 4)) * 0.1
    q = quantize(w, recipe)
    fmt = recipe.format
    d = fmt.vector_dim
    # The equation, in numpy: w' = Σ_stages table[idx] * scale, then the rotation.
    v = _np_vectors(q)  # [K/d, N, d]
    wr = v.transpose(0, 2, 1).reshape(k, n)
    g = recipe.group_size or k
    wr = wr * np.repeat(np.asarray(q.scale), g, axis=0)
    if recipe.rotate:
        wr = np.asarray(rotation.unrotate_weight(jnp.asarray(wr), *q.signs()))
    np.testing.assert_allclose(q.dequantize().reshape(k, n), wr, rtol=1e-5, atol=1e-6)
    assert q.shape == w.shape and q.dequantize().dtype == w.dtype
    # bits/weight counts codes, scales, codebook and signs.
    bits = fmt.code_bits or 8 * fmt.code_bytes
    expect = (k // d) * n * bits / 8
    if fmt.code_bits:
        expect = (k // d) * -(-n * bits // 8)
    expect += q.scale.size * 4 + (0 if q.codebook is None else q.codebook.size * 4)
    if recipe.rotate:
        expect += rotation.signs_nbytes(k, n)
    assert q.nbytes == expect
    # Quantization helps: relative error well below 1.
    err = float(jnp.sum((q.dequantize() - w) ** 2) / jnp.sum(w**2))
    assert err < 0.35
    x = jax.random.normal(jax.random.key(1), (3, 5, k))
    want = jnp.einsum("abk,kn->abn", x, q.dequantize().reshape(k, n)).reshape(3, 5, 4, n // 4)
    np.testing.assert_allclose(x @ q, want, rtol=2e-4, atol=2e-4)
    if fmt.vector_dim >= 2 and getattr(fmt, "index_bits", 8) >= 4:
        # The Pallas kernel in interpret mode, under jit (tables are built while tracing).
        with kernel_options(interpret=True):
            got = jax.jit(lambda x, q: x @ q)(x, q)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_refit_scale_never_raises_the_error():
    w = jax.random.normal(jax.random.key(0), (128, 64)) * jnp.linspace(0.1, 2.0, 64)
    for fmt in (KMeans(2, 4), KMeans(4, 8)):
        a = quantize(w, VQ(format=fmt, refit_scale=False)).dequantize()
        b = quantize(w, VQ(format=fmt)).dequantize()
        assert jnp.sum((b - w) ** 2) <= jnp.sum((a - w) ** 2) * (1 + 1e-6)


def test_importance_weighting_lowers_the_weighted_error():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((256, 32)), jnp.float32)
    h = jnp.asarray(np.exp(rng.standard_normal(256) * 1.5), jnp.float32)
    recipe = VQ(format=KMeans(2, 6))

    def weighted(q):
        return float(jnp.sum(h[:, None] * (q.dequantize() - w) ** 2))

    encode = vqarray_lib.encode_weight
    weighted_q = encode(w, h, None, quantizer=recipe)
    assert weighted(weighted_q) < weighted(encode(w, None, None, quantizer=recipe))
    np.testing.assert_array_equal(  # without importance, encode_weight is quantize's RTN
        encode(w, None, None, quantizer=recipe).codes, quantize(w, recipe).codes
    )


def test_vector_quantizers_and_quantize_reject_bad_arguments():
    with pytest.raises(ValueError, match="vector_dim"):
        KMeans(9, 8)
    with pytest.raises(ValueError, match="index_bits"):
        KMeans(4, 17)
    with pytest.raises(ValueError, match="group_size"):
        VQ(format=KMeans(4, 8), group_size=6)
    with pytest.raises(ValueError, match="qat"):
        VQ(format=KMeans(4, 8), qat="lsq")
    with pytest.raises(TypeError, match="VectorFormat"):
        VQ(format="kmeans")
    w = jnp.ones((30, 8))
    with pytest.raises(ValueError, match="vector_dim"):
        quantize(w, VQ(format=KMeans(4, 4)))
    with pytest.raises(ValueError, match="codebook_groups"):
        quantize(jnp.ones((32, 9)), VQ(format=KMeans(4, 2), codebook_groups=2))
    with pytest.raises(ValueError, match="codewords"):
        quantize(jnp.ones((32, 8)), VQ(format=KMeans(4, 8)))
    with pytest.raises(ValueError, match="codebook"):
        quantize(jnp.ones((32, 8)), VQ(format=KMeans(4, 2)), learned={"codebook": jnp.ones(8)})
    with pytest.raises(ValueError, match="weight"):
        quantize(jnp.ones((32,)), VQ(format=KMeans(4, 2)))
    with pytest.raises(ValueError, match="axis 0"):
        quantize(jnp.ones((32, 8)), VQ(format=KMeans(4, 2)), axis=1)
    with pytest.raises(ValueError, match="vector quantizers quantize weights"):
        QuantRule(".*", act=VQ(format=KMeans(4, 2)))
    with pytest.raises(ValueError, match="qat"):  # was TensorQuant(format=VQ(...), lsq=True)
        VQ(format=KMeans(4, 2), qat="lsq")


def _dequantized(params, quant):
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, q in traverse_util.flatten_dict(
        quant, sep="/", is_leaf=lambda _, x: isinstance(x, vq.VQArray)
    ).items():
        flat[path] = q.dequantize(jnp.float32).reshape(flat[path].shape)
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.mark.parametrize(
    "recipe",
    [
        RECIPES["kmeans_d4_b8"],
        # rotated: its matmul is test_vqarray_dequantizes_by_its_equation_and_its_matmul_matches'
        pytest.param(VQ(format=KMeans(2, 4), rotate=True), marks=pytest.mark.slow),
    ],
)
def test_served_vq_model_goes_through_codebook_matmul_and_equals_dequantized(
    llama, recipe, monkeypatch
):
    model, params, tokens = llama
    rules = (QuantRule(".*", weight=recipe),)
    quant, report = freeze(model, params, tokens, rules=rules)
    assert len(report.weights) == 7 and all(r.quantizer == recipe.name for r in report.weights)
    calls = []
    real = vqarray_lib.codebook_matmul

    def spy(*args, **kwargs):
        calls.append(kwargs["vector_dim"])
        return real(*args, **kwargs)

    monkeypatch.setattr(vqarray_lib, "codebook_matmul", spy)
    served = model.clone(quant=QuantConfig(mode="serve", rules=rules))
    variables = {"params": serving_params(params, quant), "quant": quant}
    with kernel_options(interpret=True):
        got = jax.jit(served.apply)(variables, tokens)
    want = model.apply({"params": _dequantized(params, quant)}, tokens)
    assert calls == [recipe.format.vector_dim] * 7
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # QAT with the straight-through VQ gives the same forward values as the frozen weights,
    # and gradients flow to every float weight.
    qat = model.clone(quant=QuantConfig(mode="qat", rules=rules))
    np.testing.assert_allclose(qat.apply({"params": params}, tokens), want, rtol=1e-4, atol=1e-4)
    grads = jax.grad(lambda p: jnp.sum(qat.apply({"params": p}, tokens) ** 2))(params)
    assert all(float(jnp.sum(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_dkm_qat_learns_a_codebook_param_that_freeze_serves(llama):
    model, params, tokens = llama
    recipe = VQ(format=KMeans(2, 4), qat="dkm", dkm_temperature=0.02)
    rules = (QuantRule("mlp", weight=recipe),)
    qat = model.clone(quant=QuantConfig(mode="qat", rules=rules))
    variables = qat.init(jax.random.key(1), tokens)
    p = nn.unbox(variables["params"])
    flat = traverse_util.flatten_dict(p, sep="/")
    books = {k: v for k, v in flat.items() if k.endswith("kernel_codebook")}
    assert sorted(books) == [f"layers_0/mlp/{n}/kernel_codebook" for n in ("down", "gate", "up")]
    assert all(v.shape == (1, 16, 2) for v in books.values())

    def loss(p):
        return jnp.mean(qat.apply({"params": p}, tokens) ** 2)

    grads = traverse_util.flatten_dict(jax.grad(loss)(p), sep="/")
    for k in books:
        assert float(jnp.sum(jnp.abs(grads[k]))) > 0  # the codebook learns
        assert float(jnp.sum(jnp.abs(grads[k.replace("_codebook", "")]))) > 0
    # Freeze assigns each vector to the nearest codeword of DKM's codebook.
    quant, _ = freeze(qat, p, tokens, rules=rules)
    q = quant["layers_0"]["mlp"]["up"]["kernel"]
    w2 = p["layers_0"]["mlp"]["up"]["kernel"]
    want_cb = [
        vq.dkm.dkm_codebook(
            vqarray_lib.vectors(w2 / vqarray_lib.group_rms_scale(w2, recipe), 2).reshape(-1, 2),
            books["layers_0/mlp/up/kernel_codebook"][0],
            temperature=recipe.dkm_temperature,
            iters=recipe.dkm_iters,
        )
    ]
    np.testing.assert_allclose(q.codebook, np.stack(want_cb), rtol=1e-6)
    served = qat.clone(quant=QuantConfig(mode="serve", rules=rules))
    got = served.apply({"params": serving_params(p, quant), "quant": quant}, tokens)
    want = model.apply({"params": _dequantized(p, quant)}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Near zero temperature (and without the scale refit) the soft forward is the hard one.
    cold = VQ(format=KMeans(2, 4), qat="dkm", dkm_temperature=1e-5, refit_scale=False)
    rules = (QuantRule("mlp", weight=cold),)
    qat = model.clone(quant=QuantConfig(mode="qat", rules=rules))
    quant, _ = freeze(qat, p, tokens, rules=rules)
    want = model.apply({"params": _dequantized(p, quant)}, tokens)
    np.testing.assert_allclose(qat.apply({"params": p}, tokens), want, rtol=1e-4, atol=1e-4)


def test_vector_quantizer_names_parse_back_and_the_ptq_cli_takes_them():
    from jaxquant.eval.rate_distortion import VQ_METHODS
    from jaxquant.train.ptq import ptq_rules

    for name in VQ_METHODS + ("kmeans_d4_b8_rht_g64_cb2", "kmeans_d2_b4_dkm", "e8p2_rht"):
        recipe = get_quantizer(name)
        assert isinstance(recipe, VQ)
        assert recipe.name == name and get_quantizer(recipe.name) == recipe
    (rule,) = ptq_rules("e8p3_rht", group_size=64)
    assert rule.weight == VQ(format=E8P(3), rotate=True, group_size=64)
    with pytest.raises(ValueError, match="no family matches"):
        get_quantizer("lattice9")


# (quantizer, its name): every option of the vector name grammar, alone and combined.
OPTION_NAMES = [
    (VQ(KMeans(4, 8), rotate=True, group_size=64, codebook_groups=2), "kmeans_d4_b8_rht_g64_cb2"),
    (
        VQ(KMeans(2, 4), qat="dkm", dkm_temperature=0.02, dkm_iters=3),
        "kmeans_d2_b4_dkm_dkmt0.02_dkmi3",
    ),
    (
        VQ(KMeans(2, 4), qat="dkm", dkm_temperature=1e-5, dkm_iters=0),
        "kmeans_d2_b4_dkm_dkmt1e-05_dkmi0",
    ),
    (VQ(KMeans(1, 3), dkm_temperature=2e16), "kmeans_d1_b3_dkmt2e+16"),
    (VQ(KMeans(2, 6, iters=7)), "kmeans_d2_b6_it7"),
    (
        VQ(KMeans(1, 3, iters=20), group_size=16, codebook_groups=4, seed=3, refit_scale=False),
        "kmeans_d1_b3_it20_g16_cb4_seed3_norefit",
    ),
    (VQ(E8P(3), rotate=True, seed=5, refit_scale=False), "e8p3_rht_seed5_norefit"),
    (VQ(PyramidVQ(4, 7, 2), group_size=32), "pvq_n4_k7_b2_g32"),
    (VQ(Trellis(3, 64), rotate=True, group_size=128), "trellis3_t64_rht_g128"),
]


@pytest.mark.parametrize("quantizer,name", OPTION_NAMES, ids=[n for _, n in OPTION_NAMES])
def test_names_with_every_option_parse_back(quantizer, name):
    assert quantizer.name == name
    assert get_quantizer(name) == quantizer
    assert get_quantizer(name.upper()) == quantizer  # names are case-insensitive


@pytest.mark.parametrize(
    "name,match",
    [
        ("e8p2_rht_bogus", "'bogus'"),
        ("kmeans_d2_b4_seedx", "'seedx'"),
        ("kmeans_d2_b4_g", "'g'"),
        ("kmeans_d2_b4_dkmi-1", "'dkmi-1'"),
        ("kmeans_d2_b4_dkmt1e-", "'dkmt1e-'"),
        ("kmeans_d2_b4_dkmt.", "'dkmt.'"),
        ("kmeans_d4_b8_g6", "group_size=6"),
        ("kmeans_d2_b4_cb0", "codebook_groups=0"),
        ("e8p2_cb2", "codebook_groups=2"),
        ("e8p2_dkm", "qat='dkm'"),
        ("kmeans_d2_b4_dkm_rht", "rotate=True"),
        ("kmeans_d2_b4_dkmt0", "dkm_temperature=0.0"),
        ("kmeans_d9_b8", "vector_dim=9"),
        ("e8p5", "bits=5"),
        ("trellis2_t20", "length=20"),
    ],
)
def test_bad_vector_names_raise_naming_the_option(name, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        get_quantizer(name)


@pytest.mark.parametrize(
    "order", ["act", "babai", np.arange(64)[::-1]], ids=["act", "babai", "perm"]
)
def test_order_is_a_gptq_option_that_vector_quantizers_reject(order):
    w = jax.random.normal(jax.random.key(0), (64, 8))
    h = jnp.eye(64) * 2.0
    q = VQ(E8P(2))
    with pytest.raises(ValueError, match="GPTQ"):
        q.quantize(w, hessian=h, order=order)
    with pytest.raises(ValueError, match="GPTQ"):
        quantize(w, "kmeans_d2_b4", hessian=h, order=order)
    with pytest.raises(ValueError, match="GPTQ"):  # without a Hessian too
        q.quantize(w, order=order)
    assert q.quantize(w, hessian=h, order=None).shape == (64, 8)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("e8p2_rht", (128, 6, 4)),
        ("e8p3_rht_g64", (192, 20)),
        ("kmeans_d2_b6_g32", (128, 5, 3)),  # 6-bit codes packed 4 to 3 bytes, 15 columns: padded
        ("kmeans_d1_b3", (40, 13)),  # 3-bit codes packed 8 to 3 bytes
        ("kmeans_d2_b4_cb3", (64, 3, 4)),
        ("trellis2_t64", (128, 24)),
        ("pvq_n8_k6_b1", (64, 7)),
    ],
)
def test_bits_per_weight_of_a_shape_equals_the_quantized_tensors(name, shape):
    q = get_quantizer(name)
    w = jax.random.normal(jax.random.key(4), shape)
    assert q.bits_per_weight(shape) == quantize(w, q).bits_per_weight


def test_bits_per_weight_counts_every_stored_array():
    # kmeans_d2_b6_g32 on [128, 5, 3]: codes [64, 12] uint8 (15 six-bit codes in 4 units of
    # 3 bytes), scales [4, 15] f32, codebook [1, 64, 2] f32.
    nbytes = 64 * 12 + 4 * 15 * 4 + 64 * 2 * 4
    assert get_quantizer("kmeans_d2_b6_g32").bits_per_weight((128, 5, 3)) == 8 * nbytes / 1920
    # e8p2_rht on [128, 6, 4]: codes [16, 24, 2], scales [1, 24] f32, signs ceil(128/8) and
    # ceil(24/8) bytes.
    nbytes = 16 * 24 * 2 + 24 * 4 + 16 + 3
    assert get_quantizer("e8p2_rht").bits_per_weight((128, 6, 4)) == 8 * nbytes / (128 * 24)


def _layer_hessian(k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5 * k, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    return jnp.asarray(x.T @ x, jnp.float32)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("e8p2_rht", (64, 3, 8)),
        # the same reshaping as the other two: slow run
        pytest.param("kmeans_d2_b6", (48, 5, 3), marks=pytest.mark.slow),  # bit-packed codes
        pytest.param("kmeans_d2_b4_g16_cb3", (48, 3, 4), marks=pytest.mark.slow),
        ("pvq_n8_k6_b1_rht_g32", (64, 2, 5)),
    ],
)
def test_hessian_aware_vq_of_a_3d_weight_equals_havq_on_its_matrix(name, shape):
    k, n = shape[0], int(np.prod(shape[1:]))
    w = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    h = _layer_hessian(k, seed=1)
    q = get_quantizer(name)
    got = quantize(w, q, hessian=h)
    ref = vq.havq(w.reshape(k, n), h, q)
    assert isinstance(got, vq.VQArray) and got.shape == shape and got.dtype == w.dtype
    assert ref.shape == (k, n)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same codes, scales, ...
    np.testing.assert_array_equal(
        np.asarray(got.dequantize()).reshape(k, n), np.asarray(ref.dequantize())
    )
    # The Hessian matters: round to nearest picks other codes.
    assert not np.array_equal(np.asarray(got.codes), np.asarray(quantize(w, q).codes))


def _auto_mesh(shape, names):
    # Auto axes, as the trainer's mesh (nn.partitioning.make_mesh) has them.
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


# (quantizer name, weight shape, mesh shape, weight spec, codes split on K, codes split on N)
# Cases in the slow run repeat a layout another case covers (replicated, or the same split).
SHARDING_CASES = [
    pytest.param(  # bit-packed codes split on K: as the kmeans_d2_b6_rht case below
        *("kmeans_d2_b6", (512, 64), (8,), ("x", None), True, False), marks=pytest.mark.slow
    ),
    ("kmeans_d2_b6", (512, 64), (8,), (None, "x"), False, True),  # 8 codes: 6 bytes a device
    pytest.param(
        *("kmeans_d2_b6", (512, 64), (8,), (None, None), False, False), marks=pytest.mark.slow
    ),
    ("kmeans_d2_b6", (512, 24), (8,), (None, "x"), False, False),  # 3 codes: not whole bytes
    pytest.param(  # a 2-D mesh splitting K and N: as the kmeans_d2_b6_rht case below
        *("kmeans_d1_b3_g32", (512, 64), (2, 4), ("x", "y"), True, True), marks=pytest.mark.slow
    ),
    pytest.param(
        *("kmeans_d1_b3_g32", (512, 40), (2, 4), (("x", "y"), None), True, False),
        marks=pytest.mark.slow,
    ),
    pytest.param(  # rotated E8P split on K: as the 3-D case below
        *("e8p2_rht_g64", (512, 64), (8,), ("x", None), True, False), marks=pytest.mark.slow
    ),
    pytest.param(
        *("e8p2_rht_g64", (512, 64), (8,), (None, "x"), False, True), marks=pytest.mark.slow
    ),
    pytest.param(
        *("e8p2_rht_g64", (512, 64), (8,), (None, None), False, False), marks=pytest.mark.slow
    ),
    ("e8p2_rht_g64", (512, 3, 8), (8,), ("x", None, None), True, False),
    ("kmeans_d2_b6_rht", (512, 64), (2, 4), ("y", "x"), True, True),  # packed and rotated
    pytest.param(
        *("kmeans_d4_b8_cb2", (512, 64), (8,), (None, "x"), False, False), marks=pytest.mark.slow
    ),  # 4 columns of 32
    ("kmeans_d4_b8_cb2", (512, 64), (2, 4), (None, "x"), False, True),  # 32 columns of 32
    ("trellis2_t64", (512, 64), (8,), ("x", None), True, False),
    ("pvq_n8_k6_b1", (512, 40), (8,), (None, "x"), False, True),
]


@pytest.mark.parametrize("name,shape,mesh_shape,spec,on_k,on_n", SHARDING_CASES)
def test_vqarray_shardings_follow_the_weight_and_round_trip(
    name, shape, mesh_shape, spec, on_k, on_n
):
    mesh = _auto_mesh(mesh_shape, ("x", "y")[: len(mesh_shape)])
    w = jax.random.normal(jax.random.key(1), shape)
    q = quantize(w, get_quantizer(name))
    weight_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    shardings = q.shardings(weight_sharding)
    assert jax.tree.structure(shardings) == jax.tree.structure(q)
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in jax.tree.leaves(shardings))
    placed = jax.device_put(q, shardings)
    # The round trip is exact: the same static layout and bit-identical arrays.
    assert isinstance(placed, vq.VQArray)
    for field in ("shape", "dtype", "format", "group_size", "codebook_groups"):
        assert getattr(placed, field) == getattr(q, field)
    assert placed.rotated == q.rotated
    for leaf, orig, s in zip(
        jax.tree.leaves(placed), jax.tree.leaves(q), jax.tree.leaves(shardings), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(s, leaf.ndim)
        assert leaf.dtype == orig.dtype
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(orig))
    want = np.asarray(q.dequantize())
    np.testing.assert_array_equal(np.asarray(jax.device_get(placed).dequantize()), want)
    got = np.asarray(placed.dequantize())  # computed on the shards
    if q.rotated:  # the Hadamard transforms sum in another order over shards: f32, √K terms
        eps = np.finfo(np.float32).eps
        np.testing.assert_allclose(
            got, want, rtol=0, atol=8 * eps * np.sqrt(512) * np.abs(want).max()
        )
    else:  # lookups and scaling only: exact
        np.testing.assert_array_equal(got, want)
    # Whole vectors and scale groups per device along K; whole bytes and codebook groups along N.
    codes_spec = tuple(shardings.codes.spec) + (None,) * 3
    assert (codes_spec[0] is not None) == on_k, shardings.codes.spec
    assert (codes_spec[1] is not None) == on_n, shardings.codes.spec
    if on_k:
        assert codes_spec[0] == spec[0]
    if on_n:
        assert codes_spec[1] == spec[1] and shardings.scale.spec[1] == spec[1]
    for s in (shardings.codebook, shardings.signs_in, shardings.signs_out):
        assert s is None or s.is_fully_replicated


@pytest.mark.parametrize(
    "name",
    [
        "e8p2_rht",
        "e8p3_g64",
        pytest.param("kmeans_d2_b6", marks=pytest.mark.slow),  # k-means: as kmeans_d4_b8_cb2
        "kmeans_d4_b8_cb2",
        "pvq_n8_k6_b1",
        "trellis2_t64",
    ],
)
def test_the_matmul_of_a_vqarray_equals_the_dequantized_matmul(name):
    k = 256
    w = jax.random.normal(jax.random.key(2), (k, 5, 8))
    x = jax.random.normal(jax.random.key(3), (2, 7, k))
    q = quantize(w, get_quantizer(name))
    ref = np.einsum(
        "abk,kn->abn",
        np.asarray(x, np.float64),
        np.asarray(q.dequantize(), np.float64).reshape(k, 40),
    ).reshape(2, 7, 5, 8)
    atol = 2e-6 * np.sqrt(k) * np.abs(ref).max()
    got = x @ q
    assert got.shape == (2, 7, 5, 8) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=atol)
    with kernel_options(enabled=False):  # the dequantize-then-multiply path
        np.testing.assert_allclose(np.asarray(x @ q), ref, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda x, q: x @ q)(x, q)), ref, rtol=1e-5, atol=atol
    )
