"""The low-bit weight matmul as a Pallas TPU (Mosaic) kernel.

Terminology (see ``reference`` for x, codes, scales, group; ``decode`` for plane):
  per:       codes per byte, ``8 // bits``; byte column ``j`` of ``codes`` holds output columns
             ``per*j .. per*j + per - 1``, one per plane.
  tile:      the kernel's ``[block_m, block_k]`` piece of x and ``[block_k, block_n // per]``
             piece of ``codes`` (bytes), i.e. ``block_n`` output columns.
  path:      how a tile meets the scales. ``'tile'``: the tile lies inside one group (per output
             channel, or ``group_size`` a multiple of ``block_k``), so each plane's partial
             product ``x @ (v - zero)`` is scaled once, after the MXU. ``'group'``: the tile
             holds ``block_k // group_size`` whole groups; each plane is dequantized in VMEM,
             group by group, into a ``[block_k, block_n // per]`` scratch in x's dtype, which
             the MXU then multiplies.

The kernel reads only the packed codes (never a float copy of w from HBM). Grid
``(M tiles, N tiles, K tiles)``, K innermost and ``'arbitrary'``; a float32 accumulator
``[per, block_m, block_n // per]`` is zeroed at ``k == 0`` and written out at the last ``k``
(times ``tensor_scale``). Plane ``p`` of every byte is a ``[block_k, block_n // per]`` matrix of
the codes of columns ``per*j + p``: one MXU matmul per plane, written to plane ``p`` of the
output ``[per, M, N / per]``, which the wrapper interleaves back to ``[M, N]`` (one extra pass
over the output only; a free reshape for 8 bits). The scales (and zero points) are likewise
regrouped by the wrapper into planes ``[per, K tiles, rows per tile, 1, N / per]`` (see
``to_planes``): a pass over the scales (``1 / group_size`` as many elements as the weight, in
their stored dtype; free for 8 bits), since a Mosaic tile cannot pick every ``per``-th lane,
so that each plane's scales of a K tile are one rectangular block and each scale row a leading
index. Everything else happens in VMEM: codes widen to int32, planes split by shifts, codes
and scales decode by bit arithmetic (``decode``).

Padding: M below ``block_m`` is padded to the row alignment (8 float32, 16 bfloat16); a larger
M, and N, use a ``cdiv`` grid whose last tile overhangs the array (rows of x and columns of w
are independent in a matmul, so the overhang only touches output that Mosaic drops). K is
never padded: ``block_k`` is the largest multiple of 32 (uint8 sublane tiling) within the
requested size that divides K and fits the groups, or K itself when there is none.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quantized_matmul import decode
from pallas_kernels.quantized_matmul.reference import Problem, check_args

LANES = 128
K_ALIGN = 32  # rows of a uint8 (32, 128) VMEM tile: block_k's granularity.
GROUP_ALIGN = 16  # 'group' path: group rows sliced from f32 / stored to a bf16 scratch.


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Static tiling of one call (see the module docstring)."""

    block_m: int
    padded_m: int
    block_k: int
    packed_block_n: int  # bytes of a codes row per tile: block_n // per
    path: str  # 'tile' or 'group'
    scale_rows: int  # rows of scales one K tile reads: 1 ('tile') or block_k // group_size


def _row_align(dtype) -> int:
    # A vreg holds 8 rows of 32-bit values, 16 of bf16 (two packed per sublane).
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def supports(p: Problem) -> bool:
    """Whether the kernel takes this problem: per-channel scales, or groups of a multiple of
    ``GROUP_ALIGN`` rows (or a single group)."""
    g = p.group_size
    return g is None or g == p.k or g % GROUP_ALIGN == 0


def _largest_divisor(k: int, unit: int, limit: int) -> int | None:
    """The largest multiple of ``unit`` that is <= ``limit`` and divides ``k``, or None."""
    for bk in range(limit // unit * unit, 0, -unit):
        if k % bk == 0:
            return bk
    return None


def tiles(p: Problem, dtype, *, block_m: int, block_n: int, block_k: int) -> Tiles:
    """The tiling ``quantized_matmul_tpu`` uses; validates the requested block sizes."""
    align = _row_align(dtype)
    if not isinstance(block_m, int) or block_m < align or block_m % align:
        raise ValueError(
            f"quantized_matmul_tpu block_m={block_m!r}: expected a positive multiple of {align} "
            f"for {jnp.dtype(dtype)}."
        )
    lanes = LANES * p.per_byte
    if not isinstance(block_n, int) or block_n < lanes or block_n % lanes:
        raise ValueError(
            f"quantized_matmul_tpu block_n={block_n!r}: expected a positive multiple of {lanes} "
            f"({LANES} lanes of bytes, {p.per_byte} columns per byte at {p.bits} bits)."
        )
    if not isinstance(block_k, int) or block_k < K_ALIGN or block_k % K_ALIGN:
        raise ValueError(
            f"quantized_matmul_tpu block_k={block_k!r}: expected a positive multiple of {K_ALIGN}."
        )
    if not supports(p):
        raise ValueError(
            f"quantized_matmul_tpu group_size={p.group_size}: expected None, K or a multiple of "
            f"{GROUP_ALIGN}."
        )
    k, g = p.k, p.group_size
    if p.m <= block_m:
        padded_m = -(-p.m // align) * align
        bm = padded_m
    else:
        padded_m, bm = p.m, block_m
    bnb = min(p.packed_n, block_n // p.per_byte)
    if k <= block_k:
        bk = k
    elif g is not None and g < block_k:
        bk = _largest_divisor(k, math.lcm(g, K_ALIGN), block_k) or k
    else:
        bk = _largest_divisor(g or k, K_ALIGN, block_k) or k
    if g is None or g % bk == 0:
        return Tiles(bm, padded_m, bk, bnb, "tile", 1)
    return Tiles(bm, padded_m, bk, bnb, "group", bk // g)


def _kernel(*refs, p: Problem, t: Tiles, precision):
    # refs: x [bm, bk]; codes [bk, bnb] uint8; scales [per, rows, 1, bnb]; zeros (same)?;
    # tensor_scale (1,) and lut (2**bits,) in SMEM?; out [per, bm, bnb]; scratch: acc
    # [per, bm, bnb] f32, and w [bk, bnb] in x's dtype for the 'group' path.
    refs = list(refs)
    x_ref, c_ref, s_ref = refs[:3]
    rest = refs[3:]
    z_ref = rest.pop(0) if p.has_zeros else None
    t_ref = rest.pop(0) if p.has_tensor_scale else None
    lut_ref = rest.pop(0) if p.fmt == "lut" else None
    o_ref, acc_ref, *scratch = rest
    w_ref = scratch[0] if scratch else None
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    lut = None if lut_ref is None else (lambda i: lut_ref[i])

    def scale(plane, i):  # [1, bnb] float32: scale row i of this K tile (a leading index)
        return decode.scale_values(s_ref[plane, i], p.scale_dtype)

    def zero(plane, i):  # [1, bnb] float32
        return z_ref[plane, i].astype(jnp.int32).astype(jnp.float32)

    for plane, c in enumerate(decode.planes(c_ref[...], p.bits)):  # c: [bk, bnb] int32
        if t.path == "tile":
            v = decode.code_values(c, fmt=p.fmt, bits=p.bits, lut=lut)
            if z_ref is not None:
                v = v - zero(plane, 0)
            partial = jnp.dot(
                x, v.astype(x.dtype), preferred_element_type=jnp.float32, precision=precision
            )
            acc_ref[plane] += partial * scale(plane, 0)
        else:
            # Dequantize group by group into the scratch: rows [i*g, (i+1)*g) share scale row
            # i. Slices of the int32 codes and stores to the scratch are tile-aligned (g % 16).
            g = p.group_size
            for i in range(t.scale_rows):
                v = decode.code_values(c[i * g : (i + 1) * g], fmt=p.fmt, bits=p.bits, lut=lut)
                if z_ref is not None:
                    v = v - zero(plane, i)
                w = v * scale(plane, i)
                w_ref[i * g : (i + 1) * g, :] = w.astype(w_ref.dtype)
            acc_ref[plane] += jnp.dot(
                x, w_ref[...], preferred_element_type=jnp.float32, precision=precision
            )

    @pl.when(k == pl.num_programs(2) - 1)
    def _write():
        y = acc_ref[...]
        if t_ref is not None:
            y = y * t_ref[0]
        o_ref[...] = y.astype(o_ref.dtype)


def to_planes(a: jax.Array, per: int, packed_n: int, rows: int) -> jax.Array:
    """[groups, N] (scales or zeros) to ``[per, groups // rows, rows, 1, packed_n]``.

    Plane ``p`` holds columns ``per*j + p`` (N padded to ``per * packed_n`` with ones). Each
    scale row gets its own leading index (the unit axis keeps a block's last two dims legal),
    so the kernel reads row ``i`` of a K tile as ``ref[p, i]``, a leading-axis index, and never
    slices a row out of a sublane tile.
    """
    groups, n = a.shape
    a = jnp.pad(a, ((0, 0), (0, per * packed_n - n)), constant_values=1)
    a = a.reshape(groups, packed_n, per).transpose(2, 0, 1)
    return a.reshape(per, groups // rows, rows, 1, packed_n)


def from_planes(y: jax.Array, m: int, n: int) -> jax.Array:
    """``[per, M', packed_n]`` plane outputs to ``[m, n]``: column ``per*j + p`` is
    ``y[p, :, j]``."""
    per, padded_m, packed_n = y.shape
    return y.transpose(1, 2, 0).reshape(padded_m, per * packed_n)[:m, :n]


def quantized_matmul_tpu(
    x: jax.Array,
    codes: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None = None,
    *,
    bits: int,
    group_size: int | None,
    fmt: str,
    scale_dtype: str = "float32",
    tensor_scale: jax.Array | None = None,
    lut: jax.Array | None = None,
    out_dtype=None,
    block_m: int,
    block_n: int,
    block_k: int,
    interpret: bool = False,
) -> jax.Array:
    """``x @ w`` on TPU, w dequantized tile by tile in VMEM from its packed codes.

    Grid ``(cdiv(M', block_m), cdiv(N / per, block_n / per), K / block_k)``, semantics
    ``('parallel', 'parallel', 'arbitrary')``. BlockSpecs: x ``(block_m, block_k)`` at
    ``(i, k)``; codes ``(block_k, block_n / per)`` at ``(k, j)``; scales and zeros (regrouped
    by ``to_planes``) ``(per, rows, 1, block_n / per)`` for K tile ``k``; tensor_scale and lut
    whole in SMEM; output planes ``(per, block_m, block_n / per)`` at ``(i, j)``. See the
    module docstring for the paths, padding and the plane layout.

    Args:
      x, codes, scales, zeros, bits, group_size, fmt, scale_dtype, tensor_scale, lut,
        out_dtype: as ``api.quantized_matmul``.
      block_m: rows per tile, a multiple of 8 (16 for bfloat16); all rows when M is smaller.
      block_n: output columns per tile, a multiple of ``128 * 8 // bits``.
      block_k: the largest K tile, a multiple of 32 (see ``tiles``).
      interpret: run the kernel in Pallas interpret mode (any backend).

    Returns:
      [M, N] in ``out_dtype`` (default x's dtype); float32 accumulation.
    """
    p = check_args(
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
        out_dtype=out_dtype,
    )
    t = tiles(p, x.dtype, block_m=block_m, block_n=block_n, block_k=block_k)
    per, packed_n, bm, bk, bnb = p.per_byte, p.packed_n, t.block_m, t.block_k, t.packed_block_n
    x = jnp.pad(x, ((0, t.padded_m - p.m), (0, 0)))
    # 'tile' path: K tile k lies in group k // tiles_per_group ('group' path: 1, its own block).
    tiles_per_group = (p.group_size or p.k) // bk if t.path == "tile" else 1

    def scale_tile(i, j, k):
        # lax.div: jnp's floor division lowers through `sign`, which Mosaic ties to a device.
        return (0, k if tiles_per_group == 1 else jax.lax.div(k, tiles_per_group), 0, 0, j)

    scale_spec = pl.BlockSpec((per, None, t.scale_rows, 1, bnb), scale_tile)
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    operands = [
        x,
        codes,
        to_planes(decode.kernel_scales(scales, scale_dtype), per, packed_n, t.scale_rows),
    ]
    in_specs = [
        pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
        pl.BlockSpec((bk, bnb), lambda i, j, k: (k, j)),
        scale_spec,
    ]
    if zeros is not None:
        operands.append(to_planes(zeros, per, packed_n, t.scale_rows))
        in_specs.append(scale_spec)
    if tensor_scale is not None:
        operands.append(jnp.asarray(tensor_scale, jnp.float32).reshape(1))
        in_specs.append(smem)
    if lut is not None:
        operands.append(jnp.asarray(lut, jnp.float32))
        in_specs.append(smem)
    scratch = [pltpu.VMEM((per, bm, bnb), jnp.float32)]
    if t.path == "group":
        scratch.append(pltpu.VMEM((bk, bnb), x.dtype))
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = pl.pallas_call(
        functools.partial(_kernel, p=p, t=t, precision=precision),
        grid=(pl.cdiv(t.padded_m, bm), pl.cdiv(packed_n, bnb), p.k // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((per, bm, bnb), lambda i, j, k: (0, i, j)),
        out_shape=jax.ShapeDtypeStruct((per, t.padded_m, packed_n), p.out_dtype),
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(*operands)
    return from_planes(y, p.m, p.n)
