"""The vector-quantized weight matmul as a Pallas TPU (Mosaic) kernel.

Terminology (see ``reference`` for x, vector, codebook, indices, group, scales; d is
``vector_dim``):
  plane:  ``i`` in ``[0, d)``, the position inside a vector. Plane ``i`` of x is
          ``x_i[m, j] = x[m, j*d + i]`` and plane ``i`` of w is ``w_i[j, n] = w[j*d + i, n]``,
          so ``x @ w = sum_i x_i @ w_i`` and ``w_i[j, n] = codebook[indices[j, n], i] * scale``:
          each plane of w is a table lookup of the index tile itself, with no interleaving of
          rows (which a TPU vreg, 8 sublanes by 128 lanes, cannot do cheaply).
  page:   128 consecutive codewords, ``page = index >> 7``. A page of one plane of the codebook
          is a [1, 128] row, one entry per lane: the width of a vreg.
  tile:   the kernel's ``[block_m, bkv]`` piece of each x plane and ``[bkv, block_n]`` piece
          of ``indices`` (``bkv = block_k / d`` vectors), i.e. ``block_k`` rows of w.
  path:   how a tile meets the scales. ``'tile'``: the tile lies inside one group (per output
          channel, or the group a multiple of the tile), so the tile's partial product is
          scaled once, after the MXU. ``'group'``: the tile holds ``R = bkv / (group_size / d)``
          whole groups; their [R, block_n] scales are expanded to one scale per vector row by
          a one-hot matmul ``E @ scales`` (``E[j, r] = 1`` when vector ``j`` lies in group
          ``r``; exact at ``Precision.HIGHEST``), shared by every plane, and each plane of w is
          scaled before the MXU.

The gather. Mosaic lowers ``jnp.take_along_axis`` along lanes (``tpu.dynamic_gather``) when the
source is a single vreg wide: so the kernel broadcasts one page of one plane of the codebook
to ``[bkv, 128]`` and gathers every lane of the [bkv, block_n] index tile from it with the
index's low 7 bits; codebooks of more than one page gather from each page and select by the
page number. That is ``2**index_bits / 128`` gathers (1 up to 7 bits, 2 at 8, 8 at 10) and as
many selects per weight element on the VPU, and no float copy of w leaves VMEM. Above
``MAX_INDEX_BITS`` (16 pages and more) the lookup is estimated, not measured, to cost about as
much VPU time as the XLA reference spends writing and reading a float32 w, so ``supports`` is
False and the public function uses the reference.

Layout: the wrapper splits x into planes ``[d, M', K / d]`` (one pass over x, fused with the
padding of M; small next to the weight for decode shapes) and the codebook into pages
``[pages, d, 1, 128]`` float32 (``pages = max(1, 2**index_bits / 128)``; at most 32 KiB,
fetched into VMEM once, since its block index never changes). Grid ``(M tiles, N tiles, K tiles)``,
K innermost and ``'arbitrary'``; a float32 accumulator ``[block_m, block_n]`` is zeroed at
``k == 0`` and written out at the last ``k``.

Padding: M is padded to whole ``block_m`` tiles (``block_m`` shrinks to M rounded up to the row
alignment, 8 float32 / 16 bfloat16, when M is smaller). N uses a ``cdiv`` grid whose last tile
overhangs the array (columns of w are independent, so the overhang's indices, whatever they
hold, only reach output columns that Mosaic drops; indices are masked to ``index_bits`` bits
and pages, so no read leaves the codebook). K is never padded: ``bkv`` is the largest multiple
of 128 lanes within ``block_k / d`` (at least 128) that divides K / d and fits the groups;
on the ``'group'`` path, where ``R`` must be a multiple of 8 (a block's sublane tiling), the
smallest such multiple beyond ``block_k / d`` when none is within it; all of K / d when there is
none at all.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.codebook_matmul.reference import Problem, check_args

LANES = 128  # lanes of a vreg: a page of the codebook and the x planes' K tile granularity.
PAGE_BITS = 7  # log2(LANES)
SUBLANES = 8  # rows of a float32 vreg: the 'group' path's scale rows come in multiples of it.
MAX_INDEX_BITS = 10  # 8 pages: 8 gathers and selects per weight element.


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Static tiling of one call (see the module docstring)."""

    block_m: int
    padded_m: int
    block_n: int
    block_vectors: int  # bkv: vectors (index rows) per K tile, block_k / d
    path: str  # 'tile' or 'group'
    scale_rows: int  # rows of scales one K tile reads: 1 ('tile') or R ('group')


def _row_align(dtype) -> int:
    # A vreg holds 8 rows of 32-bit values, 16 of bf16 (two packed per sublane).
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def pages(index_bits: int) -> int:
    """Pages of 128 codewords in a codebook of ``2**index_bits`` (the last one padded)."""
    return max(1, 2 ** (index_bits - PAGE_BITS))


def supports(p: Problem) -> bool:
    """Whether the kernel takes this problem: ``index_bits <= MAX_INDEX_BITS``."""
    return p.index_bits <= MAX_INDEX_BITS


def _largest_divisor(n: int, unit: int, limit: int) -> int | None:
    """The largest multiple of ``unit`` that is <= ``limit`` and divides ``n``, or None."""
    for b in range(limit // unit * unit, 0, -unit):
        if n % b == 0:
            return b
    return None


def _smallest_divisor(n: int, unit: int) -> int:
    """The smallest multiple of ``unit`` that divides ``n``, or ``n``."""
    return next((b for b in range(unit, n, unit) if n % b == 0), n)


def tiles(p: Problem, dtype, *, block_m: int, block_n: int, block_k: int) -> Tiles:
    """The tiling ``codebook_matmul_tpu`` uses; validates the requested block sizes."""
    align = _row_align(dtype)
    if not isinstance(block_m, int) or block_m < align or block_m % align:
        raise ValueError(
            f"codebook_matmul_tpu block_m={block_m!r}: expected a positive multiple of {align} "
            f"for {jnp.dtype(dtype)}."
        )
    if not isinstance(block_n, int) or block_n < LANES or block_n % LANES:
        raise ValueError(
            f"codebook_matmul_tpu block_n={block_n!r}: expected a positive multiple of {LANES}."
        )
    if not isinstance(block_k, int) or block_k < 1:
        raise ValueError(
            f"codebook_matmul_tpu block_k={block_k!r}: expected a positive integer (rows of w "
            f"per K tile, rounded to a multiple of {LANES} * vector_dim)."
        )
    if not supports(p):
        raise ValueError(
            f"codebook_matmul_tpu index_bits={p.index_bits}: expected at most {MAX_INDEX_BITS}."
        )
    if p.m <= block_m:
        padded_m = max(align, -(-p.m // align) * align)
        bm = padded_m
    else:
        padded_m, bm = -(-p.m // block_m) * block_m, block_m
    bn = min(p.n, block_n)
    kv, limit = p.vectors, max(LANES, block_k // p.vector_dim // LANES * LANES)
    q = None if p.group_size is None else p.group_size // p.vector_dim  # vectors per group
    group_unit = None if q is None else math.lcm(SUBLANES * q, LANES)
    if kv <= limit:
        bkv = kv
    elif q is None:
        bkv = _largest_divisor(kv, LANES, limit) or kv
    else:
        # Whole tiles per group ('tile' path), else whole groups per tile ('group' path, whose
        # scale rows come in multiples of 8: past the limit if need be).
        bkv = (
            _largest_divisor(q, LANES, limit)
            or _largest_divisor(kv, group_unit, limit)
            or _smallest_divisor(kv, group_unit)
        )
    if q is None or q % bkv == 0:
        return Tiles(bm, padded_m, bn, bkv, "tile", 1)
    return Tiles(bm, padded_m, bn, bkv, "group", bkv // q)


def _lookup(cb_ref, plane: int, lo: jax.Array, page: jax.Array, n_pages: int) -> jax.Array:
    """float32 ``codebook[index, plane]`` of an index tile: ``lo`` its low 7 bits, ``page``
    the rest."""

    def gather(pg):
        table = jnp.broadcast_to(cb_ref[pg, plane], (lo.shape[0], LANES))  # [bkv, 128]
        return jnp.take_along_axis(table, lo, axis=1, mode="promise_in_bounds")

    # The page compares (one VPU op each) are redone per plane rather than held as masks.
    w = gather(0)
    for pg in range(1, n_pages):
        w = jnp.where(page == pg, gather(pg), w)
    return w


def _kernel(x_ref, idx_ref, cb_ref, s_ref, o_ref, acc_ref, *, p: Problem, t: Tiles, precision):
    # x_ref [d, bm, bkv]; idx_ref [bkv, bn] uint8/uint16; cb_ref [pages, d, 1, 128] f32;
    # s_ref [1, bn] ('tile') or [R, bn] ('group'); o_ref [bm, bn]; acc_ref [bm, bn] f32.
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    c = idx_ref[...].astype(jnp.int32) & (p.codebook_size - 1)  # [bkv, bn]
    lo = c & (LANES - 1)
    page = c >> PAGE_BITS
    scale = None
    if t.path == "group":
        # One scale per vector row: E [bkv, R] one-hot of each row's group, times the scales.
        q = p.group_size // p.vector_dim
        shape = (t.block_vectors, t.scale_rows)
        row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        first = jax.lax.broadcasted_iota(jnp.int32, shape, 1) * q
        onehot = ((row >= first) & (row < first + q)).astype(jnp.float32)
        scale = jnp.dot(
            onehot,
            s_ref[...],
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )  # [bkv, bn]
    partial = None
    for plane in range(p.vector_dim):
        w = _lookup(cb_ref, plane, lo, page, pages(p.index_bits))  # [bkv, bn] f32
        if scale is not None:
            w = w * scale
        x = x_ref[plane]  # [bm, bkv]
        dot = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32, precision=precision)
        partial = dot if partial is None else partial + dot
    if t.path == "tile":
        partial = partial * s_ref[...]
    acc_ref[...] += partial

    @pl.when(k == pl.num_programs(2) - 1)
    def _write():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def x_planes(x: jax.Array, vector_dim: int, padded_m: int) -> jax.Array:
    """[M, K] to ``[d, padded_m, K / d]``: plane ``i`` holds columns ``j*d + i``."""
    m, k = x.shape
    x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
    return x.reshape(padded_m, k // vector_dim, vector_dim).transpose(2, 0, 1)


def codebook_pages(codebook: jax.Array, index_bits: int) -> jax.Array:
    """[2**b, d] to float32 ``[pages, d, 1, 128]``: ``[pg, i, 0, l] = codebook[128*pg + l, i]``.

    Codebooks smaller than a page are padded with zeros (never read: indices are masked).
    """
    c, d = codebook.shape
    n_pages = pages(index_bits)
    cb = jnp.pad(codebook.astype(jnp.float32), ((0, n_pages * LANES - c), (0, 0)))
    return cb.reshape(n_pages, LANES, d).transpose(0, 2, 1).reshape(n_pages, d, 1, LANES)


def codebook_matmul_tpu(
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
    """``x @ w`` on TPU, each tile of w looked up in VMEM from its indices, plane by plane.

    Grid ``(M' / block_m, cdiv(N, block_n), K / block_k)``, semantics
    ``('parallel', 'parallel', 'arbitrary')``. BlockSpecs: x planes ``(d, block_m, bkv)`` at
    ``(0, i, k)``; indices ``(bkv, block_n)`` at ``(k, j)``; codebook pages whole (constant
    index: fetched once); scales ``(1, block_n)`` of the K tile's group (``'tile'``, from
    scales viewed as ``[groups, 1, N]``) or ``(R, block_n)`` at ``(k, j)`` (``'group'``);
    output ``(block_m, block_n)`` at ``(i, j)``. See the module docstring for planes, pages,
    paths and padding.

    Args:
      x, indices, codebook, scales, vector_dim, index_bits, group_size, out_dtype: as
        ``api.codebook_matmul``; ``index_bits <= MAX_INDEX_BITS``.
      block_m: rows per tile, a multiple of 8 (16 for bfloat16); all rows when M is smaller.
      block_n: output columns per tile, a multiple of 128; all of N when N is smaller.
      block_k: rows of w per K tile, an upper bound (see ``tiles``).
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
    t = tiles(p, x.dtype, block_m=block_m, block_n=block_n, block_k=block_k)
    d, bm, bn, bkv = p.vector_dim, t.block_m, t.block_n, t.block_vectors
    if t.path == "tile":
        # K tile k lies in group k // tiles_per_group (per output channel: group 0).
        tiles_per_group = (p.group_size or p.k) // (bkv * d)

        def scale_tile(i, j, k):
            # lax.div: jnp's floor division lowers through `sign`, which Mosaic ties to a device.
            return (k if tiles_per_group == 1 else jax.lax.div(k, tiles_per_group), 0, j)

        scale_operand = scales.reshape(p.groups, 1, p.n)
        scale_spec = pl.BlockSpec((None, 1, bn), scale_tile)
    else:
        scale_operand = scales
        scale_spec = pl.BlockSpec((t.scale_rows, bn), lambda i, j, k: (k, j))
    cb = codebook_pages(codebook, index_bits)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = pl.pallas_call(
        functools.partial(_kernel, p=p, t=t, precision=precision),
        grid=(t.padded_m // bm, pl.cdiv(p.n, bn), p.vectors // bkv),
        in_specs=[
            pl.BlockSpec((d, bm, bkv), lambda i, j, k: (0, i, k)),
            pl.BlockSpec((bkv, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec(cb.shape, lambda i, j, k: (0, 0, 0, 0)),
            scale_spec,
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t.padded_m, p.n), p.out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(x_planes(x, d, t.padded_m), indices, cb, scale_operand)
    return y[: p.m]
