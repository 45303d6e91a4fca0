"""Elementwise decoders used inside both kernels: int32 bit arithmetic, no gathers.

Terminology (see ``reference`` for fmt, codes and scales):
  plane:  for ``per = 8 // bits`` codes per byte, plane ``p`` of a packed byte tile is
          ``(byte >> (p * bits)) & (2**bits - 1)``: the codes of output columns ``per*j + p``.

Mosaic and Triton both lower what is used here (uint8 -> int32 widening, shifts by vectors,
``&``, compares, selects, int32 -> float32, same-width bitcasts), while a gather from a table
(``table[code]``) lowers in neither kernel body; so every fixed format decodes by arithmetic on
its bit fields, and ``'lut'`` by a binary tree of selects on the code's bits (``2**bits - 1``
selects, reading the table's scalars from SMEM / global memory). ``reference.code_table`` is
the independent (table) definition the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def planes(packed: jax.Array, bits: int) -> list[jax.Array]:
    """int32 codes of each plane of ``packed`` (uint8 or int32 bytes), plane 0 first."""
    b = packed.astype(jnp.int32)
    mask = 2**bits - 1
    return [(b >> (p * bits)) & mask if p else b & mask for p in range(8 // bits)]


def code_values(
    c: jax.Array, *, fmt: str, bits: int, lut: Callable[[int], jax.Array] | None = None
) -> jax.Array:
    """float32 value of int32 codes ``c`` (each in ``[0, 2**bits)``).

    Args:
      c: int32 codes.
      fmt: ``'int'``, ``'uint'``, ``'e2m1'``, ``'e4m3'`` or ``'lut'``.
      bits: the code width.
      lut: for ``'lut'``, ``lut(i)`` returns the float32 scalar value of code ``i``.
    """
    if fmt == "int":
        half = 2 ** (bits - 1)
        return ((c ^ half) - half).astype(jnp.float32)  # two's complement of `bits` bits
    if fmt == "uint":
        return c.astype(jnp.float32)
    if fmt == "e2m1":
        return _e2m1(c)
    if fmt == "e4m3":
        return e4m3(c)
    if fmt == "lut":
        return _select_tree(c, bits, lut)
    raise ValueError(f"code_values fmt={fmt!r}: unknown format.")


def _e2m1(c: jax.Array) -> jax.Array:
    # S.EE.M, bias 1: exponent 0 is subnormal (0, 0.5), else (1 + m/2) * 2**(e - 1). In quarter
    # units the magnitude is the integer 2m (e == 0) or (2 + m) << e: exact in float32.
    e = (c >> 1) & 3
    m = c & 1
    quarters = jnp.where(e == 0, m * 2, (m + 2) << e)
    mag = quarters.astype(jnp.float32) * 0.25
    return jnp.where((c & 8) != 0, -mag, mag)


def e4m3(c: jax.Array) -> jax.Array:
    """float32 value of float8_e4m3fn bit patterns held as int32 in ``[0, 256)``.

    S.EEEE.MMM, bias 7, no infinities, S.1111.111 is NaN. In units of the smallest subnormal
    ``2**-9`` the magnitude is the integer ``m`` (e == 0) or ``(8 + m) << (e - 1)`` (< 2**18,
    exact in float32).
    """
    e = (c >> 3) & 15
    m = c & 7
    units = jnp.where(e == 0, m, m + 8) << jnp.maximum(e - 1, 0)
    mag = units.astype(jnp.float32) * (2.0**-9)
    mag = jnp.where((c & 127) == 127, jnp.float32(jnp.nan), mag)
    return jnp.where((c & 128) != 0, -mag, mag)


def _select_tree(c: jax.Array, bits: int, lut: Callable[[int], jax.Array] | None) -> jax.Array:
    # Level 0 picks between lut(2i) and lut(2i + 1) by bit 0, level 1 between those pairs by
    # bit 1, ...: 2**bits - 1 selects and `bits` bit tests per element.
    if lut is None:
        raise ValueError("code_values fmt='lut' needs lut.")
    odd = (c & 1) != 0
    level = [jnp.where(odd, lut(2 * i + 1), lut(2 * i)) for i in range(2 ** (bits - 1))]
    for b in range(1, bits):
        high = ((c >> b) & 1) != 0
        level = [jnp.where(high, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def kernel_scales(scales: jax.Array, scale_dtype: str) -> jax.Array:
    """Stored scales as the kernels read them: float8_e4m3fn as its uint8 bit pattern (free).

    The kernels decode E4M3 scales by bit arithmetic (``e4m3``) rather than a float8 -> float32
    conversion, which not every Mosaic / Triton target lowers.
    """
    if scale_dtype == "e4m3":
        return jax.lax.bitcast_convert_type(scales, jnp.uint8)
    return scales


def scale_values(s: jax.Array, scale_dtype: str) -> jax.Array:
    """float32 value of scales loaded in a kernel (in their ``kernel_scales`` dtype)."""
    if scale_dtype == "e8m0":
        # 2**(e - 127) is the float32 with biased exponent e (e == 255: inf). e == 0 gives 0, as
        # XLA's ldexp does: float32 has no normal 2**-127 and TPUs flush subnormals.
        return jax.lax.bitcast_convert_type(s.astype(jnp.int32) << 23, jnp.float32)
    if scale_dtype == "e4m3":
        return e4m3(s.astype(jnp.int32))
    return s.astype(jnp.float32)
