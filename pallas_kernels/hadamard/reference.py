"""The blockwise Walsh–Hadamard transform in plain ``jnp``: the reference every kernel matches.

Terminology:
  block:  the length of each run of the last axis that is transformed on its own; a power of
          two that divides the last axis ``n``. Block ``k`` is ``x[..., k*block:(k+1)*block]``.
  H_b:    the Sylvester-ordered Hadamard matrix of size ``b``: ``H_1 = [1]``,
          ``H_2k = [[H_k, H_k], [H_k, -H_k]]``. It is symmetric, its entries are ±1, and
          ``H_b @ H_b = b * I``; ``H_ab = H_a ⊗ H_b`` (the kernels use this to split big blocks).
  normalize:  divide by ``sqrt(block)``, which makes the transform orthonormal and its own
          inverse (the rotation that QuaRot and QuIP# apply before quantizing).

This module imports only jax and numpy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def check_block(block) -> int:
    """Returns ``block`` as an int, or raises ``ValueError`` if it is not a power of two >= 1."""
    if (
        isinstance(block, bool)
        or not isinstance(block, (int, np.integer))
        or block < 1
        or block & (block - 1)
    ):
        raise ValueError(f"hadamard block={block!r}: expected a power of two >= 1 (1, 2, 4, ...).")
    return int(block)


def check_args(x, block) -> int:
    """Validates ``x`` [..., n] (floating, ndim >= 1) and ``block`` (a power of two dividing n).

    Returns:
      ``block`` as an int.
    """
    block = check_block(block)
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"hadamard x: expected a floating-point array, got dtype {dtype}.")
    shape = np.shape(x)
    if len(shape) == 0:
        raise ValueError(
            "hadamard x: expected at least one axis [..., n], got a scalar (shape ())."
        )
    if shape[-1] % block:
        raise ValueError(
            f"hadamard block={block}: must divide the last axis of x, got x.shape={tuple(shape)} "
            f"(n={shape[-1]}, n % block = {shape[-1] % block})."
        )
    return block


def hadamard_matrix(block: int, dtype=np.float32) -> np.ndarray:
    """The Sylvester-ordered Hadamard matrix ``H_block`` [block, block], entries ±1 (unscaled).

    Example:
      >>> hadamard_matrix(2)
      array([[ 1.,  1.],
             [ 1., -1.]], dtype=float32)
    """
    block = check_block(block)
    h = np.ones((1, 1), dtype)
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_reference(x: jax.Array, block: int, *, normalize: bool = True) -> jax.Array:
    """Blockwise Walsh–Hadamard transform, by a float32 matmul with ``H_block``.

    ``y[..., k*b:(k+1)*b] = x[..., k*b:(k+1)*b] @ H_b / (sqrt(b) if normalize else 1)``, ``b =
    block``, for every block ``k`` of the last axis (``H_b`` is symmetric, so left and right
    multiplication agree).

    Args:
      x: floating array [..., n].
      block: a power of two dividing ``n``.
      normalize: divide by ``sqrt(block)`` (orthonormal, self-inverse transform).

    Returns:
      An array of ``x``'s shape and dtype, computed in float32 (matmul at ``Precision.HIGHEST``)
      and rounded once.

    Example:
      >>> hadamard_reference(jnp.array([1.0, 0.0, 0.0, 0.0]), 2, normalize=False)
      Array([1., 1., 0., 0.], dtype=float32)
    """
    block = check_args(x, block)
    x = jnp.asarray(x)
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    y = jnp.matmul(blocks, jnp.asarray(hadamard_matrix(block)), precision=jax.lax.Precision.HIGHEST)
    if normalize:
        y = y * (1.0 / math.sqrt(block))
    return y.reshape(x.shape).astype(x.dtype)
