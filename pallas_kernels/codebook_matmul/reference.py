"""The vector-quantized weight matmul in plain ``jnp``: the reference every kernel matches.

Terminology:
  x:            activations [M, K] (float32 or bfloat16); K = in features, M = rows (tokens).
  weight:       w [K, N] (N = out features), stored as ``indices``, ``codebook`` and ``scales``.
  vector:       ``vector_dim`` (d, 2 to 8) consecutive elements of one column of w along K:
                vector ``(j, n)`` is ``w[j*d : (j+1)*d, n]``; K must be a multiple of d.
  codebook:     float32 or bfloat16 [2**index_bits, d]: one row (codeword) per index, one
                codebook per layer.
  indices:      [K // d, N]: the codeword of each vector, uint8 when ``index_bits <= 8`` and
                uint16 otherwise (one index per element, no packing of narrower indices: a
                12-bit index takes 16 bits of storage). Only the low ``index_bits`` bits of an
                index are read, so every stored value names a codeword.
  group:        ``group_size`` consecutive rows of w (along K, a multiple of d, so a vector
                never straddles two groups) sharing one scale per column; ``group_size=None``
                is one group of all K rows (per output channel).
  scales:       float32 [K // group_size, N] ([1, N] per output channel).

The weight:  ``w[k, n] = codebook[indices[k // d, n], k % d] * scales[k // g, n]``.
The matmul:  ``y = x @ w``, accumulated in float32 and returned in ``out_dtype`` (default
``x.dtype``). Storage is ``index_bits / d`` bits per weight plus the scales (e.g. 2 bits for
8-bit indices of 4-vectors, AQLM's 1x16 is 16-bit indices of 8-vectors).

This module imports only jax and numpy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

VECTOR_DIMS = tuple(range(2, 9))
INDEX_BITS = tuple(range(4, 17))
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class Problem:
    """The static description of one call, after validation (hashable)."""

    m: int
    k: int
    n: int
    vector_dim: int
    index_bits: int
    group_size: int | None
    out_dtype: jnp.dtype

    @property
    def vectors(self) -> int:
        """Rows of ``indices``: ``k // vector_dim``."""
        return self.k // self.vector_dim

    @property
    def codebook_size(self) -> int:
        """Rows of ``codebook``: ``2**index_bits``."""
        return 2**self.index_bits

    @property
    def groups(self) -> int:
        """Rows of ``scales``: ``k // group_size`` (1 per output channel)."""
        return 1 if self.group_size is None else self.k // self.group_size


def index_dtype(index_bits: int) -> jnp.dtype:
    """The storage dtype of ``indices``: uint8 up to 8 bits, uint16 above."""
    return jnp.dtype(jnp.uint8 if index_bits <= 8 else jnp.uint16)


def _shape(a) -> tuple[int, ...]:
    # Arrays, tracers and ShapeDtypeStructs carry .shape; Python and NumPy scalars do not.
    return tuple(a.shape) if hasattr(a, "shape") else tuple(np.shape(a))


def _dtype(a):
    return jnp.dtype(a.dtype) if hasattr(a, "dtype") else jnp.dtype(jnp.result_type(a))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_args(
    x,
    indices,
    codebook,
    scales,
    *,
    vector_dim,
    index_bits,
    group_size=None,
    out_dtype=None,
) -> Problem:
    """Validates a call, raising ``ValueError`` that names the bad argument; see the module doc."""
    if not _is_int(vector_dim) or vector_dim not in VECTOR_DIMS:
        raise ValueError(
            f"codebook_matmul vector_dim={vector_dim!r}: expected an integer from 2 to 8."
        )
    if not _is_int(index_bits) or index_bits not in INDEX_BITS:
        raise ValueError(
            f"codebook_matmul index_bits={index_bits!r}: expected an integer from 4 to 16."
        )
    d, b = int(vector_dim), int(index_bits)
    if _dtype(x) not in FLOAT_DTYPES or len(_shape(x)) != 2:
        raise ValueError(
            f"codebook_matmul x: expected float32 or bfloat16 [M, K], got {_dtype(x)} {_shape(x)}."
        )
    m, k = _shape(x)
    if k % d:
        raise ValueError(
            f"codebook_matmul x: K={k} (x's last axis) must be a multiple of vector_dim={d}."
        )
    if group_size is not None and (
        not _is_int(group_size) or group_size < 1 or group_size % d or k % group_size
    ):
        raise ValueError(
            f"codebook_matmul group_size={group_size!r}: expected None or a multiple of "
            f"vector_dim={d} dividing K={k}."
        )
    idx_dtype = index_dtype(b)
    if len(_shape(indices)) != 2 or _shape(indices)[0] != k // d or _dtype(indices) != idx_dtype:
        raise ValueError(
            f"codebook_matmul indices: expected {idx_dtype} [{k // d}, N] (K // vector_dim, "
            f"{idx_dtype} for index_bits={b}), got {_dtype(indices)} {_shape(indices)}."
        )
    n = _shape(indices)[1]
    if _shape(codebook) != (2**b, d) or _dtype(codebook) not in FLOAT_DTYPES:
        raise ValueError(
            f"codebook_matmul codebook: expected float32 or bfloat16 [{2**b}, {d}] "
            f"(2**index_bits, vector_dim), got {_dtype(codebook)} {_shape(codebook)}."
        )
    groups = 1 if group_size is None else k // group_size
    if _shape(scales) != (groups, n) or _dtype(scales) != jnp.float32:
        raise ValueError(
            f"codebook_matmul scales: expected float32 [{groups}, {n}] (K // group_size, N with "
            f"K={k}, group_size={group_size}), got {_dtype(scales)} {_shape(scales)}."
        )
    out_dtype = jnp.dtype(_dtype(x) if out_dtype is None else out_dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"codebook_matmul out_dtype={out_dtype}: expected a floating dtype.")
    return Problem(
        m=m,
        k=k,
        n=n,
        vector_dim=d,
        index_bits=b,
        group_size=None if group_size is None else int(group_size),
        out_dtype=out_dtype,
    )


def dequantize_reference(indices, codebook, scales, *, vector_dim, index_bits, group_size=None):
    """The float32 weight w [K, N] that ``indices``, ``codebook`` and ``scales`` stand for.

    Example:
      >>> codebook = jnp.array([[1.0, 2.0], [3.0, 4.0]] + [[0.0, 0.0]] * 14)  # 4-bit, d = 2
      >>> dequantize_reference(jnp.array([[1, 0]], jnp.uint8), codebook, jnp.ones((1, 2)),
      ...                      vector_dim=2, index_bits=4)
      Array([[3., 1.],
             [4., 2.]], dtype=float32)
    """
    d = vector_dim
    c = jnp.asarray(indices).astype(jnp.int32) & (2**index_bits - 1)  # [K // d, N]
    kv, n = c.shape
    k = kv * d
    v = jnp.asarray(codebook, jnp.float32)[c]  # [K // d, N, d]: v[j, n, i] = w[j*d + i, n]
    w = v.transpose(0, 2, 1).reshape(k, n)
    g = (group_size or k) or 1  # one group of all K rows per column (1 only when K == 0)
    s = jnp.asarray(scales, jnp.float32)  # [K // g, N]
    return (w.reshape(k // g, g, n) * s[:, None, :]).reshape(k, n)


def codebook_matmul_reference(
    x,
    indices,
    codebook,
    scales,
    *,
    vector_dim,
    index_bits,
    group_size=None,
    out_dtype=None,
) -> jax.Array:
    """``x @ w`` with the weight gathered to float32 first (an XLA gather, no kernel).

    Args: see ``api.codebook_matmul``.

    Returns:
      [M, N] in ``out_dtype`` (default ``x.dtype``): a float32 matmul at
      ``Precision.HIGHEST``, rounded once.
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
    w = dequantize_reference(
        indices,
        codebook,
        scales,
        vector_dim=vector_dim,
        index_bits=index_bits,
        group_size=group_size,
    )
    y = jnp.matmul(jnp.asarray(x).astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(p.out_dtype)


def arg_specs(
    m: int,
    k: int,
    n: int,
    *,
    vector_dim: int,
    index_bits: int,
    group_size: int | None,
    x_dtype=jnp.bfloat16,
    codebook_dtype=jnp.float32,
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """``(x, indices, codebook, scales)`` shapes of a call.

    Shared by the lowering tests and benchmarks (``jax.export`` takes them as they are).
    """
    groups = 1 if group_size is None else k // group_size
    spec = jax.ShapeDtypeStruct
    return (
        spec((m, k), x_dtype),
        spec((k // vector_dim, n), index_dtype(index_bits)),
        spec((2**index_bits, vector_dim), codebook_dtype),
        spec((groups, n), jnp.float32),
    )
