"""The low-bit weight matmul in plain ``jnp``: the reference every kernel matches.

Terminology:
  x:            activations [M, K] (float32 or bfloat16); K = in features, M = rows (tokens).
  weight:       w [K, N] (N = out features), stored as ``codes``, ``scales`` and optional
                ``zeros`` (the fields of a jaxquant ``QArray`` of a Flax kernel [in, out]).
  code:         an unsigned integer of ``bits`` bits (2, 4 or 8) per weight element.
  codes:        uint8 [K, packed_length(N, bits)]: each row of w packed along N by
                ``pallas_kernels.packing.pack`` (a little-endian bit stream: byte ``j`` holds
                codes ``per*j .. per*j + per - 1``, code ``per*j + p`` in bits
                ``[p*bits, (p+1)*bits)``, ``per = 8 // bits``).
  fmt:          how a code decodes to its value ``v``: ``'int'`` (two's complement), ``'uint'``
                (``v = code``, with a zero point), ``'e2m1'`` (OCP FP4), ``'e4m3'``
                (float8_e4m3fn bits), ``'lut'`` (``v = lut[code]``, e.g. NF4).
  group:        ``group_size`` consecutive rows of w (along K) that share one scale per
                column; ``group_size=None`` is one group of all K rows (per output channel).
  scales:       [K // group_size, N] (or [1, N]), stored as ``scale_dtype``: ``'float32'``,
                ``'bfloat16'``, ``'e8m0'`` (uint8 biased exponent ``e``: ``2**(e - 127)``) or
                ``'e4m3'`` (float8_e4m3fn); times ``tensor_scale`` (f32 scalar) when given.
  zeros:        uint8 zero points of the scales' shape (``fmt='uint'`` only).

The matmul:  ``y[m, n] = sum_k x[m, k] * w[k, n]``, with
``w[k, n] = (v[k, n] - zeros[k // g, n]) * scales[k // g, n] * tensor_scale`` (``g`` the group
size), accumulated in float32 and returned in ``out_dtype`` (default ``x.dtype``).

This module imports only jax and numpy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import packing

FORMATS = ("int", "uint", "e2m1", "e4m3", "lut")
SCALE_DTYPES = ("float32", "bfloat16", "e8m0", "e4m3")
SUPPORTED_BITS = (2, 4, 8)
X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# The stored dtype of ``scales`` for each scale_dtype.
SCALE_STORAGE = {
    "float32": jnp.dtype(jnp.float32),
    "bfloat16": jnp.dtype(jnp.bfloat16),
    "e8m0": jnp.dtype(jnp.uint8),
    "e4m3": jnp.dtype(jnp.float8_e4m3fn),
}
# Formats whose code width is fixed.
_FORMAT_BITS = {"e2m1": 4, "e4m3": 8}
# OCP FP4 (E2M1) magnitudes of codes 0..7; codes 8..15 are their negatives (bit 3 is the sign).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclasses.dataclass(frozen=True)
class Problem:
    """The static description of one call, after validation (hashable)."""

    m: int
    k: int
    n: int
    bits: int
    group_size: int | None
    fmt: str
    scale_dtype: str
    has_zeros: bool
    has_tensor_scale: bool
    out_dtype: jnp.dtype

    @property
    def per_byte(self) -> int:
        """Codes per byte, ``8 // bits``: the number of column planes of a packed byte."""
        return 8 // self.bits

    @property
    def packed_n(self) -> int:
        """Bytes per row of ``codes``: ``packed_length(n, bits)``."""
        return packing.packed_length(self.n, self.bits)

    @property
    def groups(self) -> int:
        """Rows of ``scales``: ``k // group_size`` (1 per output channel)."""
        return 1 if self.group_size is None else self.k // self.group_size


def _shape(a) -> tuple[int, ...]:
    # Arrays, tracers and ShapeDtypeStructs carry .shape; Python and NumPy scalars do not.
    return tuple(a.shape) if hasattr(a, "shape") else tuple(np.shape(a))


def _dtype(a):
    return jnp.dtype(a.dtype) if hasattr(a, "dtype") else jnp.dtype(jnp.result_type(a))


def check_args(
    x,
    codes,
    scales,
    zeros=None,
    *,
    bits,
    group_size,
    fmt,
    scale_dtype="float32",
    tensor_scale=None,
    lut=None,
    out_dtype=None,
) -> Problem:
    """Validates a call, raising ``ValueError`` that names the bad argument; see the module doc."""
    if fmt not in FORMATS:
        raise ValueError(f"quantized_matmul fmt={fmt!r}: expected one of {FORMATS}.")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"quantized_matmul bits={bits!r}: expected one of {SUPPORTED_BITS}.")
    if fmt in _FORMAT_BITS and bits != _FORMAT_BITS[fmt]:
        raise ValueError(
            f"quantized_matmul bits={bits}: fmt={fmt!r} has {_FORMAT_BITS[fmt]}-bit codes."
        )
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(
            f"quantized_matmul scale_dtype={scale_dtype!r}: expected one of {SCALE_DTYPES}."
        )
    if _dtype(x) not in X_DTYPES or len(_shape(x)) != 2:
        raise ValueError(
            f"quantized_matmul x: expected float32 or bfloat16 [M, K], got {_dtype(x)} {_shape(x)}."
        )
    m, k = _shape(x)
    if len(_shape(scales)) != 2:
        raise ValueError(
            f"quantized_matmul scales: expected [K // group_size, N], got shape {_shape(scales)}."
        )
    n = _shape(scales)[1]
    if group_size is not None and (
        isinstance(group_size, bool)
        or not isinstance(group_size, (int, np.integer))
        or group_size < 1
        or k % group_size
    ):
        raise ValueError(
            f"quantized_matmul group_size={group_size!r}: expected None or a positive integer "
            f"dividing K={k}."
        )
    groups = 1 if group_size is None else k // group_size
    if _shape(scales) != (groups, n) or _dtype(scales) != SCALE_STORAGE[scale_dtype]:
        raise ValueError(
            f"quantized_matmul scales: expected {SCALE_STORAGE[scale_dtype]} [{groups}, N] "
            f"(K={k}, group_size={group_size}, scale_dtype={scale_dtype!r}), got "
            f"{_dtype(scales)} {_shape(scales)}."
        )
    packed = (k, packing.packed_length(n, bits))
    if _dtype(codes) != jnp.uint8 or _shape(codes) != packed:
        raise ValueError(
            f"quantized_matmul codes: expected uint8 {packed} (K, packed_length(N={n}, "
            f"bits={bits})), got {_dtype(codes)} {_shape(codes)}."
        )
    if zeros is not None:
        if fmt != "uint":
            raise ValueError(
                f"quantized_matmul zeros: zero points go with fmt='uint' only, got fmt={fmt!r}."
            )
        if _dtype(zeros) != jnp.uint8 or _shape(zeros) != (groups, n):
            raise ValueError(
                f"quantized_matmul zeros: expected uint8 {(groups, n)} (the shape of scales), "
                f"got {_dtype(zeros)} {_shape(zeros)}."
            )
    if tensor_scale is not None and (
        np.size(tensor_scale) != 1 or not jnp.issubdtype(_dtype(tensor_scale), jnp.floating)
    ):
        raise ValueError(
            f"quantized_matmul tensor_scale: expected a float scalar, got {_dtype(tensor_scale)} "
            f"{_shape(tensor_scale)}."
        )
    if fmt == "lut":
        if lut is None:
            raise ValueError("quantized_matmul lut: fmt='lut' needs lut, float [2**bits].")
        if _shape(lut) != (2**bits,) or not jnp.issubdtype(_dtype(lut), jnp.floating):
            raise ValueError(
                f"quantized_matmul lut: expected float [{2**bits}] (2**bits), got "
                f"{_dtype(lut)} {_shape(lut)}."
            )
    elif lut is not None:
        raise ValueError(f"quantized_matmul lut: only used with fmt='lut', got fmt={fmt!r}.")
    out_dtype = jnp.dtype(_dtype(x) if out_dtype is None else out_dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"quantized_matmul out_dtype={out_dtype}: expected a floating dtype.")
    return Problem(
        m=m,
        k=k,
        n=n,
        bits=bits,
        group_size=None if group_size is None else int(group_size),
        fmt=fmt,
        scale_dtype=scale_dtype,
        has_zeros=zeros is not None,
        has_tensor_scale=tensor_scale is not None,
        out_dtype=out_dtype,
    )


def code_table(fmt: str, bits: int) -> np.ndarray:
    """float32 [2**bits]: the value of every code, for each fmt but ``'lut'``."""
    codes = np.arange(2**bits)
    if fmt == "int":
        return np.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes).astype(np.float32)
    if fmt == "uint":
        return codes.astype(np.float32)
    if fmt == "e2m1":
        mags = np.asarray(E2M1_MAGNITUDES, np.float32)
        return np.concatenate([mags, -mags])
    if fmt == "e4m3":
        return codes.astype(np.uint8).view(jnp.float8_e4m3fn).astype(np.float32)
    raise ValueError(f"code_table fmt={fmt!r}: no fixed table.")


def decode_scales(scales: jax.Array, scale_dtype: str) -> jax.Array:
    """float32 value of stored scales."""
    if scale_dtype == "e8m0":
        return jnp.ldexp(jnp.ones(scales.shape, jnp.float32), scales.astype(jnp.int32) - 127)
    return scales.astype(jnp.float32)


def dequantize_reference(
    codes,
    scales,
    zeros=None,
    *,
    n,
    bits,
    group_size,
    fmt,
    scale_dtype="float32",
    tensor_scale=None,
    lut=None,
) -> jax.Array:
    """The float32 weight w [K, N] that ``codes``, ``scales`` and ``zeros`` stand for."""
    c = packing.unpack(jnp.asarray(codes), bits, n).astype(jnp.int32)  # [K, N]
    k = c.shape[0]
    table = jnp.asarray(lut, jnp.float32) if fmt == "lut" else jnp.asarray(code_table(fmt, bits))
    v = table[c]
    s = decode_scales(jnp.asarray(scales), scale_dtype)  # [groups, N]
    if tensor_scale is not None:
        s = s * jnp.asarray(tensor_scale, jnp.float32).reshape(())
    g = (group_size or k) or 1  # one group of all K rows per column (1 only when K == 0)
    v = v.reshape(k // g, g, n)  # [groups, group_size, N]
    if zeros is not None:
        v = v - jnp.asarray(zeros).astype(jnp.float32)[:, None, :]
    return (v * s[:, None, :]).reshape(k, n)


def quantized_matmul_reference(
    x,
    codes,
    scales,
    zeros=None,
    *,
    bits,
    group_size,
    fmt,
    scale_dtype="float32",
    tensor_scale=None,
    lut=None,
    out_dtype=None,
) -> jax.Array:
    """``x @ w`` with the weight dequantized to float32 first (table lookups, no kernel).

    Args: see ``api.quantized_matmul``.

    Returns:
      [M, N] in ``out_dtype`` (default ``x.dtype``): a float32 matmul at
      ``Precision.HIGHEST``, rounded once.

    Example:
      >>> codes = pack(jnp.array([[1, 15]], jnp.uint8), 4)  # w = [[1, -1]] as int4
      >>> quantized_matmul_reference(jnp.ones((1, 1)), codes, jnp.ones((1, 2)), bits=4,
      ...                            group_size=None, fmt="int")
      Array([[ 1., -1.]], dtype=float32)
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
    w = dequantize_reference(
        codes,
        scales,
        zeros,
        n=p.n,
        bits=bits,
        group_size=group_size,
        fmt=fmt,
        scale_dtype=scale_dtype,
        tensor_scale=tensor_scale,
        lut=lut,
    )
    y = jnp.matmul(jnp.asarray(x).astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(p.out_dtype)


def arg_specs(
    m: int,
    k: int,
    n: int,
    *,
    bits: int,
    group_size: int | None,
    fmt: str,
    scale_dtype: str = "float32",
    x_dtype=jnp.bfloat16,
    zeros: bool = False,
    tensor_scale: bool = False,
) -> tuple[jax.ShapeDtypeStruct | None, ...]:
    """``(x, codes, scales, zeros, tensor_scale, lut)`` shapes of a call, None where absent.

    Shared by the lowering tests and benchmarks (``jax.export`` takes them as they are).
    """
    groups = 1 if group_size is None else k // group_size
    spec = jax.ShapeDtypeStruct
    return (
        spec((m, k), x_dtype),
        spec((k, packing.packed_length(n, bits)), jnp.uint8),
        spec((groups, n), SCALE_STORAGE[scale_dtype]),
        spec((groups, n), jnp.uint8) if zeros else None,
        spec((), jnp.float32) if tensor_scale else None,
        spec((2**bits,), jnp.float32) if fmt == "lut" else None,
    )
