"""The vector-quantized weight matmul: reference vs float64 numpy, kernels vs the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.codebook_matmul import (
    api,
    codebook_matmul,
    codebook_matmul_reference,
    dequantize_reference,
    gpu,
    reference,
    tpu,
)


def _problem_arrays(seed, k, n, *, vector_dim, index_bits, group_size, codebook_dtype=jnp.float32):
    """Random (indices, codebook, scales): every index drawn, scales of varied magnitude."""
    rng = np.random.default_rng(seed)
    groups = 1 if group_size is None else k // group_size
    indices = rng.integers(0, 2**index_bits, (k // vector_dim, n))
    codebook = rng.standard_normal((2**index_bits, vector_dim))
    scales = rng.uniform(0.25, 4.0, (groups, n))
    return (
        jnp.asarray(indices, reference.index_dtype(index_bits)),
        jnp.asarray(codebook, codebook_dtype),
        jnp.asarray(scales, jnp.float32),
    )


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _numpy_weight(indices, codebook, scales, vector_dim, group_size):
    """w [K, N] in float64 by loops over vectors and their elements (no reshapes)."""
    indices, codebook, scales = (np.asarray(a, np.float64) for a in (indices, codebook, scales))
    kv, n = indices.shape
    k = kv * vector_dim
    g = group_size or k
    w = np.zeros((k, n))
    for j in range(kv):
        for col in range(n):
            for i in range(vector_dim):
                row = j * vector_dim + i
                w[row, col] = codebook[int(indices[j, col]), i] * scales[row // g, col]
    return w


def _assert_close(y, expected, dtype, k):
    # Relative to the output's largest magnitude: float32 summation order (growing like
    # sqrt(K)), or for bfloat16 the rounding of the output and of the looked-up weight.
    y, expected = np.asarray(y, np.float64), np.asarray(expected, np.float64)
    eps = float(jnp.finfo(dtype).eps)
    peak = float(np.max(np.abs(expected), initial=0.0))
    factor = np.sqrt(k) if jnp.dtype(dtype) == jnp.float32 else 2.0
    np.testing.assert_allclose(y, expected, rtol=0, atol=eps * factor * peak)


@pytest.mark.parametrize(
    "vector_dim,index_bits,group_size",
    [(2, 4, None), (4, 8, 8), (8, 6, 16), (3, 12, 6), (8, 16, None)],
)
def test_reference_equals_float64_numpy_construction(vector_dim, index_bits, group_size):
    k, n = 48, 5
    indices, codebook, scales = _problem_arrays(
        index_bits,
        k,
        n,
        vector_dim=vector_dim,
        index_bits=index_bits,
        group_size=group_size,
    )
    kwargs = dict(vector_dim=vector_dim, index_bits=index_bits, group_size=group_size)
    w = _numpy_weight(indices, codebook, scales, vector_dim, group_size)
    np.testing.assert_allclose(
        dequantize_reference(indices, codebook, scales, **kwargs), w, rtol=1e-6, atol=0
    )
    for m in (1, 7):
        x = _normal(m, (m, k))
        y = codebook_matmul_reference(x, indices, codebook, scales, **kwargs)
        assert y.shape == (m, n) and y.dtype == jnp.float32
        _assert_close(y, np.asarray(x, np.float64) @ w, jnp.float32, k)


def test_reference_takes_bfloat16_activations_and_out_dtype():
    kwargs = dict(vector_dim=4, index_bits=8, group_size=32)
    indices, codebook, scales = _problem_arrays(1, 64, 24, codebook_dtype=jnp.bfloat16, **kwargs)
    x = _normal(2, (5, 64), jnp.bfloat16)
    y = codebook_matmul_reference(x, indices, codebook, scales, **kwargs)
    assert y.dtype == jnp.bfloat16
    y32 = codebook_matmul_reference(x, indices, codebook, scales, out_dtype=jnp.float32, **kwargs)
    w = _numpy_weight(indices, codebook, scales, 4, 32)
    _assert_close(y32, np.asarray(x, np.float64) @ w, jnp.float32, 64)
    np.testing.assert_array_equal(y, y32.astype(jnp.bfloat16))


def test_default_path_on_cpu_is_the_reference():
    kwargs = dict(vector_dim=4, index_bits=8, group_size=None)
    indices, codebook, scales = _problem_arrays(3, 64, 40, **kwargs)
    x = _normal(4, (3, 64))
    np.testing.assert_array_equal(
        codebook_matmul(x, indices, codebook, scales, **kwargs),
        codebook_matmul_reference(x, indices, codebook, scales, **kwargs),
    )


def test_interpret_runs_the_gpu_kernel_above_the_tpu_kernels_index_bits():
    kwargs = dict(vector_dim=8, index_bits=tpu.MAX_INDEX_BITS + 1, group_size=None)
    indices, codebook, scales = _problem_arrays(5, 32, 24, **kwargs)
    x = _normal(6, (3, 32))
    p = reference.check_args(x, indices, codebook, scales, **kwargs)
    assert not tpu.supports(p) and api._pick(None, True, p) == "gpu"
    y = codebook_matmul(x, indices, codebook, scales, interpret=True, **kwargs)
    _assert_close(
        y, codebook_matmul_reference(x, indices, codebook, scales, **kwargs), jnp.float32, 32
    )


# (vector_dim, index_bits, group_size, K): N = 160 and M = 33 with the test tiles below span
# several M and N tiles with a ragged last one. On TPU, vector_dim 2 gives several K tiles
# (both paths, and groups spanning two K tiles); on GPU every K is walked in steps of 64 rows
# with a ragged last step where K is not a multiple of 64.
_CASES = [
    (2, 4, None, 512),
    (2, 8, 8, 512),
    (2, 5, 512, 1024),
    (4, 4, 16, 96),
    (4, 8, None, 96),
    (8, 4, 32, 96),
    (8, 8, 8, 96),
    (3, 6, 12, 96),
    (5, 7, None, 80),
    (4, 10, 32, 128),
]
_GPU_ONLY_CASES = [(8, 16, None, 96), (6, 12, 24, 96)]


class TestTPUKernel:
    """Compiled on the kernel's own backend (skipped elsewhere); the subclasses interpret it."""

    IMPLEMENTATION = "tpu"
    BACKENDS = ("tpu",)
    INTERPRET = False
    BLOCKS = dict(block_m=16, block_n=128, block_k=256)  # small tiles: several per test shape

    def setup_method(self):
        if not self.INTERPRET and jax.default_backend() not in self.BACKENDS:
            pytest.skip(f"needs a {self.IMPLEMENTATION} backend")

    def _matmul(self, x, indices, codebook, scales, **kwargs):
        return codebook_matmul(
            x,
            indices,
            codebook,
            scales,
            implementation=self.IMPLEMENTATION,
            interpret=self.INTERPRET,
            **kwargs,
        )

    def _check(self, x, indices, codebook, scales, kwargs, **blocks):
        y = self._matmul(x, indices, codebook, scales, **kwargs, **blocks)
        expected = codebook_matmul_reference(x, indices, codebook, scales, **kwargs)
        assert y.shape == expected.shape and y.dtype == expected.dtype
        _assert_close(y, expected, x.dtype, x.shape[1])

    @pytest.mark.parametrize("case", _CASES + _GPU_ONLY_CASES, ids=str)
    def test_matches_reference(self, case):
        vector_dim, index_bits, group_size, k = case
        if self.IMPLEMENTATION == "tpu" and index_bits > tpu.MAX_INDEX_BITS:
            pytest.skip(f"the TPU kernel takes index_bits <= {tpu.MAX_INDEX_BITS}")
        kwargs = dict(vector_dim=vector_dim, index_bits=index_bits, group_size=group_size)
        arrays = _problem_arrays(100 * vector_dim + index_bits, k, 160, **kwargs)
        self._check(_normal(7, (33, k)), *arrays, kwargs, **self.BLOCKS)

    @pytest.mark.parametrize("m,dtype", [(1, jnp.float32), (7, jnp.bfloat16)])
    def test_decode_rows_with_default_tiles(self, m, dtype):
        kwargs = dict(vector_dim=4, index_bits=8, group_size=64)
        arrays = _problem_arrays(m, 256, 200, **kwargs)
        self._check(_normal(m, (m, 256), dtype), *arrays, kwargs)

    def test_bfloat16_codebook_and_activations_with_float32_output(self):
        kwargs = dict(vector_dim=2, index_bits=4, group_size=None)
        arrays = _problem_arrays(8, 64, 48, codebook_dtype=jnp.bfloat16, **kwargs)
        x = _normal(9, (9, 64), jnp.bfloat16)
        y = self._matmul(x, *arrays, out_dtype=jnp.float32, **kwargs)
        expected = codebook_matmul_reference(x, *arrays, out_dtype=jnp.float32, **kwargs)
        assert y.dtype == jnp.float32
        _assert_close(y, expected, jnp.bfloat16, 64)

    def test_only_the_low_index_bits_are_read(self):
        # Indices (10 bits for the TPU kernel, 12 for the GPU kernel) stored with random high
        # bits in their uint16: the same product as without (and no read outside the codebook).
        kwargs = dict(vector_dim=4, index_bits=10 if self.IMPLEMENTATION == "tpu" else 12)
        indices, codebook, scales = _problem_arrays(10, 64, 40, group_size=None, **kwargs)
        high = np.random.default_rng(11).integers(0, 2**16, indices.shape) >> kwargs["index_bits"]
        noisy = jnp.asarray(np.asarray(indices) | (high << kwargs["index_bits"]), jnp.uint16)
        x = _normal(12, (5, 64))
        y = self._matmul(x, noisy, codebook, scales, **kwargs)
        _assert_close(
            y, codebook_matmul_reference(x, indices, codebook, scales, **kwargs), jnp.float32, 64
        )

    @pytest.mark.parametrize("group_size", [None, 16])
    def test_zero_and_extreme_scales(self, group_size):
        # Columns of scales near 1e-30, 1 and 1e30, and in every 4th column an all-zero group in
        # the middle (grouped) or a zero scale (per channel). Each output column has one
        # magnitude, so it is compared relative to its own peak.
        k, n = 96, 48
        kwargs = dict(vector_dim=4, index_bits=6, group_size=group_size)
        indices, codebook, _ = _problem_arrays(13, k, n, **kwargs)
        rng = np.random.default_rng(14)
        groups = 1 if group_size is None else k // group_size
        exponent = np.tile([-100, 0, 100], n // 3)  # per column: 2**-100 ~ 7.9e-31
        scales = jnp.asarray(rng.uniform(1.0, 2.0, (groups, n)) * 2.0**exponent, jnp.float32)
        if group_size is not None:
            scales = scales.at[1, ::4].set(0)
        else:
            scales = scales.at[0, ::4].set(0)
        x = _normal(15, (7, k))
        y = np.asarray(self._matmul(x, indices, codebook, scales, **kwargs), np.float64)
        expected = codebook_matmul_reference(x, indices, codebook, scales, **kwargs)
        expected = np.asarray(expected, np.float64)
        assert np.all(np.isfinite(y))
        column_scale = 2.0**exponent
        _assert_close(y / column_scale, expected / column_scale, jnp.float32, k)


class TestTPUKernelInterpret(TestTPUKernel):
    INTERPRET = True


class TestGPUKernel(TestTPUKernel):
    IMPLEMENTATION = "gpu"
    BACKENDS = ("gpu", "cuda", "rocm")
    BLOCKS = dict(block_m=16, block_n=64, block_k=64)


class TestGPUKernelInterpret(TestGPUKernel):
    INTERPRET = True


def _problem(m=8, k=512, n=512, vector_dim=4, index_bits=8, group_size=128):
    x, indices, codebook, scales = reference.arg_specs(
        m, k, n, vector_dim=vector_dim, index_bits=index_bits, group_size=group_size
    )
    return reference.check_args(
        x,
        indices,
        codebook,
        scales,
        vector_dim=vector_dim,
        index_bits=index_bits,
        group_size=group_size,
    )


@pytest.mark.parametrize(
    "k,vector_dim,group_size,block_k,expected",
    [
        (512, 4, 128, 512, (128, "group", 4)),  # K fits one tile: all of it
        (4096, 4, None, 512, (128, "tile", 1)),  # per output channel
        (4096, 2, 1024, 512, (256, "tile", 1)),  # groups of two tiles
        (4096, 4, 32, 512, (128, "group", 16)),  # 16 groups of 8 vectors per tile
        (4096, 2, 16, 1024, (512, "group", 64)),
        (4096, 8, 256, 512, (256, "group", 8)),  # 8 scale rows: 256 vectors, past the limit
        (6144, 4, 192, 512, (384, "group", 8)),  # groups of 48 vectors, 8 per tile
        (3000, 3, None, 512, (1000, "tile", 1)),  # no multiple of 128 divides K / d: all of it
    ],
)
def test_tpu_k_tiles(k, vector_dim, group_size, block_k, expected):
    p = _problem(k=k, vector_dim=vector_dim, group_size=group_size)
    t = tpu.tiles(p, jnp.float32, block_m=256, block_n=512, block_k=block_k)
    assert (t.block_vectors, t.path, t.scale_rows) == expected


def test_tpu_and_gpu_tiles_clamp_small_problems():
    p = _problem(m=1, k=96, n=80, group_size=32)
    t = tpu.tiles(p, jnp.bfloat16, block_m=256, block_n=512, block_k=512)
    assert (t.block_m, t.padded_m, t.block_n, t.block_vectors) == (16, 16, 80, 24)
    g = gpu.tiles(p, block_m=64, block_n=128, block_k=64)
    assert (g.block_m, g.block_n, g.block_k, g.path) == (16, 128, 64, "gather")
    g = gpu.tiles(_problem(group_size=128), block_m=64, block_n=128, block_k=64)
    assert g.path == "tile"


def _lowering_case(vector_dim, index_bits, m):
    """Arguments of a K = N = 512 call (K = 128 * d where d does not divide 512); grouped
    scales (groups of 32 vectors) for even index_bits, per channel for odd; float32
    activations for decode, bfloat16 for prefill; a bfloat16 codebook for even vector_dim."""
    k = 512 if 512 % vector_dim == 0 else 128 * vector_dim
    group_size = 32 * vector_dim if index_bits % 2 == 0 else None
    specs = reference.arg_specs(
        m,
        k,
        512,
        vector_dim=vector_dim,
        index_bits=index_bits,
        group_size=group_size,
        x_dtype=jnp.float32 if m == 8 else jnp.bfloat16,
        codebook_dtype=jnp.bfloat16 if vector_dim % 2 == 0 else jnp.float32,
    )
    kwargs = dict(vector_dim=vector_dim, index_bits=index_bits, group_size=group_size)
    return specs, kwargs


def _lowering_grid(index_bits):
    """(vector_dim, index_bits, m) for every vector_dim × index_bits × m. The default run
    keeps a third of them (every vector_dim with every m, and every index_bits with every m,
    several times each: what the kernels' code depends on); the slow run lowers them all."""
    return [
        pytest.param(d, b, m, marks=() if (d + b + (m == 256)) % 3 == 0 else pytest.mark.slow)
        for d in reference.VECTOR_DIMS
        for b in index_bits
        for m in (8, 256)
    ]


@pytest.mark.parametrize(
    "vector_dim,index_bits,m", _lowering_grid(range(4, tpu.MAX_INDEX_BITS + 1))
)
def test_tpu_kernel_lowers_for_tpu(vector_dim, index_bits, m):
    specs, kwargs = _lowering_case(vector_dim, index_bits, m)
    blocks = dict(block_m=api.TPU_BLOCK_M, block_n=api.TPU_BLOCK_N, block_k=api.TPU_BLOCK_K)
    f = lambda *args: tpu.codebook_matmul_tpu(*args, **kwargs, **blocks)
    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*specs)
    assert exported.mlir_module().count("tpu_custom_call") == 1


@pytest.mark.parametrize("vector_dim,index_bits,m", _lowering_grid(reference.INDEX_BITS))
def test_gpu_kernel_lowers_for_cuda(vector_dim, index_bits, m):
    specs, kwargs = _lowering_case(vector_dim, index_bits, m)
    blocks = dict(block_m=api.GPU_BLOCK_M, block_n=api.GPU_BLOCK_N, block_k=api.GPU_BLOCK_K)
    f = lambda *args: gpu.codebook_matmul_gpu(*args, **kwargs, **blocks)
    exported = jax.export.export(
        jax.jit(f),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*specs)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 1


def _call(**changes):
    """codebook_matmul on a valid problem (K=64, N=24, 8-bit indices of 4-vectors, groups of
    32), with changes."""
    args = dict(
        x=jnp.ones((4, 64)),
        indices=jnp.zeros((16, 24), jnp.uint8),
        codebook=jnp.zeros((256, 4)),
        scales=jnp.ones((2, 24)),
        vector_dim=4,
        index_bits=8,
        group_size=32,
    )
    args.update(changes)
    return lambda: codebook_matmul(**args)


@pytest.mark.parametrize(
    "call,message",
    [
        (
            _call(x=jnp.ones((4, 66))),
            r"x: K=66 \(x's last axis\) must be a multiple of vector_dim=4",
        ),
        (
            _call(group_size=6),
            r"group_size=6: expected None or a multiple of vector_dim=4 dividing",
        ),
        (_call(group_size=24), r"group_size=24: expected None or a multiple of vector_dim=4 divid"),
        (_call(group_size=0), r"group_size=0: expected None or a multiple"),
        (_call(indices=jnp.zeros((16, 24), jnp.uint16)), r"indices: expected uint8 \[16, N\]"),
        (_call(indices=jnp.zeros((16, 24), jnp.int32)), r"indices: expected uint8 .*got int32"),
        (_call(indices=jnp.zeros((32, 24), jnp.uint8)), r"indices: expected .*got uint8 \(32, 24"),
        (_call(indices=jnp.zeros((16,), jnp.uint8)), r"indices: expected uint8 \[16, N\]"),
        (
            _call(index_bits=9, codebook=jnp.zeros((512, 4))),
            r"indices: expected uint16 \[16, N\] .*index_bits=9",
        ),
        (_call(codebook=jnp.zeros((128, 4))), r"codebook: expected float32 or bfloat16 \[256, 4\]"),
        (_call(codebook=jnp.zeros((256, 2))), r"codebook: expected .*\[256, 4\]"),
        (_call(codebook=jnp.zeros((256, 4), jnp.int8)), r"codebook: expected float32 or bfloat16"),
        (_call(scales=jnp.ones((1, 24))), r"scales: expected float32 \[2, 24\]"),
        (_call(scales=jnp.ones((2, 24), jnp.bfloat16)), r"scales: expected float32"),
        (_call(vector_dim=1), r"vector_dim=1: expected an integer from 2 to 8"),
        (_call(vector_dim=9), r"vector_dim=9: expected an integer from 2 to 8"),
        (_call(vector_dim=4.0), r"vector_dim=4.0: expected an integer from 2 to 8"),
        (_call(index_bits=3), r"index_bits=3: expected an integer from 4 to 16"),
        (_call(index_bits=17), r"index_bits=17: expected an integer from 4 to 16"),
        (_call(x=jnp.ones((4, 64), jnp.float16)), r"x: expected float32 or bfloat16 \[M, K\]"),
        (_call(out_dtype=jnp.int32), r"out_dtype=int32: expected a floating dtype"),
        (_call(implementation="cpu"), r"implementation='cpu'"),
        (
            _call(implementation="tpu", interpret=True, block_m=12),
            r"codebook_matmul_tpu block_m=12: expected a positive multiple of 8",
        ),
        (
            _call(implementation="tpu", interpret=True, block_n=192),
            r"codebook_matmul_tpu block_n=192: expected a positive multiple of 128",
        ),
        (
            _call(implementation="gpu", interpret=True, block_k=24),
            r"codebook_matmul_gpu block_k=24: expected a power of two >= 16",
        ),
        (
            _call(
                implementation="tpu",
                interpret=True,
                index_bits=12,
                indices=jnp.zeros((16, 24), jnp.uint16),
                codebook=jnp.zeros((4096, 4)),
            ),
            r"codebook_matmul_tpu index_bits=12: expected at most 10",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()
