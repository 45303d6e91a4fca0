"""Nearest-point decoding in the D_n and E8 lattices (Conway & Sloane).

Terminology:
  D_n:  integer vectors whose coordinates sum to an even number (the checkerboard lattice).
  E8:   D8 ∪ (D8 + ½·1): the densest packing in 8 dimensions; every point has norm² ≥ 2.
  decode: map any point of R^n to its nearest lattice point (ties broken arbitrarily but
          deterministically).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _round_half_away(x: jax.Array) -> jax.Array:
    # f(x) of Conway & Sloane: the nearest integer (ties away from 0, any rule works).
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def nearest_d8(x: jax.Array) -> jax.Array:
    """The nearest point of D_n to each row of ``x`` [..., n] (n = 8 for D8; any n ≥ 2 works).

    Round every coordinate (``f(x)``); if the rounded coordinates sum to an odd number, round
    instead the one coordinate with the largest rounding error the other way (``g(x)``), which
    is the nearest point of the other parity (Conway & Sloane, Sec. 20.2, Algorithm for D_n).

    Args:
      x: float [..., n].

    Returns:
      float [..., n], integer-valued, even coordinate sum.

    References:
      Conway & Sloane, "Fast Quantizing and Decoding Algorithms for Lattice Quantizers and
      Codes", IEEE Trans. Inf. Theory 28(2), 1982. "Sphere Packings, Lattices and Groups",
      Ch. 20.
    """
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] < 2:
        raise ValueError(f"nearest_d8 x: expected shape [..., n] with n >= 2, got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"nearest_d8 x: expected a float array, got {x.dtype}.")
    f = _round_half_away(x)
    err = x - f
    # The coordinate farthest from its rounding, rounded the other way.
    k = jnp.argmax(jnp.abs(err), axis=-1)
    other = jnp.where(err >= 0, f + 1, f - 1)
    g = jnp.where(jax.nn.one_hot(k, x.shape[-1], dtype=bool), other, f)
    odd = (jnp.sum(f, axis=-1, keepdims=True) % 2) != 0
    return jnp.where(odd, g, f)


def nearest_e8(x: jax.Array) -> jax.Array:
    """The nearest point of E8 = D8 ∪ (D8 + ½) to each row of ``x`` [..., 8].

    Decodes ``x`` in D8 and ``x − ½`` in D8 (then adds ½ back) and keeps the closer of the two
    candidates (Conway & Sloane's E8 decoder).

    Args:
      x: float [..., 8].

    Returns:
      float [..., 8]: points of E8 (all-integer with even sum, or all-half-integer with even
      sum of ``p − ½``).

    Example:
      >>> nearest_e8(jnp.array([0.4, 0.6, 0.5, 0.5, 0.4, 0.6, 0.5, 0.5]))   # the ½-coset
      Array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=float32)
    """
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != 8:
        raise ValueError(f"nearest_e8 x: expected shape [..., 8], got {x.shape}.")
    a = nearest_d8(x)
    b = nearest_d8(x - 0.5) + 0.5
    da = jnp.sum((x - a) ** 2, axis=-1, keepdims=True)
    db = jnp.sum((x - b) ** 2, axis=-1, keepdims=True)
    return jnp.where(da <= db, a, b)
