"""Randomized Hadamard incoherence for weights ``[K, N]`` (QuIP#'s RHT), folded into serving.

Terminology:
  signs:     ±1 vectors ``s_in`` [K] and ``s_out`` [N], drawn once per weight and stored as
             bits (1 = −1), ``ceil(K / 8) + ceil(N / 8)`` bytes.
  H_n:       the blockwise orthonormal Walsh–Hadamard transform on an axis of length n, blocks
             of ``hadamard_block(n)`` (the largest power of two dividing n, at most 2**15):
             ``pallas_kernels.hadamard`` along the last axis. It is symmetric and its own
             inverse.
  rotated:   ``w' = H_K S_in w S_out H_N`` (``S = diag(s)``). Its entries are incoherent:
             a weight's outliers are spread over a block, so ``w'`` is close to Gaussian and
             lattice codebooks built for Gaussians fit it.

Serving never un-rotates the weight: ``x @ w = ((x S_in) H_K) @ w' H_N S_out``, so the input
is rotated before the (codebook) matmul and the output after, two O(n log n) transforms.

References:
  Tseng et al., "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice
  Codebooks", arXiv:2402.04396, Sec. 3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.hadamard import hadamard

_MAX_BLOCK = 2**15


def hadamard_block(n: int) -> int:
    """The largest power of two dividing ``n`` (at most 2**15): the Hadamard block size."""
    if n < 1:
        raise ValueError(f"hadamard_block n={n}: expected >= 1.")
    return min(n & -n, _MAX_BLOCK)


def random_signs(key: jax.Array, n: int) -> jax.Array:
    """Packed sign bits (uint8 [ceil(n / 8)]) of n independent fair ±1 signs."""
    bits = jax.random.bernoulli(key, 0.5, (n,))
    return pack_signs(bits)


def pack_signs(negative: jax.Array) -> jax.Array:
    """uint8 [ceil(n / 8)]: bit ``i % 8`` of byte ``i // 8`` is 1 where sign i is −1."""
    n = negative.shape[0]
    b = jnp.zeros((-(-n // 8) * 8,), jnp.uint8).at[:n].set(negative.astype(jnp.uint8))
    return jnp.sum(b.reshape(-1, 8) << jnp.arange(8, dtype=jnp.uint8), axis=1, dtype=jnp.uint8)


def unpack_signs(packed: jax.Array, n: int) -> jax.Array:
    """f32 [n] of ±1 from ``pack_signs``'s bytes."""
    bits = (packed[:, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:n].astype(jnp.float32)


def _had_last(x: jax.Array) -> jax.Array:
    """H_n along the last axis (f32)."""
    n = x.shape[-1]
    return hadamard(x.astype(jnp.float32), hadamard_block(n))


def rotate_weight(w: jax.Array, s_in: jax.Array, s_out: jax.Array) -> jax.Array:
    """``H_K S_in w S_out H_N`` for ``w`` [K, N] and ±1 vectors ``s_in`` [K], ``s_out`` [N]."""
    w = w.astype(jnp.float32) * s_in[:, None] * s_out[None, :]
    return _had_last(_had_last(w).T).T


def unrotate_weight(w_rot: jax.Array, s_in: jax.Array, s_out: jax.Array) -> jax.Array:
    """The inverse of ``rotate_weight``: ``S_in H_K w' H_N S_out``."""
    w = _had_last(_had_last(w_rot.astype(jnp.float32)).T).T
    return w * s_in[:, None] * s_out[None, :]


def rotate_hessian(hessian: jax.Array, s_in: jax.Array) -> jax.Array:
    """``H_K S_in H S_in H_K``: the Hessian of the rotated weight's rows (the output rotation is
    orthogonal and drops out of ``tr(Δᵀ H Δ)``)."""
    h = hessian.astype(jnp.float32) * s_in[:, None] * s_in[None, :]
    return _had_last(_had_last(h).T).T


def rotate_input(x: jax.Array, s_in: jax.Array) -> jax.Array:
    """``(x S_in) H_K`` for activations ``x`` [..., K]."""
    return _had_last(x * s_in).astype(x.dtype)


def rotate_output(y: jax.Array, s_out: jax.Array) -> jax.Array:
    """``(y H_N) S_out`` for outputs ``y`` [..., N]."""
    return (_had_last(y) * s_out).astype(y.dtype)


def signs_nbytes(k: int, n: int) -> int:
    """Bytes of the stored signs of a ``[k, n]`` weight."""
    return int(np.ceil(k / 8) + np.ceil(n / 8))
