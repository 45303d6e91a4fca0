"""Blockwise Walsh–Hadamard transform as Pallas GPU kernels with the Triton lowering.

Terminology (see ``reference`` for block and H_b):
  rows:    the leading axis of ``x2d`` [rows, n] (all leading axes of ``x``, flattened).
  factor:  ``H_block = H_f[k-1] ⊗ ... ⊗ H_f[1] ⊗ H_f[0]``, each ``f <= MAX_FACTOR``; factor 0
           acts on the fastest-varying index bits inside a block, factor ``k-1`` on the slowest.
  inner:   ``f[0] * ... * f[j-1]``, the stride (in elements) between the entries factor ``j``
           mixes.
  pass:    one ``pallas_call`` applying one factor to the whole array.

Triton tiles are powers of two and ``tl.dot`` wants every dimension >= 16, so:
  - pass 0 multiplies ``[block_rows, width]`` tiles of ``x2d`` by ``I ⊗ H_f[0]`` [width, width],
    ``width = max(f[0], 16)`` (blocks smaller than 16 sit side by side in one tile, under the
    block-diagonal ``I ⊗ H_block``); loads and stores are masked where a tile overhangs ``rows``
    or ``n``, the masked-off elements read as 0.
  - pass ``j >= 1`` views the [rows, n] intermediate, for free (row-major), as
    ``[rows * n / (f * inner), f, inner]`` and left-multiplies ``[f, min(inner, 128)]`` tiles
    by ``H_f``. Blocks above 128 split into factors of 16 to 128 (balanced), so any block works.
Intermediates between passes are float32; the output is rounded once, in the last pass.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.hadamard.reference import check_block, hadamard_matrix

MIN_DOT = 16  # Triton's dot needs M, N, K >= 16.
MAX_FACTOR = 128  # largest H_f one pass multiplies by: [128, 128] f32 is 64 KiB.
INNER_TILE = 128  # columns of a strided-pass tile.
NUM_WARPS = 4
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def factors(block: int) -> list[int]:
    """Balanced power-of-two factors of ``block``, fastest index bits first.

    One factor when ``block <= MAX_FACTOR``; otherwise ``ceil(log2(block) / 7)`` factors, each
    between 16 and 128 (e.g. 1024 -> [32, 32], 2**15 -> [32, 32, 32]).
    """
    bits = check_block(block).bit_length() - 1
    max_bits = MAX_FACTOR.bit_length() - 1
    k = max(1, -(-bits // max_bits))
    return [2 ** (bits // k + (1 if i < bits % k else 0)) for i in range(k)]


def _dot(a, b):
    # f32 operands: IEEE f32 (not TF32), to match the reference; H is exact in any dtype.
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _rows_kernel(x_ref, h_ref, o_ref, *, rows, n, scale):
    # x_ref, o_ref: [tile_rows, width] tile of x2d; h_ref: [width, width] = I ⊗ H_f[0].
    tile_rows, width = x_ref.shape
    mask = None
    if rows % tile_rows:
        row = pl.program_id(0) * tile_rows + jax.lax.broadcasted_iota(jnp.int32, x_ref.shape, 0)
        mask = row < rows
    if n % width:
        col = pl.program_id(1) * width + jax.lax.broadcasted_iota(jnp.int32, x_ref.shape, 1)
        mask = col < n if mask is None else mask & (col < n)
    if mask is None:
        x = x_ref[...]
    else:
        x = plgpu.load(x_ref, mask=mask, other=0.0)
    y = (_dot(x, h_ref[...]) * scale).astype(o_ref.dtype)
    if mask is None:
        o_ref[...] = y
    else:
        plgpu.store(o_ref, y, mask=mask)


def _strided_kernel(h_ref, x_ref, o_ref, *, scale):
    # h_ref: [f, f] = H_f; x_ref, o_ref: [f, inner_tile] (the leading axis squeezed).
    o_ref[...] = (_dot(h_ref[...], x_ref[...]) * scale).astype(o_ref.dtype)


def _rows_pass(x2d, f, *, block_rows, out_dtype, scale, interpret):
    rows, n = x2d.shape
    width = max(f, MIN_DOT)
    tile_rows = min(block_rows, max(MIN_DOT, pl.next_power_of_2(rows)))
    h = jnp.asarray(np.kron(np.eye(width // f), hadamard_matrix(f)), x2d.dtype)  # I ⊗ H_f
    tile = pl.BlockSpec((tile_rows, width), lambda i, j: (i, j))
    return pl.pallas_call(
        functools.partial(_rows_kernel, rows=rows, n=n, scale=scale),
        grid=(pl.cdiv(rows, tile_rows), pl.cdiv(n, width)),
        in_specs=[tile, pl.BlockSpec((width, width), lambda i, j: (0, 0))],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(x2d.shape, out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
        interpret=interpret,
    )(x2d, h)


def _strided_pass(y2d, f, inner, *, out_dtype, scale, interpret):
    view = y2d.reshape(-1, f, inner)  # [rows * n / (f * inner), f, inner]
    inner_tile = min(inner, INNER_TILE)
    tile = pl.BlockSpec((None, f, inner_tile), lambda m, k: (m, 0, k))
    out = pl.pallas_call(
        functools.partial(_strided_kernel, scale=scale),
        grid=(view.shape[0], inner // inner_tile),
        in_specs=[pl.BlockSpec((f, f), lambda m, k: (0, 0)), tile],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(view.shape, out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
        interpret=interpret,
    )(jnp.asarray(hadamard_matrix(f), y2d.dtype), view)
    return out.reshape(y2d.shape)


def hadamard_gpu(
    x2d: jax.Array,
    block: int,
    *,
    normalize: bool,
    block_rows: int,
    interpret: bool = False,
) -> jax.Array:
    """Blockwise Walsh–Hadamard transform of ``x2d`` [rows, n] along its last axis, on GPU.

    One Triton ``pallas_call`` per factor of ``H_block`` (see the module docstring): blocks up to
    128 take one pass over HBM, up to 2**14 two, up to 2**21 three. Blocks smaller than 16 are
    handled by the kernel itself, ``16 // block`` of them per 16-lane tile under ``I ⊗ H_block``.
    Rows (and, for blocks below 16, columns) that do not fill the last tile are masked.

    Args:
      x2d: float32, bfloat16 or float16 [rows, n].
      block: a power of two dividing ``n``.
      normalize: divide by ``sqrt(block)``.
      block_rows: rows per tile of the first pass, a power of two >= 16 (capped at ``rows``
        rounded up to a power of two).
      interpret: run the kernels in Pallas interpret mode (any backend).

    Returns:
      [rows, n] of ``x2d``'s dtype; float32 arithmetic, one rounding at the end.
    """
    block = check_block(block)
    if x2d.ndim != 2:
        raise ValueError(f"hadamard_gpu x2d: expected [rows, n], got shape {x2d.shape}.")
    if x2d.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"hadamard_gpu x2d: expected float32, bfloat16 or float16, got {x2d.dtype}."
        )
    if x2d.shape[1] % block:
        raise ValueError(f"hadamard_gpu block={block}: must divide n, got x2d.shape={x2d.shape}.")
    if not isinstance(block_rows, int) or block_rows < MIN_DOT or block_rows & (block_rows - 1):
        raise ValueError(
            f"hadamard_gpu block_rows={block_rows!r}: expected a power of two >= {MIN_DOT}."
        )
    fs = factors(block)
    scale = 1.0 / math.sqrt(block) if normalize else 1.0
    last = len(fs) - 1

    def out_dtype(j):
        return x2d.dtype if j == last else jnp.float32

    y = _rows_pass(
        x2d,
        fs[0],
        block_rows=block_rows,
        out_dtype=out_dtype(0),
        scale=scale if last == 0 else 1.0,
        interpret=interpret,
    )
    inner = fs[0]
    for j, f in enumerate(fs[1:], start=1):
        y = _strided_pass(
            y,
            f,
            inner,
            out_dtype=out_dtype(j),
            scale=scale if j == last else 1.0,
            interpret=interpret,
        )
        inner *= f
    return y
