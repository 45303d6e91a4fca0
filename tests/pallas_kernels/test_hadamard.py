"""The blockwise Walsh–Hadamard transform: reference vs a float64 butterfly, kernels vs it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.hadamard import api, gpu, hadamard, hadamard_matrix, hadamard_reference, tpu


def _fwht(x: np.ndarray, block: int, normalize: bool) -> np.ndarray:
    """Iterative in-place-style butterfly in float64 on each block of the last axis."""
    y = np.asarray(x, np.float64).reshape(-1, block)
    half = 1
    while half < block:
        y = y.reshape(-1, block // (2 * half), 2, half)  # pairs (k, k + half) in runs of 2*half
        y = np.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], axis=2)
        half *= 2
    y = y.reshape(np.shape(x))
    return y / np.sqrt(block) if normalize else y


def _tolerance(dtype, block, normalize=True):
    # Outputs are O(1) for unit Gaussian inputs when normalized (O(sqrt(block)) if not): one
    # rounding to dtype (rtol) plus float32 summation error growing like sqrt(block) (atol).
    eps = float(jnp.finfo(dtype).eps)
    atol = 4 * eps * np.sqrt(block) * (1.0 if normalize else np.sqrt(block))
    return dict(rtol=2 * eps, atol=atol)


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def test_hadamard_matrix_is_sylvester_and_orthogonal():
    np.testing.assert_array_equal(hadamard_matrix(1), [[1]])
    np.testing.assert_array_equal(hadamard_matrix(2), [[1, 1], [1, -1]])
    h4 = hadamard_matrix(4)
    np.testing.assert_array_equal(
        h4, np.block([[hadamard_matrix(2)] * 2, [hadamard_matrix(2), -hadamard_matrix(2)]])
    )
    h = hadamard_matrix(64).astype(np.float64)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_array_equal(h @ h, 64 * np.eye(64))


@pytest.mark.parametrize("block", [1, 2, 8, 64, 1024])
@pytest.mark.parametrize("lead", [(), (1,), (7,), (3, 11)])
def test_reference_matches_float64_butterfly(block, lead):
    x = np.random.default_rng(block * 100 + len(lead)).standard_normal((*lead, 3 * block))
    for normalize in (True, False):
        y = hadamard_reference(jnp.asarray(x, jnp.float32), block, normalize=normalize)
        assert y.shape == x.shape and y.dtype == jnp.float32
        np.testing.assert_allclose(
            y, _fwht(x, block, normalize), **_tolerance(jnp.float32, block, normalize)
        )


def test_default_path_on_cpu_is_the_reference():
    x = _normal(1, (3, 5, 64))
    np.testing.assert_array_equal(hadamard(x, 16), hadamard_reference(x, 16))


class TestTPUKernel:
    """Compiled on the kernel's own backend (skipped elsewhere); the subclasses interpret it."""

    IMPLEMENTATION = "tpu"
    BACKENDS = ("tpu",)
    INTERPRET = False

    def _hadamard(self, x, block, **kwargs):
        if not self.INTERPRET and jax.default_backend() not in self.BACKENDS:
            pytest.skip(f"needs a {self.IMPLEMENTATION} backend")
        return hadamard(
            x, block, implementation=self.IMPLEMENTATION, interpret=self.INTERPRET, **kwargs
        )

    # (block, n): blocks side by side in the whole row (n < 128), in 128 lanes with a ragged last
    # column tile (208 = 13 * 16), one block per tile, and two blocks > 512 (factored).
    @pytest.mark.parametrize("block,n", [(8, 24), (16, 208), (128, 384), (1024, 2048)])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_matches_reference(self, block, n, dtype):
        for rows in (1, 7, 33) if block < 1024 else (33,):
            x = _normal(rows + block, (rows, n), dtype)
            y = self._hadamard(x, block, block_rows=16)  # 33 rows: three tiles, the last ragged
            assert y.shape == x.shape and y.dtype == x.dtype
            np.testing.assert_allclose(
                np.asarray(y, np.float32),
                np.asarray(hadamard_reference(x, block), np.float32),
                **_tolerance(dtype, block),
            )

    def test_unnormalized_leading_axes_match_reference(self):
        x = _normal(2, (3, 11, 256))
        y = self._hadamard(x, 32, normalize=False, block_rows=16)
        expected = hadamard_reference(x, 32, normalize=False)
        np.testing.assert_allclose(y, expected, **_tolerance(jnp.float32, 32, normalize=False))

    def test_normalized_transform_is_its_own_inverse_and_keeps_block_norms(self):
        block = 64
        x = _normal(3, (9, 4 * block))
        y = self._hadamard(x, block, block_rows=16)
        np.testing.assert_allclose(self._hadamard(y, block, block_rows=16), x, atol=2e-6)
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(y).reshape(9, 4, block), axis=-1),
            np.linalg.norm(np.asarray(x).reshape(9, 4, block), axis=-1),
            rtol=1e-6,
        )

    def test_gradient_matches_reference(self):
        x, w = _normal(4, (7, 96)), _normal(5, (7, 96))

        def loss(f):
            return lambda v: jnp.sum(jnp.sin(f(v, 32)) * w)

        got = jax.grad(loss(lambda v, b: self._hadamard(v, b, block_rows=16)))(x)
        np.testing.assert_allclose(got, jax.grad(loss(hadamard_reference))(x), atol=1e-5)


class TestTPUKernelInterpret(TestTPUKernel):
    INTERPRET = True

    def test_butterfly_over_many_matmul_slices(self):
        # matmul_block=128 splits H_1024 = H_8 ⊗ H_128: three butterfly stages.
        x = _normal(6, (33, 2048))
        y = tpu.hadamard_tpu(
            x, 1024, normalize=True, block_rows=16, interpret=True, matmul_block=128
        )
        np.testing.assert_allclose(y, hadamard_reference(x, 1024), **_tolerance(jnp.float32, 1024))


class TestGPUKernel(TestTPUKernel):
    IMPLEMENTATION = "gpu"
    BACKENDS = ("gpu", "cuda", "rocm")


class TestGPUKernelInterpret(TestGPUKernel):
    INTERPRET = True


def test_gpu_factors_are_balanced_triton_sizes():
    assert gpu.factors(8) == [8] and gpu.factors(128) == [128]
    assert gpu.factors(256) == [16, 16] and gpu.factors(1024) == [32, 32]
    assert gpu.factors(2**15) == [32, 32, 32]
    for bits in range(8, 22):
        fs = gpu.factors(2**bits)
        assert np.prod(fs) == 2**bits and all(16 <= f <= 128 for f in fs), fs


# (rows, block, n): the three TPU tile widths (whole row, 128 lanes with a ragged column tile,
# one block) and the factored path, with ragged rows.
_LOWERING_CASES = [(1000, 16, 256), (300, 16, 208), (40, 8, 24), (33, 2048, 4096)]


@pytest.mark.parametrize("rows,block,n", _LOWERING_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernel_lowers_for_tpu(rows, block, n, dtype):
    def f(x):
        return tpu.hadamard_tpu(x, block, normalize=True, block_rows=api.TPU_BLOCK_ROWS)

    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(
        jax.ShapeDtypeStruct((rows, n), dtype)
    )
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("rows,block,n", _LOWERING_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_lowers_for_cuda(rows, block, n, dtype):
    def f(x):
        return gpu.hadamard_gpu(x, block, normalize=True, block_rows=api.GPU_BLOCK_ROWS)

    exported = jax.export.export(
        jax.jit(f),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(jax.ShapeDtypeStruct((rows, n), dtype))
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == len(gpu.factors(block))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: hadamard(jnp.ones((4, 24)), 12), r"block=12: expected a power of two"),
        (lambda: hadamard(jnp.ones((4, 24)), 0), r"block=0: expected a power of two"),
        (lambda: hadamard(jnp.ones((4, 12)), 8), r"block=8: must divide .*x.shape=\(4, 12\)"),
        (lambda: hadamard(jnp.ones((4, 8), jnp.int32), 8), r"x: expected a floating.*int32"),
        (lambda: hadamard(jnp.float32(1.0), 1), r"x: expected at least one axis"),
        (lambda: hadamard(jnp.ones((4, 8)), 8, implementation="cpu"), r"implementation='cpu'"),
        (
            lambda: hadamard(jnp.ones((4, 8)), 8, interpret=True, block_rows=12),
            r"block_rows=12: expected a positive multiple of 8",
        ),
        (
            lambda: hadamard(
                jnp.ones((4, 8)), 8, interpret=True, implementation="gpu", block_rows=24
            ),
            r"block_rows=24: expected a power of two >= 16",
        ),
        (
            lambda: hadamard(jnp.ones((1, 2**16)), 2**16, interpret=True),
            r"block=65536: at most 32768",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()
