"""The public vector-quantized weight matmul: validates, picks a kernel, falls back to the
reference.

Terminology: see ``reference`` (x, vector, codebook, indices, group, scales); ``tpu`` and
``gpu`` describe the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.codebook_matmul import gpu, tpu
from pallas_kernels.codebook_matmul.reference import (
    Problem,
    check_args,
    codebook_matmul_reference,
)

# Tile sizes per backend (static; see tpu.tiles and gpu.tiles). TPU: 256 rows fill the MXU;
# 512 columns are 4 vregs of lanes per index row; block_k 512 is 256 vectors of 2, 128 of 4 (and
# at least 128 vectors: 1024 rows for 8-vectors). GPU: one 64 x 128 output tile per program, K
# in steps of 64 rows.
TPU_BLOCK_M, TPU_BLOCK_N, TPU_BLOCK_K = 256, 512, 512
GPU_BLOCK_M, GPU_BLOCK_N, GPU_BLOCK_K = 64, 128, 64
IMPLEMENTATIONS = dispatch.IMPLEMENTATIONS


def _pick(implementation, interpret, p: Problem) -> str:
    return dispatch.pick_implementation(
        "codebook_matmul", implementation, interpret, tpu_ok=tpu.supports(p)
    )


def codebook_matmul(
    x: jax.Array,
    indices: jax.Array,
    codebook: jax.Array,
    scales: jax.Array,
    *,
    vector_dim: int,
    index_bits: int,
    group_size: int | None = None,
    out_dtype=None,
    interpret: bool = False,
    implementation: str | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """``x @ w`` for a weight ``w`` stored as codebook indices of short vectors, with scales.

    ``y[m, n] = sum_k x[m, k] * w[k, n]`` with
    ``w[k, n] = codebook[indices[k // d, n], k % d] * scales[k // g, n]``, ``d = vector_dim``
    and ``g = group_size`` (all of K when None): each column of w is cut along K into vectors
    of d elements, each stored as the index of its codeword. float32 accumulation.

    Implementations: ``'tpu'`` (Mosaic kernel, ``tpu.codebook_matmul_tpu``: index_bits 4 to
    ``tpu.MAX_INDEX_BITS`` = 10), ``'gpu'`` (Triton kernel, ``gpu.codebook_matmul_gpu``:
    index_bits 4 to 16), ``'xla'`` (``codebook_matmul_reference``: gather w to float32, then a
    float32 matmul). ``None`` picks by ``jax.default_backend()``: the kernel on TPU (falling
    back to ``'xla'`` above 10 index bits, where the in-VMEM lookup would cost more than
    materializing w) and GPU, ``'xla'`` otherwise (CPU included); with ``interpret=True`` it
    picks the TPU kernel (the GPU kernel above 10 index bits), run in Pallas interpret mode on
    any backend. Both kernels look the codewords up on chip, tile by tile, and never write a
    float copy of w to HBM; every vector_dim 2 to 8 goes through both.

    Args:
      x: float32 or bfloat16 [M, K] activations.
      indices: [K // vector_dim, N] codeword indices, uint8 for ``index_bits <= 8`` and uint16
        above (one index per element, no narrower packing); only the low ``index_bits`` bits
        are read.
      codebook: float32 or bfloat16 [2**index_bits, vector_dim], one codeword per row.
      scales: float32 [K // group_size, N] ([1, N] when ``group_size`` is None).
      vector_dim: elements per vector, 2 to 8, dividing K.
      index_bits: bits per index, 4 to 16 (a codebook of ``2**index_bits`` rows).
      group_size: rows of w (along K) per scale, a multiple of ``vector_dim`` dividing K; None
        for one scale per output column.
      out_dtype: the result's dtype; default ``x.dtype``.
      interpret: run the chosen Pallas kernel in interpret mode.
      implementation: None, ``'xla'``, ``'tpu'`` or ``'gpu'``.
      block_m, block_n, block_k: tile sizes (``block_k`` in rows of w); defaults
        ``TPU_BLOCK_*`` / ``GPU_BLOCK_*``; ignored by ``'xla'``. See ``tpu.tiles`` and
        ``gpu.tiles`` for what each kernel accepts.

    Returns:
      [M, N] in ``out_dtype``.

    Raises:
      ValueError: naming the argument, for ``vector_dim`` outside 2..8 or not dividing K;
        ``index_bits`` outside 4..16; ``group_size`` not a multiple of ``vector_dim`` or not
        dividing K; ``x``, ``indices``, ``codebook`` or ``scales`` of the wrong dtype or shape;
        an unknown ``implementation``; a kernel's own limits on block sizes and index bits.

    Example:
      >>> # 4096 x 1024 weight as 8-bit indices of 4-vectors: 2 bits per weight.
      >>> indices = jnp.zeros((4096 // 4, 1024), jnp.uint8)
      >>> codebook = jax.random.normal(jax.random.key(0), (256, 4))
      >>> y = codebook_matmul(x, indices, codebook, jnp.ones((1, 1024)), vector_dim=4,
      ...                     index_bits=8)  # x: [M, 4096] -> y: [M, 1024]

    References:
      Egiazarian et al., Extreme Compression of Large Language Models via Additive
      Quantization (AQLM), arXiv:2401.06118, Sec. 3 (codebooks of 8-vectors, 16-bit indices).
      van Baalen et al., GPTVQ: The Blessing of Dimensionality for LLM Quantization,
      arXiv:2402.15319, Sec. 3 (2- and 4-vectors, per-group codebooks and scales).
      Liu et al., VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language
      Models, arXiv:2409.17066.
    """
    kwargs = dict(
        vector_dim=vector_dim,
        index_bits=index_bits,
        group_size=group_size,
        out_dtype=out_dtype,
    )
    p = check_args(x, indices, codebook, scales, **kwargs)
    implementation = _pick(implementation, interpret, p)
    if implementation == "xla":
        return codebook_matmul_reference(x, indices, codebook, scales, **kwargs)
    if p.m == 0 or p.n == 0 or p.k == 0:
        return jnp.zeros((p.m, p.n), p.out_dtype)
    if implementation == "tpu":
        kernel, (dm, dn, dk) = tpu.codebook_matmul_tpu, (TPU_BLOCK_M, TPU_BLOCK_N, TPU_BLOCK_K)
    else:
        kernel, (dm, dn, dk) = gpu.codebook_matmul_gpu, (GPU_BLOCK_M, GPU_BLOCK_N, GPU_BLOCK_K)
    return kernel(
        jnp.asarray(x),
        jnp.asarray(indices),
        jnp.asarray(codebook),
        jnp.asarray(scales),
        **kwargs,
        block_m=dm if block_m is None else block_m,
        block_n=dn if block_n is None else block_n,
        block_k=dk if block_k is None else block_k,
        interpret=interpret,
    )
