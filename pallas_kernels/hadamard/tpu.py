"""Blockwise Walsh–Hadamard transform as a Pallas TPU (Mosaic) kernel.

Terminology (see ``reference`` for block and H_b):
  rows:          the leading axis of ``x2d`` [rows, n] (all leading axes of ``x``, flattened).
  width:         the columns one program handles: ``block`` when ``block >= 128``; for smaller
                 blocks 128 lanes (``128 // block`` blocks side by side) or, when ``n < 128``,
                 the whole row.
  matmul_block:  the largest ``H_c`` one MXU matmul multiplies by (``MATMUL_BLOCK``).
  tile:          the ``[block_rows, width]`` piece of ``x2d`` one program loads into VMEM.

Each program multiplies its tile by ``I ⊗ H_c`` on the MXU (float32 accumulation) and, when the
block is bigger than ``matmul_block``, finishes ``H_block = H_a ⊗ H_c`` with an in-register
butterfly over the ``a = block // c`` column slices of the tile (``log2(a)`` add/subtract
stages on the VPU). Everything is one pass over HBM and needs no in-kernel reshape.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.hadamard.reference import check_block, hadamard_matrix

LANES = 128
# The largest H_c multiplied on the MXU: a [512, 512] f32 operand is 1 MiB of VMEM.
MATMUL_BLOCK = 512
# Row tiles shrink for wide blocks so that a tile holds at most this many elements (1 MiB f32).
TILE_ELEMENTS = 2**17
# A [8, block] tile (in, out, double-buffered) plus its f32 copy must fit the scoped VMEM.
MAX_BLOCK = 2**15
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _butterfly(z: list[jax.Array]) -> list[jax.Array]:
    """Applies H_a (Sylvester order) across the list: ``out[p] = sum_i H_a[p, i] * z[i]``."""
    z = list(z)
    half = 1
    while half < len(z):
        for start in range(0, len(z), 2 * half):
            for i in range(start, start + half):
                z[i], z[i + half] = z[i] + z[i + half], z[i] - z[i + half]
        half *= 2
    return z


def _hadamard_kernel(x_ref, h_ref, o_ref, *, matmul_block, n, scale, precision):
    # x_ref, o_ref: [block_rows, width] tile; h_ref: [c, c] = I ⊗ H (c = matmul_block), in VMEM.
    # No grid axis reduces, so there is no accumulator to zero: every program owns its output.
    width = x_ref.shape[1]
    c = matmul_block
    h = h_ref[...]
    z = []
    for i in range(width // c):
        x = x_ref[:, i * c : (i + 1) * c]  # [block_rows, c]
        if n % width:
            # The last column tile overhangs n: its padding is unspecified VMEM, and 0 * NaN
            # would leak into valid columns through the matmul, so zero it first.
            col = pl.program_id(1) * width + i * c + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
            x = jnp.where(col < n, x, jnp.zeros_like(x))
        z.append(jnp.dot(x, h, preferred_element_type=jnp.float32, precision=precision))
    for p, y in enumerate(_butterfly(z)):
        o_ref[:, p * c : (p + 1) * c] = (y * scale).astype(o_ref.dtype)


def tile_shape(rows: int, n: int, block: int, dtype, block_rows: int) -> tuple[int, int]:
    """The ``[block_rows, width]`` tile ``hadamard_tpu`` uses (Mosaic's (8, 128) rule holds)."""
    if block >= LANES:
        width = block
    else:
        width = n if n < LANES else LANES
    align = _row_align(dtype)
    tile_rows = min(block_rows, max(align, TILE_ELEMENTS // width // align * align))
    return (rows if rows <= tile_rows else tile_rows), width


def _row_align(dtype) -> int:
    # A vreg holds 8 rows of 32-bit values, 16 of bf16 (two packed per sublane).
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def hadamard_tpu(
    x2d: jax.Array,
    block: int,
    *,
    normalize: bool,
    block_rows: int,
    interpret: bool = False,
    matmul_block: int = MATMUL_BLOCK,
) -> jax.Array:
    """Blockwise Walsh–Hadamard transform of ``x2d`` [rows, n] along its last axis, on TPU.

    Grid ``(cdiv(rows, tile_rows), cdiv(n, width))``, both axes ``parallel``; the x and output
    BlockSpecs map program ``(i, j)`` to tile ``(i, j)`` of ``[tile_rows, width]``
    (``tile_shape``); ``I ⊗ H_c`` [c, c] is a whole-array VMEM input, loaded once. Widths:
    ``block >= 128``: one block per tile; smaller blocks: 128 lanes, i.e. ``128 // block``
    blocks multiplied at once by the block-diagonal ``I ⊗ H_block`` (the whole row when
    ``n < 128``). A last row tile that overhangs ``rows`` needs no mask: rows are independent
    and Mosaic drops the out-of-bounds writes. A last column tile that overhangs ``n`` (small
    blocks, ``n % 128 != 0``) is zeroed past ``n`` in the kernel.

    Args:
      x2d: float32 or bfloat16 [rows, n].
      block: a power of two dividing ``n``, at most ``MAX_BLOCK``.
      normalize: divide by ``sqrt(block)``.
      block_rows: rows per tile, a multiple of 8 (16 for bfloat16); fewer when a tile would
        exceed ``TILE_ELEMENTS`` (wide blocks), all rows when ``rows`` is smaller.
      interpret: run the kernel in Pallas interpret mode (any backend).
      matmul_block: largest ``H_c`` multiplied on the MXU (a power of two >= 128); bigger blocks
        are split as ``H_block = H_a ⊗ H_c``, ``H_a`` applied by the butterfly.

    Returns:
      [rows, n] of ``x2d``'s dtype; float32 arithmetic, one rounding at the end.
    """
    block = check_block(block)
    if x2d.ndim != 2:
        raise ValueError(f"hadamard_tpu x2d: expected [rows, n], got shape {x2d.shape}.")
    if x2d.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hadamard_tpu x2d: expected float32 or bfloat16, got {x2d.dtype}.")
    rows, n = x2d.shape
    if n % block:
        raise ValueError(f"hadamard_tpu block={block}: must divide n, got x2d.shape={x2d.shape}.")
    if block > MAX_BLOCK:
        raise ValueError(
            f"hadamard_tpu block={block}: at most {MAX_BLOCK} (a [8, block] tile must fit VMEM)."
        )
    align = _row_align(x2d.dtype)
    if not isinstance(block_rows, int) or block_rows < align or block_rows % align:
        raise ValueError(
            f"hadamard_tpu block_rows={block_rows!r}: expected a positive multiple of {align} "
            f"for {x2d.dtype}."
        )
    if (
        not isinstance(matmul_block, int)
        or matmul_block < LANES
        or matmul_block & (matmul_block - 1)
    ):
        raise ValueError(
            f"hadamard_tpu matmul_block={matmul_block!r}: expected a power of two >= {LANES}."
        )
    tile_rows, width = tile_shape(rows, n, block, x2d.dtype, block_rows)
    c = min(width, matmul_block)
    h = np.kron(np.eye(c // block if block < c else 1), hadamard_matrix(min(block, c)))
    precision = jax.lax.Precision.HIGHEST if x2d.dtype == jnp.float32 else None
    kernel = functools.partial(
        _hadamard_kernel,
        matmul_block=c,
        n=n,
        scale=1.0 / math.sqrt(block) if normalize else 1.0,
        precision=precision,
    )
    tile = pl.BlockSpec((tile_rows, width), lambda i, j: (i, j))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(rows, tile_rows), pl.cdiv(n, width)),
        in_specs=[tile, pl.BlockSpec(memory_space=pltpu.VMEM)],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(x2d.shape, x2d.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
    )(x2d, jnp.asarray(h, x2d.dtype))
