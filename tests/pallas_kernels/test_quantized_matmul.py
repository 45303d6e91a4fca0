"""The low-bit weight matmul: reference vs jaxquant's dequantize, kernels vs the reference."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.numerics as jn
from pallas_kernels import packing
from pallas_kernels.quantized_matmul import (
    api,
    cpu,
    decode,
    gpu,
    quantized_matmul,
    quantized_matmul_reference,
    reference,
    tpu,
)

# Every preset the kernels serve, as jaxquant quantizes a Flax kernel [in, out] along `in`.
PRESETS = {
    "INT8": jn.INT8,
    "INT4": jn.INT4,
    "INT4_G128": jn.INT4_G128,
    "INT2_G128": jn.INT2_G128,
    "INT4_G128_ASYM": jn.INT4_G128_ASYM,
    "MXFP4": jn.MXFP4,
    "NVFP4": jn.NVFP4,
    "NF4": jn.NF4,
    "E4M3_CHANNEL": jn.ScalarQuantizer(jn.E4M3, jn.Scaling(axis=0)),
    "E4M3_G128": jn.ScalarQuantizer(jn.E4M3, jn.Scaling(axis=0, group_size=128)),
}


def _fmt(fmt) -> str:
    if isinstance(fmt, jn.IntFormat):
        return "int" if fmt.signed else "uint"
    if isinstance(fmt, jn.LookupFormat):
        return "lut"
    return {"e2m1": "e2m1", "e4m3fn": "e4m3"}[fmt.name]


def _args(q: jn.QArray):
    """(codes, scales, zeros) and the keyword arguments of quantized_matmul for a QArray."""
    fmt = _fmt(q.format)
    kwargs = dict(
        bits=q.format.bits,
        group_size=q.scaling.group_size,
        fmt=fmt,
        scale_dtype=q.scaling.scale_dtype,
        tensor_scale=q.tensor_scale,
        lut=jnp.asarray(q.format.values, jnp.float32) if fmt == "lut" else None,
    )
    return (q.codes, q.scale, q.zero), kwargs


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _quantized(preset, k, n, seed):
    return jn.quantize(_normal(seed, (k, n)), preset)


def _k_for(preset) -> int:
    # K: three groups (group_size 16 .. 128), or 96 rows per output channel.
    return 3 * (preset.scaling.group_size or 32)


def _assert_close(y, expected, dtype, k):
    # Relative to the output's largest magnitude: float32 summation order (growing like
    # sqrt(K)), or for bfloat16 the rounding of the output and of the dequantized weight.
    y, expected = np.asarray(y, np.float64), np.asarray(expected, np.float64)
    eps = float(jnp.finfo(dtype).eps)
    peak = float(np.max(np.abs(expected), initial=0.0))
    factor = np.sqrt(k) if jnp.dtype(dtype) == jnp.float32 else 2.0
    np.testing.assert_allclose(y, expected, rtol=0, atol=eps * factor * peak)


@pytest.mark.parametrize("name", list(PRESETS))
def test_reference_equals_x_matmul_dequantize(name):
    preset = PRESETS[name]
    k, n = _k_for(preset), 70  # n not a multiple of the codes per byte at 2 bits
    q = _quantized(preset, k, n, seed=len(name))
    (codes, scales, zeros), kwargs = _args(q)
    for m in (1, 7, 33):
        x = _normal(m, (m, k))
        y = quantized_matmul_reference(x, codes, scales, zeros, **kwargs)
        assert y.shape == (m, n) and y.dtype == jnp.float32
        _assert_close(y, x @ q.dequantize(), jnp.float32, k)


def test_reference_takes_bfloat16_activations_and_out_dtype():
    q = _quantized(jn.INT4_G128, 256, 48, seed=1)
    (codes, scales, _), kwargs = _args(q)
    x = _normal(2, (5, 256), jnp.bfloat16)
    y = quantized_matmul_reference(x, codes, scales, **kwargs)
    assert y.dtype == jnp.bfloat16
    y32 = quantized_matmul_reference(x, codes, scales, out_dtype=jnp.float32, **kwargs)
    _assert_close(y32, x.astype(jnp.float32) @ q.dequantize(), jnp.float32, 256)
    np.testing.assert_array_equal(y, y32.astype(jnp.bfloat16))


@pytest.mark.parametrize(
    "fmt,bits,jaxquant_format",
    [
        ("int", 2, jn.IntFormat(2)),
        ("int", 4, jn.IntFormat(4)),
        ("int", 8, jn.IntFormat(8)),
        ("uint", 4, jn.UINT4),
        ("uint", 8, jn.UINT8),
        ("e2m1", 4, jn.E2M1),
        ("e4m3", 8, jn.E4M3),
    ],
)
def test_code_tables_and_kernel_decoders_agree_with_jaxquant(fmt, bits, jaxquant_format):
    expected = jaxquant_format.table().astype(np.float32)
    np.testing.assert_array_equal(reference.code_table(fmt, bits), expected)
    codes = jnp.arange(2**bits, dtype=jnp.int32)
    np.testing.assert_array_equal(decode.code_values(codes, fmt=fmt, bits=bits), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lut_select_tree_reads_every_entry(bits):
    table = np.asarray(_normal(bits, (2**bits,)))
    codes = jnp.arange(2**bits, dtype=jnp.int32)
    got = decode.code_values(codes, fmt="lut", bits=bits, lut=lambda i: jnp.float32(table[i]))
    np.testing.assert_array_equal(got, table)


def test_kernel_scale_decoders_agree_with_jaxquant():
    stored = jnp.arange(256, dtype=jnp.uint8)
    for scale_dtype, scales in [
        ("e8m0", stored),
        ("e4m3", jax.lax.bitcast_convert_type(stored, jnp.float8_e4m3fn)),
    ]:
        scaling = jn.Scaling(axis=0, scale_dtype=scale_dtype, tensor_scale=scale_dtype == "e4m3")
        expected = jn.scaling.decode_scale(scales, scaling)
        got = decode.scale_values(decode.kernel_scales(scales, scale_dtype), scale_dtype)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(reference.decode_scales(scales, scale_dtype), expected)


def test_planes_split_bytes_into_packed_columns():
    codes = np.random.default_rng(0).integers(0, 4, (3, 12))
    packed = packing.pack(jnp.asarray(codes, jnp.uint8), 2)  # [3, 3]
    planes = decode.planes(packed, 2)  # plane p holds columns 4j + p
    np.testing.assert_array_equal(np.stack(planes, axis=-1).reshape(3, 12), codes)


def test_interpret_runs_the_gpu_kernel_for_groups_the_tpu_kernel_does_not_take():
    q = _quantized(jn.INT4_G128.with_group_size(8), 32, 40, seed=12)
    (codes, scales, _), kwargs = _args(q)
    x = _normal(13, (3, 32))
    assert not tpu.supports(reference.check_args(x, codes, scales, **kwargs))
    y = quantized_matmul(x, codes, scales, interpret=True, **kwargs)
    _assert_close(y, x @ q.dequantize(), jnp.float32, 32)


@pytest.mark.skipif(cpu.find_compiler() is None, reason="no C++ compiler to build the CPU kernel")
def test_default_path_on_cpu_is_the_cpu_kernel_for_decode_rows_and_the_reference_above():
    q = _quantized(jn.NVFP4, 64, 40, seed=3)
    (codes, scales, _), kwargs = _args(q)
    for m, implementation in [(cpu.MAX_M, "cpu"), (cpu.MAX_M + 1, "xla")]:
        x = _normal(4, (m, 64))
        np.testing.assert_array_equal(
            quantized_matmul(x, codes, scales, **kwargs),
            quantized_matmul(x, codes, scales, implementation=implementation, **kwargs),
        )
    ref = quantized_matmul_reference(x, codes, scales, **kwargs)
    np.testing.assert_array_equal(quantized_matmul(x, codes, scales, **kwargs), ref)


def test_the_default_path_exports_for_tpu_and_cuda_from_a_cpu_host():
    # Picked by the default backend, the CPU kernel is lowered only for CPU; an export for
    # other platforms carries the reference (the kernels there are chosen by implementation=).
    q = _quantized(jn.INT4_G128, 128, 64, seed=17)
    (codes, scales, _), kwargs = _args(q)
    f = jax.jit(lambda x: quantized_matmul(x, codes, scales, **kwargs))
    exported = jax.export.export(f, platforms=["tpu", "cuda"])(_normal(18, (2, 128)))
    assert cpu.TARGET not in exported.mlir_module()


@pytest.mark.skipif(cpu.find_compiler() is None, reason="no C++ compiler to build the CPU kernel")
def test_cpu_kernel_gradients_are_the_references():
    # The kernel's VJP is the reference's: in x, and in float scales and the tensor scale.
    q = _quantized(jn.NVFP4, 64, 40, seed=12)
    (codes, scales, _), kwargs = _args(q)
    kwargs["scale_dtype"] = "float32"
    scales = scales.astype(jnp.float32)
    x, dy = _normal(13, (5, 64)), _normal(14, (5, 40))
    ts = kwargs.pop("tensor_scale")

    def loss(impl):
        def f(x, scales, ts):
            y = quantized_matmul(x, codes, scales, implementation=impl, tensor_scale=ts, **kwargs)
            return jnp.sum(y * dy)

        return jax.grad(f, argnums=(0, 1, 2))(x, scales, ts)

    for got, want in zip(loss("cpu"), loss("xla"), strict=True):
        np.testing.assert_array_equal(got, want)


def test_cpu_kernel_unavailable_falls_back_to_the_reference_with_a_warning(monkeypatch, tmp_path):
    q = _quantized(jn.INT4_G128, 128, 32, seed=15)
    (codes, scales, _), kwargs = _args(q)
    x = _normal(16, (2, 128))
    ref = quantized_matmul_reference(x, codes, scales, **kwargs)
    try:
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv(cpu.ENV_CACHE, str(tmp_path))  # no cached build to find
        monkeypatch.setattr(cpu, "find_compiler", lambda: None)
        cpu.reset()
        with pytest.warns(UserWarning, match="CPU kernel is unavailable.*no C.. compiler"):
            y = jax.jit(lambda x: quantized_matmul(x, codes, scales, **kwargs))(x)
        np.testing.assert_array_equal(y, ref)
        with pytest.raises(RuntimeError, match="implementation='cpu' is unavailable"):
            quantized_matmul(x, codes, scales, implementation="cpu", **kwargs)
        monkeypatch.setenv(cpu.ENV_DISABLE, "0")  # chosen on purpose: no warning
        cpu.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(quantized_matmul(x, codes, scales, **kwargs), ref)
    finally:
        monkeypatch.undo()
        cpu.reset()
        if cpu.find_compiler() is not None:  # the kernel is back for the tests that follow
            assert cpu.unavailable_reason() is None


class TestTPUKernel:
    """Compiled on the kernel's own backend (skipped elsewhere); the subclasses interpret it."""

    IMPLEMENTATION = "tpu"
    BACKENDS = ("tpu",)
    INTERPRET = False

    def _blocks(self, bits):
        # Small tiles, so that the test shapes span several tiles with a ragged last one.
        per = 8 // bits
        if self.IMPLEMENTATION == "tpu":
            return dict(block_m=16, block_n=128 * per, block_k=64)
        return dict(block_m=16, block_n=64 * per, block_k=32)

    def setup_method(self):
        if not self.INTERPRET and jax.default_backend() not in self.BACKENDS:
            pytest.skip(f"needs a {self.IMPLEMENTATION} backend")

    def _matmul(self, x, codes, scales, zeros=None, **kwargs):
        return quantized_matmul(
            x,
            codes,
            scales,
            zeros,
            implementation=self.IMPLEMENTATION,
            interpret=self.INTERPRET,
            **kwargs,
        )

    def _check(self, x, codes, scales, zeros, kwargs, **blocks):
        y = self._matmul(x, codes, scales, zeros, **kwargs, **blocks)
        expected = quantized_matmul_reference(x, codes, scales, zeros, **kwargs)
        assert y.shape == expected.shape and y.dtype == expected.dtype
        _assert_close(y, expected, x.dtype, x.shape[1])

    # K = 3 groups; N = 160 bytes per row of codes: two N tiles, the last ragged; M = 33: three
    # M tiles, the last ragged.
    @pytest.mark.parametrize("name", list(PRESETS))
    def test_matches_reference_for_every_preset(self, name):
        preset = PRESETS[name]
        k, n = _k_for(preset), 160 * 8 // preset.format.bits
        q = _quantized(preset, k, n, seed=len(name))
        args, kwargs = _args(q)
        self._check(_normal(7, (33, k)), *args, kwargs, **self._blocks(preset.format.bits))

    @pytest.mark.parametrize("m", [1, 7])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_decode_rows_with_default_tiles(self, m, dtype):
        # Default tiles: K = 384 is one TPU K tile of 3 groups; N = 200 a single N tile.
        q = _quantized(jn.INT4_G128_ASYM, 384, 200, seed=m)
        args, kwargs = _args(q)
        self._check(_normal(m, (m, 384), dtype), *args, kwargs)

    def test_several_groups_per_k_tile_with_zero_points(self):
        # block_k = 128 with groups of 32: three K tiles of 4 groups each (TPU 'group' path,
        # GPU 'gather' path).
        q = _quantized(jn.INT4_G128_ASYM.with_group_size(32), 384, 96, seed=5)
        args, kwargs = _args(q)
        blocks = dict(self._blocks(4), block_k=128)
        self._check(_normal(6, (20, 384)), *args, kwargs, **blocks)

    def test_bfloat16_activations_with_float32_output(self):
        q = _quantized(jn.NVFP4, 96, 64, seed=8)
        args, kwargs = _args(q)
        x = _normal(9, (9, 96), jnp.bfloat16)
        y = self._matmul(x, *args, out_dtype=jnp.float32, **kwargs)
        expected = quantized_matmul_reference(x, *args, out_dtype=jnp.float32, **kwargs)
        assert y.dtype == jnp.float32
        _assert_close(y, expected, jnp.bfloat16, 96)

    @pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16", "e8m0"])
    def test_zero_and_extreme_scales(self, scale_dtype):
        # Columns of scales near 1e-30, 1 and 1e30 (2**-100, 1, 2**100 for E8M0), and an
        # all-zero group in the middle of some columns. Each output column has one magnitude,
        # so it is compared relative to its own peak.
        k, n, g = 96, 48, 32
        rng = np.random.default_rng(10)
        codes = packing.pack(jnp.asarray(rng.integers(0, 16, (k, n)), jnp.uint8), 4)
        exponent = np.tile([-100, 0, 100], n // 3)  # per column
        mantissa = rng.uniform(1.0, 2.0, (k // g, n))
        if scale_dtype == "e8m0":
            scales = jnp.asarray(np.broadcast_to(exponent + 127, (k // g, n)), jnp.uint8)
        else:
            scales = jnp.asarray(mantissa * 2.0**exponent, scale_dtype)
        scales = scales.at[1, ::4].set(0)  # all-zero group 1 in every 4th column
        x = _normal(11, (7, k))
        kwargs = dict(bits=4, group_size=g, fmt="int", scale_dtype=scale_dtype)
        y = np.asarray(self._matmul(x, codes, scales, **kwargs), np.float64)
        expected = np.asarray(quantized_matmul_reference(x, codes, scales, **kwargs), np.float64)
        assert np.all(np.isfinite(y))
        column_scale = 2.0**exponent
        _assert_close(y / column_scale, expected / column_scale, jnp.float32, k)


class TestTPUKernelInterpret(TestTPUKernel):
    INTERPRET = True


class TestGPUKernel(TestTPUKernel):
    IMPLEMENTATION = "gpu"
    BACKENDS = ("gpu", "cuda", "rocm")


class TestGPUKernelInterpret(TestGPUKernel):
    INTERPRET = True


class TestCPUKernel(TestTPUKernel):
    """The C++ kernel (built on first use), on any CPU; it takes no tile sizes."""

    IMPLEMENTATION = "cpu"
    BACKENDS = ("cpu",)

    def setup_method(self):
        super().setup_method()
        if cpu.find_compiler() is None:  # a failed build with a compiler fails the test instead
            pytest.skip("no C++ compiler to build the CPU kernel")

    def _blocks(self, bits):
        del bits
        return {}

    # Groups of 6 rows: the kernel's passes of 4 rows of K leave 2 rows per group to its
    # one-row path; M = 1 (the fused decode), 5 (4 rows of x at once, then 1) and 9; N = 37
    # leaves a partly filled last byte at 2 and 4 bits.
    @pytest.mark.parametrize("m", [1, 5, 9])
    @pytest.mark.parametrize("bits", [2, 4, 8])
    @pytest.mark.parametrize("fmt", ["int", "uint", "lut"])
    def test_groups_not_a_multiple_of_four_rows(self, m, bits, fmt):
        k, n, g = 30, 37, 6
        rng = np.random.default_rng(100 * m + 10 * bits + len(fmt))
        codes = packing.pack(jnp.asarray(rng.integers(0, 2**bits, (k, n)), jnp.uint8), bits)
        scales = jnp.asarray(rng.uniform(0.5, 2.0, (k // g, n)), jnp.float32)
        zeros = None
        if fmt == "uint":
            zeros = jnp.asarray(rng.integers(0, 2**bits, (k // g, n)), jnp.uint8)
        lut = jnp.asarray(rng.standard_normal(2**bits), jnp.float32) if fmt == "lut" else None
        kwargs = dict(bits=bits, group_size=g, fmt=fmt, lut=lut)
        self._check(_normal(m, (m, k)), codes, scales, zeros, kwargs)


def _problem(m=8, k=512, n=512, bits=4, group_size=128, fmt="int", scale_dtype="float32"):
    x, codes, scales, *_ = reference.arg_specs(
        m, k, n, bits=bits, group_size=group_size, fmt=fmt, scale_dtype=scale_dtype
    )
    return reference.check_args(x, codes, scales, bits=bits, group_size=group_size, fmt=fmt)


@pytest.mark.parametrize(
    "k,group_size,block_k,expected",
    [
        (384, 128, 512, (384, "group", 3)),  # K fits one tile: all of it
        (1024, 128, 512, (512, "group", 4)),
        (768, 128, 512, (384, "group", 3)),  # the largest divisor of K in whole groups
        (768, 256, 128, (128, "tile", 1)),  # groups bigger than the tile
        (4096, None, 512, (512, "tile", 1)),  # per output channel
        (48, 16, 32, (48, "group", 3)),  # a 16-row group is not a 32-row uint8 tile: all K
        (16 * 37, 16, 512, (592, "group", 37)),  # no aligned divisor of K: all of K
    ],
)
def test_tpu_k_tiles(k, group_size, block_k, expected):
    p = _problem(k=k, group_size=group_size)
    t = tpu.tiles(p, jnp.float32, block_m=256, block_n=512, block_k=block_k)
    assert (t.block_k, t.path, t.scale_rows) == expected


def test_tpu_and_gpu_tiles_clamp_small_problems():
    p = _problem(m=1, k=96, n=80, group_size=32)
    t = tpu.tiles(p, jnp.bfloat16, block_m=256, block_n=512, block_k=512)
    assert (t.block_m, t.padded_m, t.packed_block_n) == (16, 16, 40)
    g = gpu.tiles(p, block_m=64, block_n=128, block_k=64)
    assert (g.block_m, g.packed_block_n, g.block_k, g.path) == (16, 64, 64, "gather")
    g = gpu.tiles(_problem(group_size=128), block_m=64, block_n=128, block_k=64)
    assert g.path == "tile"


# (fmt, bits, group_size, scale_dtype, zeros, tensor_scale): every fmt and width the kernels
# take, every scale dtype, both paths of each kernel.
_LOWERING_CASES = [
    ("int", 2, 128, "float32", False, False),
    ("int", 4, 128, "float32", False, False),
    ("int", 4, None, "bfloat16", False, False),
    ("int", 8, None, "float32", False, False),
    ("uint", 2, 128, "float32", True, False),
    ("uint", 4, 128, "float32", True, False),
    ("uint", 8, 64, "bfloat16", True, False),
    ("e2m1", 4, 32, "e8m0", False, False),
    ("e2m1", 4, 16, "e4m3", False, True),
    ("e4m3", 8, 128, "float32", False, False),
    ("e4m3", 8, 32, "e8m0", False, False),
    ("lut", 2, 128, "float32", False, False),
    ("lut", 4, 64, "float32", False, False),
    ("lut", 8, 128, "bfloat16", False, False),
]


def _lowering_fn(kernel, case, blocks):
    fmt, bits, group_size, scale_dtype, _, _ = case

    def f(x, codes, scales, zeros, tensor_scale, lut):
        return kernel(
            x,
            codes,
            scales,
            zeros,
            bits=bits,
            group_size=group_size,
            fmt=fmt,
            scale_dtype=scale_dtype,
            tensor_scale=tensor_scale,
            lut=lut,
            **blocks,
        )

    return f


def _lowering_specs(case, m, dtype):
    fmt, bits, group_size, scale_dtype, zeros, tensor_scale = case
    return reference.arg_specs(
        m,
        512,
        512,
        bits=bits,
        group_size=group_size,
        fmt=fmt,
        scale_dtype=scale_dtype,
        x_dtype=dtype,
        zeros=zeros,
        tensor_scale=tensor_scale,
    )


def _lowering_grid():
    """(case, m, dtype) for every case × m × activation dtype. The default run keeps two of
    the four (m, dtype) pairs per case, alternating, so every case lowers with both m and both
    dtypes; the slow run lowers them all."""
    return [
        pytest.param(
            case,
            m,
            dtype,
            id="-".join(map(str, (*case[:4], m, jnp.dtype(dtype).name))),
            marks=() if (i + j + k) % 2 == 0 else pytest.mark.slow,
        )
        for i, case in enumerate(_LOWERING_CASES)
        for j, m in enumerate((8, 256))
        for k, dtype in enumerate((jnp.float32, jnp.bfloat16))
    ]


@pytest.mark.parametrize("case,m,dtype", _lowering_grid())
def test_tpu_kernel_lowers_for_tpu(case, m, dtype):
    blocks = dict(block_m=api.TPU_BLOCK_M, block_n=api.TPU_BLOCK_N, block_k=api.TPU_BLOCK_K)
    f = _lowering_fn(tpu.quantized_matmul_tpu, case, blocks)
    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*_lowering_specs(case, m, dtype))
    assert exported.mlir_module().count("tpu_custom_call") == 1


@pytest.mark.parametrize("case,m,dtype", _lowering_grid())
def test_gpu_kernel_lowers_for_cuda(case, m, dtype):
    blocks = dict(block_m=api.GPU_BLOCK_M, block_n=api.GPU_BLOCK_N, block_k=api.GPU_BLOCK_K)
    f = _lowering_fn(gpu.quantized_matmul_gpu, case, blocks)
    exported = jax.export.export(
        jax.jit(f),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*_lowering_specs(case, m, dtype))
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 1


def _call(**changes):
    """quantized_matmul on a valid INT4_G128-shaped problem (K=256, N=64), with changes."""
    args = dict(
        x=jnp.ones((4, 256)),
        codes=jnp.zeros((256, 32), jnp.uint8),
        scales=jnp.ones((2, 64)),
        zeros=None,
        bits=4,
        group_size=128,
        fmt="int",
    )
    args.update(changes)
    return lambda: quantized_matmul(**args)


@pytest.mark.parametrize(
    "call,message",
    [
        (_call(group_size=96), r"group_size=96: expected None or a positive integer dividing"),
        (_call(codes=jnp.zeros((256, 32), jnp.int8)), r"codes: expected uint8 \(256, 32\)"),
        (_call(codes=jnp.zeros((256, 64), jnp.uint8)), r"codes: expected .*got uint8 \(256, 64"),
        (_call(scales=jnp.ones((4, 64))), r"scales: expected float32 \[2, N\]"),
        (_call(scales=jnp.ones((128,))), r"scales: expected \[K // group_size, N\]"),
        (_call(scales=jnp.ones((2, 64), jnp.bfloat16)), r"scales: expected float32"),
        (_call(fmt="int3"), r"fmt='int3': expected one of"),
        (_call(zeros=jnp.zeros((2, 64), jnp.uint8)), r"zeros: zero points go with fmt='uint'"),
        (
            _call(fmt="uint", zeros=jnp.zeros((2, 64), jnp.int32)),
            r"zeros: expected uint8 \(2, 64\)",
        ),
        (_call(fmt="lut"), r"lut: fmt='lut' needs lut"),
        (_call(fmt="lut", lut=jnp.ones(8)), r"lut: expected float \[16\]"),
        (_call(lut=jnp.ones(16)), r"lut: only used with fmt='lut'"),
        (_call(bits=3), r"bits=3: expected one of \(2, 4, 8\)"),
        (_call(fmt="e4m3"), r"bits=4: fmt='e4m3' has 8-bit codes"),
        (_call(scale_dtype="e5m2"), r"scale_dtype='e5m2': expected one of"),
        (_call(x=jnp.ones((4, 256), jnp.float16)), r"x: expected float32 or bfloat16 \[M, K\]"),
        (_call(x=jnp.ones((4, 128))), r"scales: expected float32 \[1, N\] \(K=128"),
        (_call(tensor_scale=jnp.ones(3)), r"tensor_scale: expected a float scalar"),
        (_call(implementation="cuda"), r"implementation='cuda'"),
        (
            _call(implementation="tpu", interpret=True, block_m=12),
            r"block_m=12: expected a positive multiple of 8",
        ),
        (
            _call(implementation="tpu", interpret=True, block_n=384),
            r"block_n=384: expected a positive multiple of 256",
        ),
        (
            _call(implementation="gpu", interpret=True, block_k=24),
            r"block_k=24: expected a power of two >= 16",
        ),
        (
            _call(implementation="tpu", interpret=True, group_size=8, scales=jnp.ones((32, 64))),
            r"quantized_matmul_tpu group_size=8: expected None, K or a multiple of 16",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()
