"""The vector-quantized weight matmul as a Pallas GPU kernel with the Triton lowering.

Terminology (see ``reference`` for x, vector, codebook, indices, group, scales; d is
``vector_dim``):
  program:  one ``[block_m, block_n]`` tile of the output; it loops over K in steps of
            ``block_k`` rows (``lax.fori_loop``), carrying a float32 ``[block_m, block_n]``
            accumulator in registers (Triton runs a grid's programs in parallel, so the TPU
            kernel's reduction grid axis with a scratch accumulator is not available).
  path:     ``'tile'`` when each K step lies inside one group (per output channel, or
            ``group_size`` a multiple of ``block_k``): the step's partial product is scaled
            once. ``'gather'`` otherwise (any group size): every row ``k`` of a step loads
            scale row ``k // group_size`` (a gather that hits the cache ``group_size`` times
            per row) and the tile of w is scaled before ``tl.dot``.

The gather. Triton lowers loads through a tensor of pointers, so a ref indexed by integer
arrays is a gather: each K step builds its ``[block_k, block_n]`` tile of w directly, row ``k``
reading index row ``k // d`` (each index is read d times, from L1) and then
``codebook[index, k % d]`` from the codebook, a whole-array operand of every program whose
``2**index_bits * d`` values (128 B at 4 bits and d = 2 in float32, 2 MiB at 16 bits and
d = 8) stay in L1 / L2 across the programs. Rows of w never need to be regrouped, the tile
lands in registers in the layout ``tl.dot`` takes, and no float copy of w touches HBM. Any
``index_bits`` from 4 to 16 works. (The Pallas Triton lowering has no gather from a loaded
tensor, so the codebook is not staged in shared memory: an open performance question for
small M, where these cached loads, two per weight element, bound the kernel.)

Triton tiles are powers of two and ``tl.dot`` needs every dimension >= 16: tiles are clamped to
``max(16, next_power_of_2(size))``. Loads of x and indices and stores of the output that would
overhang M, K or N are masked (masked loads read 0: a 0 of x, or index 0, whose finite
codeword only reaches output that is not stored); rows past K read the last index row and
scale row (clamped) against zeros of x. Indices are masked to ``index_bits`` bits, so no load
leaves the codebook. Scales are read unmasked: the wrapper pads their columns to whole tiles
(a copy of this small array, only when N is not a multiple of ``block_n``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch
from pallas_kernels.codebook_matmul.reference import Problem, check_args

MIN_DOT = dispatch.MIN_DOT
NUM_WARPS = 4


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Static tiling of one call (see the module docstring)."""

    block_m: int
    block_n: int
    block_k: int
    path: str  # 'tile' or 'gather'


def tiles(p: Problem, *, block_m: int, block_n: int, block_k: int) -> Tiles:
    """The tiling ``codebook_matmul_gpu`` uses; validates the requested block sizes."""
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if not dispatch.is_tile_size(b):
            raise ValueError(
                f"codebook_matmul_gpu {name}={b!r}: expected a power of two >= {MIN_DOT}."
            )
    bk = dispatch.clamp_tile(block_k, p.k)
    tile = p.group_size is None or p.group_size % bk == 0
    return Tiles(
        block_m=dispatch.clamp_tile(block_m, p.m),
        block_n=dispatch.clamp_tile(block_n, p.n),
        block_k=bk,
        path="tile" if tile else "gather",
    )


def _and(a, b):
    if a is None:
        return b
    return a if b is None else a & b


def _kernel(x_ref, idx_ref, cb_ref, s_ref, o_ref, *, p: Problem, t: Tiles, precision):
    # x_ref [bm, K]; idx_ref [K / d, bn] uint8/uint16; cb_ref [2**b, d] (its own dtype);
    # s_ref [groups, bn] f32; o_ref [bm, bn]. The x, indices and out blocks of the last tiles
    # overhang M and N, and the last K step may overhang K: those loads and stores are masked.
    bm, bn, bk, d = t.block_m, t.block_n, t.block_k, p.vector_dim
    row_ok = col_ok = None
    if p.m % bm:
        row_ok = (pl.program_id(0) * bm + jax.lax.iota(jnp.int32, bm) < p.m)[:, None]  # [bm, 1]
    if p.n % bn:
        col_ok = (pl.program_id(1) * bn + jax.lax.iota(jnp.int32, bn) < p.n)[None, :]  # [1, bn]
    cols = jax.lax.iota(jnp.int32, bn)[None, :]  # [1, bn]

    def step(kk, acc):
        k0 = kk * bk
        rows = k0 + jax.lax.iota(jnp.int32, bk)  # [bk]: rows of w in this step
        k_row = None
        if p.k % bk:
            k_row = (rows < p.k)[None, :]
        if row_ok is None and k_row is None:
            x = x_ref[:, pl.ds(k0, bk)]
        else:
            mask = _and(row_ok, k_row)
            x = plgpu.load(x_ref.at[:, pl.ds(k0, bk)], mask=mask, other=0)
        # Row k of w reads index row k // d (clamped: rows past K meet zeros of x).
        vec = jnp.minimum(jax.lax.div(rows, d), p.vectors - 1)[:, None]  # [bk, 1]
        if col_ok is None:
            c = idx_ref[vec, cols]
        else:
            c = plgpu.load(idx_ref.at[vec, cols], mask=jnp.broadcast_to(col_ok, (bk, bn)), other=0)
        c = c.astype(jnp.int32) & (p.codebook_size - 1)  # [bk, bn]
        w = cb_ref[c, jax.lax.rem(rows, d)[:, None]].astype(jnp.float32)  # codebook[c, k % d]
        if t.path == "tile":
            # The step lies in group k0 // group_size (row 0 per output channel): one scale row.
            row = 0 if p.group_size is None else jax.lax.div(k0, p.group_size)
            partial = jnp.dot(
                x, w.astype(x.dtype), preferred_element_type=jnp.float32, precision=precision
            )
            return acc + partial * s_ref[pl.ds(row, 1), :]
        groups = jnp.minimum(jax.lax.div(rows, p.group_size), p.groups - 1)  # [bk]
        w = (w * s_ref[groups, :]).astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)

    acc = jax.lax.fori_loop(0, pl.cdiv(p.k, bk), step, jnp.zeros((bm, bn), jnp.float32))
    y = acc.astype(o_ref.dtype)
    out_mask = _and(row_ok, col_ok)
    if out_mask is None:
        o_ref[...] = y
    else:
        plgpu.store(o_ref, y, mask=jnp.broadcast_to(out_mask, y.shape))


def codebook_matmul_gpu(
    x: jax.Array,
    indices: jax.Array,
    codebook: jax.Array,
    scales: jax.Array,
    *,
    vector_dim: int,
    index_bits: int,
    group_size: int | None = None,
    out_dtype=None,
    block_m: int,
    block_n: int,
    block_k: int,
    interpret: bool = False,
) -> jax.Array:
    """``x @ w`` on GPU (Triton), each K step of w gathered into registers from its indices.

    Grid ``(cdiv(M, block_m), cdiv(N, block_n))``, every program independent. BlockSpecs: x
    ``(block_m, K)`` at ``(i, 0)`` and indices ``(K / d, block_n)`` at ``(0, j)`` (the kernel
    walks K through them); codebook whole; scales ``(groups, block_n)`` at ``(0, j)``; output
    ``(block_m, block_n)`` at ``(i, j)``. See the module docstring for the K loop, the gather,
    the paths and masking.

    Args:
      x, indices, codebook, scales, vector_dim, index_bits, group_size, out_dtype: as
        ``api.codebook_matmul``.
      block_m: rows per program, a power of two >= 16 (clamped for small M).
      block_n: output columns per program, a power of two >= 16 (clamped for small N).
      block_k: rows of w per K step, a power of two >= 16 (need not be a multiple of d).
      interpret: run the kernel in Pallas interpret mode (any backend).

    Returns:
      [M, N] in ``out_dtype`` (default x's dtype); float32 accumulation.
    """
    p = check_args(
        x,
        indices,
        codebook,
        scales,
        vector_dim=vector_dim,
        index_bits=index_bits,
        group_size=group_size,
        out_dtype=out_dtype,
    )
    t = tiles(p, block_m=block_m, block_n=block_n, block_k=block_k)
    bm, bn = t.block_m, t.block_n
    padded_n = pl.cdiv(p.n, bn) * bn
    if padded_n != p.n:
        scales = jnp.pad(scales, ((0, 0), (0, padded_n - p.n)), constant_values=1)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return pl.pallas_call(
        functools.partial(_kernel, p=p, t=t, precision=precision),
        grid=(pl.cdiv(p.m, bm), pl.cdiv(p.n, bn)),
        in_specs=[
            pl.BlockSpec((bm, p.k), lambda i, j: (i, 0)),
            pl.BlockSpec((p.vectors, bn), lambda i, j: (0, j)),
            pl.BlockSpec((p.codebook_size, p.vector_dim), lambda i, j: (0, 0)),
            pl.BlockSpec((p.groups, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((p.m, p.n), p.out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
        interpret=interpret,
    )(x, indices, codebook, scales)
