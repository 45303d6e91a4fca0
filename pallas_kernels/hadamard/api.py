"""The public blockwise Walsh–Hadamard transform: validates, flattens, picks a kernel.

Terminology: see ``reference`` (block, H_b, normalize); ``tpu`` and ``gpu`` describe the kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.hadamard import gpu, tpu
from pallas_kernels.hadamard.reference import check_args, hadamard_reference

# Rows per kernel tile, per backend (static; see tpu.tile_shape and gpu._rows_pass).
TPU_BLOCK_ROWS = 256
GPU_BLOCK_ROWS = 64
IMPLEMENTATIONS = dispatch.IMPLEMENTATIONS


def _self_adjoint(apply):
    """Wraps a linear, symmetric map (``H_b`` is symmetric) so its VJP is the map itself."""

    @jax.custom_vjp
    def f(x):
        return apply(x)

    def fwd(x):
        return apply(x), None

    def bwd(_, g):
        return (apply(g),)

    f.defvjp(fwd, bwd)
    return f


def _pick(implementation, interpret, dtype) -> str:
    return dispatch.pick_implementation(
        "hadamard",
        implementation,
        interpret,
        tpu_ok=interpret or dtype in tpu.SUPPORTED_DTYPES,
        gpu_ok=dtype in gpu.SUPPORTED_DTYPES,
    )


def hadamard(
    x: jax.Array,
    block: int,
    *,
    normalize: bool = True,
    interpret: bool = False,
    block_rows: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Blockwise (fast) Walsh–Hadamard transform along the last axis.

    ``y[..., k*b:(k+1)*b] = x[..., k*b:(k+1)*b] @ H_b / (sqrt(b) if normalize else 1)`` for
    ``b = block`` and every block ``k``, ``H_b`` the Sylvester-ordered Hadamard matrix. With
    ``normalize`` the transform is orthonormal and its own inverse, so ``hadamard(hadamard(x))
    == x`` up to rounding; its VJP is the transform itself (defined for every implementation).

    Implementations: ``'tpu'`` (Mosaic kernel, ``tpu.hadamard_tpu``), ``'gpu'`` (Triton kernels,
    ``gpu.hadamard_gpu``), ``'xla'`` (``hadamard_reference``: a float32 matmul with ``H_b``).
    ``None`` picks by ``jax.default_backend()``: the kernel on TPU / GPU when it takes x's dtype,
    ``'xla'`` otherwise (CPU included); with ``interpret=True`` it picks the TPU kernel, run in
    Pallas interpret mode on any backend.

    Args:
      x: floating array [..., n]; leading axes are flattened to rows for the kernels.
      block: a power of two dividing ``n`` (1 is the identity, up to scaling).
      normalize: divide by ``sqrt(block)``.
      interpret: run the chosen Pallas kernel in interpret mode.
      block_rows: rows per kernel tile; default ``TPU_BLOCK_ROWS`` / ``GPU_BLOCK_ROWS``.
        Ignored by ``'xla'``.
      implementation: None, ``'xla'``, ``'tpu'`` or ``'gpu'``.

    Returns:
      An array of ``x``'s shape and dtype (float32 arithmetic, rounded once).

    Raises:
      ValueError: ``x`` is not floating or is a scalar; ``block`` is not a power of two or does
        not divide ``n``; an unknown ``implementation``; a kernel's own limits (dtype,
        ``block_rows``, the TPU kernel's ``tpu.MAX_BLOCK``).

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (4, 4096))
      >>> y = hadamard(x, 128)  # 32 independent orthonormal 128-point transforms per row
      >>> bool(jnp.allclose(hadamard(y, 128), x, atol=1e-5))
      True

    References:
      Ashkboos et al., QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs, arXiv:2404.00456.
      Tseng et al., QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice
      Codebooks, arXiv:2402.04396.
    """
    block = check_args(x, block)
    x = jnp.asarray(x)
    implementation = _pick(implementation, interpret, x.dtype)
    if implementation == "xla":
        return hadamard_reference(x, block, normalize=normalize)
    if x.size == 0:
        return x
    if implementation == "tpu":
        kernel, default_rows = tpu.hadamard_tpu, TPU_BLOCK_ROWS
    else:
        kernel, default_rows = gpu.hadamard_gpu, GPU_BLOCK_ROWS
    rows, n = math.prod(x.shape[:-1]), x.shape[-1]

    def apply(v):
        y = kernel(
            v.reshape(rows, n),
            block,
            normalize=normalize,
            block_rows=default_rows if block_rows is None else block_rows,
            interpret=interpret,
        )
        return y.reshape(v.shape)

    return _self_adjoint(apply)(x)
