"""Dense packing of b-bit codes into bytes: the storage layout every kernel reads.

Terminology:
  code:  an unsigned integer below ``2**bits`` (one quantized element), held in a uint8.
  unit:  the smallest run of codes that fills whole bytes: ``lcm(bits, 8) // bits`` codes in
         ``lcm(bits, 8) // 8`` bytes (2 bits: 4 codes/1 byte; 3 bits: 8 codes/3 bytes;
         4 bits: 2/1; 6 bits: 4/3; 8 bits: 1/1).

Layout (little-endian bit stream along the last axis): within each row of the last axis, code
``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the row's stream, and byte ``j`` holds stream bits
``[8j, 8j+8)``, bit 0 being the byte's least significant bit. So for 4 bits code ``2j`` is the low
nibble of byte ``j``; for 3 bits a 3-byte unit holds 8 codes and code 2 straddles bytes 0 and 1.
A last axis whose length is not a whole number of units is padded with zero codes; ``unpack``
takes the true length back. Leading axes are untouched, so any sharding of them carries over.

This module imports only jax and numpy, so kernels and any JAX codebase can use it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) per unit."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r}: expected an integer from 1 to 8.")
    lcm = math.lcm(bits, 8)
    return lcm // bits, lcm // 8


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take along the packed axis (with padding)."""
    codes_per_unit, bytes_per_unit = _unit(bits)
    return -(-n // codes_per_unit) * bytes_per_unit


def _pieces(bits: int):
    """Static (code i, byte j, shift) triples: code i's bits that land in byte j.

    ``shift = i*bits - 8*j`` is where code i starts relative to byte j's bit 0; they overlap when
    ``-bits < shift < 8``.
    """
    codes_per_unit, bytes_per_unit = _unit(bits)
    return [
        (i, j, i * bits - 8 * j)
        for i in range(codes_per_unit)
        for j in range(bytes_per_unit)
        if -bits < i * bits - 8 * j < 8
    ]


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Packs ``codes`` [..., n] (integers below ``2**bits``) into uint8 [..., packed_length(n)].

    Example:
      >>> pack(jnp.array([1, 2, 3], jnp.uint8), 4)  # 0x21, 0x03
      Array([33,  3], dtype=uint8)
    """
    codes_per_unit, bytes_per_unit = _unit(bits)
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"pack codes: expected an integer array, got dtype {codes.dtype}.")
    if codes.ndim == 0:
        raise ValueError("pack codes: expected at least one axis, got a scalar.")
    if not isinstance(codes, jax.core.Tracer) and codes.size:
        lo, hi = int(np.min(codes)), int(np.max(codes))
        if lo < 0 or hi >= 2**bits:
            raise ValueError(f"pack codes: values must lie in [0, {2**bits}), got [{lo}, {hi}].")
    n = codes.shape[-1]
    pad = -n % codes_per_unit
    c = jnp.pad(codes.astype(jnp.int32), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    c = c.reshape(*c.shape[:-1], -1, codes_per_unit)  # [..., units, codes_per_unit]
    out = [jnp.zeros(c.shape[:-1], jnp.int32) for _ in range(bytes_per_unit)]
    for i, j, shift in _pieces(bits):
        piece = c[..., i] << shift if shift >= 0 else c[..., i] >> -shift
        out[j] = out[j] | (piece & 0xFF)
    packed = jnp.stack(out, axis=-1).astype(jnp.uint8)  # [..., units, bytes_per_unit]
    return packed.reshape(*packed.shape[:-2], -1)


def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of ``pack``: uint8 [..., packed_length(n)] to codes uint8 [..., n]."""
    codes_per_unit, bytes_per_unit = _unit(bits)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack packed: expected uint8, got dtype {packed.dtype}.")
    if packed.ndim == 0 or packed.shape[-1] != packed_length(n, bits):
        raise ValueError(
            f"unpack packed: last axis must be packed_length({n}, {bits}) = "
            f"{packed_length(n, bits)} bytes, got shape {packed.shape}."
        )
    b = packed.astype(jnp.int32).reshape(*packed.shape[:-1], -1, bytes_per_unit)
    out = [jnp.zeros(b.shape[:-1], jnp.int32) for _ in range(codes_per_unit)]
    for i, j, shift in _pieces(bits):
        piece = b[..., j] >> shift if shift >= 0 else b[..., j] << -shift
        out[i] = out[i] | piece
    codes = jnp.stack(out, axis=-1) & (2**bits - 1)  # [..., units, codes_per_unit]
    return codes.reshape(*codes.shape[:-2], -1)[..., :n].astype(jnp.uint8)
