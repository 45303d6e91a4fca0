"""The low-bit weight matmul as a Pallas GPU kernel with the Triton lowering.

Terminology (see ``reference`` for x, codes, scales, group; ``decode`` for plane; ``tpu`` for
per and path):
  program:  one ``[block_m, block_n]`` tile of the output; it loops over K in steps of
            ``block_k`` (``lax.fori_loop``), carrying one float32 accumulator
            ``[block_m, block_n // per]`` per plane in registers. Triton runs the programs of
            a grid in parallel, so a reduction grid axis with a scratch accumulator (the TPU
            kernel's design) is not available; the in-kernel loop is the Triton equivalent.
  path:     ``'tile'`` when each K step lies inside one group (per output channel, or
            ``group_size`` a multiple of ``block_k``): the step's partial product
            ``x @ (v - zero)`` is scaled once. ``'gather'`` otherwise (any group size): every
            code row ``k`` of a step loads scale row ``k // group_size`` (a gather that hits
            the cache ``group_size`` times per row), and the tile is dequantized in registers
            before ``tl.dot``.

The kernel reads only the packed codes. Plane ``p`` of a byte tile holds the codes of output
columns ``per*j + p``. Viewing the scales (and zero points) ``[groups, N]`` as
``[groups, N / per, per]`` and the output ``[M, N]`` as ``[M, N / per, per]`` (free
reshapes) makes plane ``p`` the index ``[..., :, p]``: the kernel loads each plane's scales
and stores each plane's result with a stride of ``per`` columns, so, unlike the TPU kernel,
neither scales nor output take an extra pass.

Triton tiles are powers of two and ``tl.dot`` needs every dimension >= 16: tiles are clamped
to ``max(16, next_power_of_2(size))``. Loads of x and codes and stores of the output that
would overhang M, K or ``N / per`` are masked (masked loads read 0: a 0 of x, or a code whose
finite value only reaches output that is not stored). Scales and zero points are read
unmasked: the wrapper pads their columns to whole tiles (a copy of these small arrays, only
when N is not a multiple of ``block_n``) and the ``'gather'`` path clamps their rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch
from pallas_kernels.quantized_matmul import decode
from pallas_kernels.quantized_matmul.reference import Problem, check_args

MIN_DOT = dispatch.MIN_DOT
NUM_WARPS = 4


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Static tiling of one call (see the module docstring)."""

    block_m: int
    block_k: int
    packed_block_n: int  # bytes of a codes row per tile: block_n // per
    path: str  # 'tile' or 'gather'


def tiles(p: Problem, *, block_m: int, block_n: int, block_k: int) -> Tiles:
    """The tiling ``quantized_matmul_gpu`` uses; validates the requested block sizes."""
    if not dispatch.is_tile_size(block_m):
        raise ValueError(
            f"quantized_matmul_gpu block_m={block_m!r}: expected a power of two >= {MIN_DOT}."
        )
    if not isinstance(block_n, int) or not dispatch.is_tile_size(block_n // p.per_byte):
        raise ValueError(
            f"quantized_matmul_gpu block_n={block_n!r}: expected a power of two >= "
            f"{MIN_DOT * p.per_byte} ({MIN_DOT} bytes of {p.per_byte} columns at {p.bits} bits)."
        )
    if not dispatch.is_tile_size(block_k):
        raise ValueError(
            f"quantized_matmul_gpu block_k={block_k!r}: expected a power of two >= {MIN_DOT}."
        )
    bk = dispatch.clamp_tile(block_k, p.k)
    tile = p.group_size is None or p.group_size % bk == 0
    return Tiles(
        block_m=dispatch.clamp_tile(block_m, p.m),
        block_k=bk,
        packed_block_n=dispatch.clamp_tile(block_n // p.per_byte, p.packed_n),
        path="tile" if tile else "gather",
    )


def _and(a, b):
    if a is None:
        return b
    return a if b is None else a & b


def _load(ref, idx, mask):
    if mask is None:
        return ref[idx]
    return plgpu.load(ref.at[idx], mask=mask, other=0)


def _kernel(*refs, p: Problem, t: Tiles, precision):
    # refs: x [bm, K]; codes [K, bnb] uint8; scales [groups, bnb, per]; zeros (same)?;
    # tensor_scale (1,)?; lut (2**bits,)?; out [bm, bnb, per]. The x, codes and out blocks of
    # the last tiles overhang M and N / per, and the last K step may overhang K: those loads and
    # stores are masked. Scales and zeros are padded by the wrapper and read unmasked.
    refs = list(refs)
    x_ref, c_ref, s_ref = refs[:3]
    rest = refs[3:]
    z_ref = rest.pop(0) if p.has_zeros else None
    t_ref = rest.pop(0) if p.has_tensor_scale else None
    lut_ref = rest.pop(0) if p.fmt == "lut" else None
    (o_ref,) = rest
    bm, bk, bnb = t.block_m, t.block_k, t.packed_block_n
    row_ok = col_ok = None
    if p.m % bm:
        row_ok = (pl.program_id(0) * bm + jax.lax.iota(jnp.int32, bm) < p.m)[:, None]  # [bm, 1]
    if p.packed_n % bnb:
        col_ok = (pl.program_id(1) * bnb + jax.lax.iota(jnp.int32, bnb) < p.packed_n)[None, :]
    lut = None if lut_ref is None else (lambda i: lut_ref[i])

    def step(kk, accs):
        k0 = kk * bk
        k_row = k_col = None
        if p.k % bk:
            k_ok = k0 + jax.lax.iota(jnp.int32, bk) < p.k  # [bk]
            k_row, k_col = k_ok[None, :], k_ok[:, None]
        x = _load(x_ref, (slice(None), pl.ds(k0, bk)), _and(row_ok, k_row))
        codes = _load(c_ref, (pl.ds(k0, bk), slice(None)), _and(k_col, col_ok))
        if t.path == "tile":
            # The step lies in group k0 // group_size (row 0 per output channel): one scale row.
            row = 0 if p.group_size is None else jax.lax.div(k0, p.group_size)
            s_rows = pl.ds(row, 1)
        else:
            # The scale row of every code row, clamped: rows past K (0 in x) reuse the last.
            rows = jax.lax.div(k0 + jax.lax.iota(jnp.int32, bk), p.group_size)
            s_rows = jnp.minimum(rows, p.groups - 1)
        out = []
        for plane, (c, acc) in enumerate(zip(decode.planes(codes, p.bits), accs, strict=True)):
            # [1 or bk, bnb]: the scales of output columns per*j + plane.
            s = decode.scale_values(s_ref[s_rows, :, plane], p.scale_dtype)
            v = decode.code_values(c, fmt=p.fmt, bits=p.bits, lut=lut)
            if z_ref is not None:
                v = v - z_ref[s_rows, :, plane].astype(jnp.int32).astype(jnp.float32)
            if t.path == "tile":
                partial = jnp.dot(
                    x, v.astype(x.dtype), preferred_element_type=jnp.float32, precision=precision
                )
                out.append(acc + partial * s)
            else:
                w = (v * s).astype(x.dtype)
                out.append(
                    acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)
                )
        return tuple(out)

    zeros = tuple(jnp.zeros((bm, bnb), jnp.float32) for _ in range(p.per_byte))
    accs = jax.lax.fori_loop(0, pl.cdiv(p.k, bk), step, zeros)
    out_mask = _and(row_ok, col_ok)
    for plane, acc in enumerate(accs):
        if t_ref is not None:
            acc = acc * t_ref[0]
        y = acc.astype(o_ref.dtype)
        # Output columns per*j + plane. (An array index: the interpreter rejects a Python int.)
        idx = (slice(None), slice(None), jnp.int32(plane))
        if out_mask is None:
            o_ref[idx] = y
        else:
            plgpu.store(o_ref.at[idx], y, mask=jnp.broadcast_to(out_mask, y.shape))


def quantized_matmul_gpu(
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
    """``x @ w`` on GPU (Triton), w dequantized in registers from its packed codes.

    Grid ``(cdiv(M, block_m), cdiv(N / per, block_n / per))``, every program independent.
    BlockSpecs: x ``(block_m, K)`` at ``(i, 0)`` and codes ``(K, block_n / per)`` at ``(0, j)``
    (the kernel walks K through them); scales and zeros ``(groups, block_n)`` at ``(0, j)``;
    tensor_scale and lut whole; output ``(block_m, block_n)`` at ``(i, j)``. See the module
    docstring for the K loop, the paths and masking.

    Args:
      x, codes, scales, zeros, bits, group_size, fmt, scale_dtype, tensor_scale, lut,
        out_dtype: as ``api.quantized_matmul``.
      block_m: rows per program, a power of two >= 16 (clamped for small M).
      block_n: output columns per program, a power of two >= ``16 * 8 // bits``.
      block_k: K step, a power of two >= 16.
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
    t = tiles(p, block_m=block_m, block_n=block_n, block_k=block_k)
    per, bm, bnb, packed_n = p.per_byte, t.block_m, t.packed_block_n, p.packed_n
    # Scales and zeros are padded to whole tiles of columns (a copy of these small arrays only
    # when N is not a multiple of block_n) and viewed, for free, as [groups, N / per, per].
    padded_n = per * pl.cdiv(packed_n, bnb) * bnb

    def planes(a):  # [groups, N] -> [groups, padded_n / per, per]
        a = jnp.pad(a, ((0, 0), (0, padded_n - p.n)), constant_values=1)
        return a.reshape(p.groups, padded_n // per, per)

    scale_spec = pl.BlockSpec((p.groups, bnb, per), lambda i, j: (0, j, 0))
    operands = [x, codes, planes(decode.kernel_scales(scales, scale_dtype))]
    in_specs = [
        pl.BlockSpec((bm, p.k), lambda i, j: (i, 0)),
        pl.BlockSpec((p.k, bnb), lambda i, j: (0, j)),
        scale_spec,
    ]
    if zeros is not None:
        operands.append(planes(zeros))
        in_specs.append(scale_spec)
    if tensor_scale is not None:
        operands.append(jnp.asarray(tensor_scale, jnp.float32).reshape(1))
        in_specs.append(pl.BlockSpec((1,), lambda i, j: (0,)))
    if lut is not None:
        operands.append(jnp.asarray(lut, jnp.float32))
        in_specs.append(pl.BlockSpec((2**bits,), lambda i, j: (0,)))
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = pl.pallas_call(
        functools.partial(_kernel, p=p, t=t, precision=precision),
        grid=(pl.cdiv(p.m, bm), pl.cdiv(packed_n, bnb)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bnb, per), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((p.m, packed_n, per), p.out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
        interpret=interpret,
    )(*operands)
    # [M, N / per, per] is [M, per * N / per] in memory: a free reshape.
    return y.reshape(p.m, per * packed_n)[:, : p.n]
