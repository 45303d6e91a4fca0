"""How scales are shared, and how they are computed, rounded and stored.

Terminology:
  block:        the set of elements that share one scale (and one zero point).
  axis:         the axis (or axes) along which elements share a scale: the contraction axis of a
                weight. ``axis=None`` is one scale per tensor; ``axis=0`` on a Flax kernel
                ``[in, out]`` is one scale per output channel; ``axis=0, group_size=128`` is one
                per 128 consecutive inputs and per output channel.
  block view:   ``x`` reshaped so each block is a set of whole axes: a group axis of length ``n``
                becomes ``[n // group_size, group_size]``.
  scale shape:  the stored scale has the rank of ``x``: 1 on shared axes, ``n // group_size`` on
                the group axis, the full length elsewhere. So one PartitionSpec of ``x`` fits its
                scale, as long as it does not split a shared axis.
  range:        per block, ``lo <= 0 <= hi``: the (possibly clipped) extent of the data.

Dequantization (``v = format.decode(code)``, broadcast over blocks):
  symmetric       x ≈ v · s,                    s = max(-lo, hi) / format.max_value
  zero point      x ≈ (v − z) · s,              s = (hi − lo) / (max − min),  z = round(−lo / s)
  split sign      x ≈ v · (s₋ if v < 0 else s₊), s₋ = −lo / −format.min_value, s₊ = hi / max
  tensor scale    s = stored(s / t) · t,        t = max over blocks of s / scale_dtype_max
  E8M0 scales     s = 2**(floor(log2(amax)) − floor(log2(format.max_value)))   (OCP MX v1.0)
Split-sign scales are AFPQ's separate scales for the negative and positive halves of a block
(Zhang et al., "AFPQ", arXiv:2311.01792, Sec. 3).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import formats as formats_lib

SCALE_DTYPES = ("float32", "bfloat16", "e8m0", "e4m3")
# Largest stored scale after dividing by the tensor scale: E4M3's range is spent on block scales
# (NVFP4); for the others the largest block scale becomes 1.
_SCALE_DTYPE_MAX = {"float32": 1.0, "bfloat16": 1.0, "e8m0": 1.0, "e4m3": 448.0}
_E4M3_MIN_SUBNORMAL = 2.0**-9


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scaling:
    """How scales are shared and stored. Frozen, hashable, validated at construction.

    Attributes:
      axis: ``None`` (one scale per tensor), an int, or a tuple of ints (without
        ``group_size``): the axes along which elements share a scale.
      group_size: blocks of this many consecutive elements along ``axis`` (an int then).
      scale_dtype: ``'float32'``, ``'bfloat16'``, ``'e8m0'`` (a power of two, stored as its
        biased exponent in a uint8, OCP MX rule ``2**(floor(log2 amax) - emax_elem)``) or
        ``'e4m3'`` (float8_e4m3fn; needs ``tensor_scale``).
      zero_point: asymmetric quantization with an integer zero point (unsigned int formats).
      tensor_scale: a second-level f32 scale for the whole tensor (as NVFP4).
      split_sign: separate scales for the negative and positive values of each block (AFPQ).
    """

    axis: int | tuple[int, ...] | None = None
    group_size: int | None = None
    scale_dtype: str = "float32"
    zero_point: bool = False
    tensor_scale: bool = False
    split_sign: bool = False

    def __post_init__(self):
        axis = self.axis
        if isinstance(axis, (list, tuple)):
            if not axis or not all(isinstance(a, int) for a in axis):
                raise ValueError(f"Scaling axis={axis!r}: expected a non-empty tuple of ints.")
            if len(set(axis)) != len(axis):
                raise ValueError(f"Scaling axis={axis!r}: repeated axes.")
            object.__setattr__(self, "axis", tuple(axis))
        elif axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise ValueError(f"Scaling axis={axis!r}: expected None, an int or a tuple of ints.")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise ValueError(f"Scaling group_size={self.group_size!r}: expected an int.")
            if self.group_size < 1:
                raise ValueError(f"Scaling group_size={self.group_size}: expected >= 1.")
            if not isinstance(self.axis, int):
                raise ValueError(
                    f"Scaling group_size={self.group_size} needs a single int axis to group "
                    f"along, got axis={self.axis!r}."
                )
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"Scaling scale_dtype={self.scale_dtype!r}: expected one of {SCALE_DTYPES}."
            )
        if self.zero_point and self.split_sign:
            raise ValueError("Scaling zero_point=True and split_sign=True cannot be combined.")
        if self.scale_dtype == "e4m3" and not self.tensor_scale:
            raise ValueError(
                "Scaling scale_dtype='e4m3' needs tensor_scale=True: E4M3 spans only 2**-9..448, "
                "so an f32 tensor scale must bring the block scales into that range (NVFP4)."
            )
        if self.tensor_scale and self.axis is None:
            raise ValueError("Scaling tensor_scale=True needs per-channel or per-group scales.")

    @property
    def stored_dtype(self):
        """The dtype of the stored scale array."""
        return {
            "float32": jnp.float32,
            "bfloat16": jnp.bfloat16,
            "e8m0": jnp.uint8,
            "e4m3": jnp.float8_e4m3fn,
        }[self.scale_dtype]

    def check_format(self, fmt: formats_lib.Format) -> None:
        """Raises ValueError where ``fmt`` and this scaling cannot work together."""
        if self.zero_point and fmt.min_value != 0:
            raise ValueError(
                f"Scaling zero_point=True needs an unsigned integer format, got {fmt.name}; use "
                "IntFormat(bits, signed=False)."
            )
        if not self.zero_point and fmt.max_value <= 0:
            raise ValueError(f"Format {fmt.name} has no positive values to scale onto.")
        if isinstance(fmt, formats_lib.IntFormat) and not fmt.signed and not self.zero_point:
            raise ValueError(
                f"Format {fmt.name} is unsigned: pass Scaling(zero_point=True), or use a signed "
                "format; without a zero point every negative value would clip to 0."
            )
        if self.split_sign and fmt.min_value >= 0:
            raise ValueError(f"Scaling split_sign=True needs a signed format, got {fmt.name}.")

    def axes(self, ndim: int) -> tuple[int, ...]:
        """The shared axes, normalized to non-negative ints for a tensor of rank ``ndim``."""
        if self.axis is None:
            return tuple(range(ndim))
        raw = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        out = []
        for a in raw:
            if not -ndim <= a < ndim:
                raise ValueError(f"Scaling axis={self.axis!r} is out of range for rank {ndim}.")
            out.append(a % ndim)
        if len(set(out)) != len(out):
            raise ValueError(f"Scaling axis={self.axis!r} names one axis twice for rank {ndim}.")
        return tuple(sorted(out))

    def block_view(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(view_shape, reduce_axes): ``x.reshape(view_shape)`` makes each block whole axes."""
        shape = tuple(shape)
        axes = self.axes(len(shape))
        if self.group_size is None:
            return shape, axes
        (a,) = axes
        n, g = shape[a], self.group_size
        if n % g:
            raise ValueError(
                f"Scaling group_size={g} does not divide axis {self.axis} of length {n} "
                f"(shape {shape})."
            )
        return shape[:a] + (n // g, g) + shape[a + 1 :], (a + 1,)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the stored scale (and zero point) for a tensor of ``shape``."""
        axes = self.axes(len(shape))
        if self.group_size is None:
            return tuple(1 if i in axes else d for i, d in enumerate(shape))
        (a,) = axes
        return tuple(d // self.group_size if i == a else d for i, d in enumerate(shape))

    def block_size(self, shape: tuple[int, ...]) -> int:
        """Elements per block."""
        view, reduce_axes = self.block_view(shape)
        return math.prod(view[a] for a in reduce_axes)


def scale_dtype_max(scaling: Scaling) -> float:
    return _SCALE_DTYPE_MAX[scaling.scale_dtype]


def reciprocal(c) -> np.ndarray:
    """``1 / c`` as an f32 constant. Scales multiply by it instead of dividing by ``c``: XLA
    rewrites divisions by constants (and by broadcast scalars) into such multiplications under
    jit and vmap but not eagerly, so dividing would make the last bit depend on how one runs."""
    return np.float32(1.0) / np.asarray(c, np.float32)


def encode_scale(
    extent: jax.Array, grid_extent, scaling: Scaling, tensor_scale: jax.Array | None = None
) -> jax.Array:
    """Stored scales ``extent / grid_extent / tensor_scale`` rounded to the scale dtype.

    ``extent`` is the block's range (amax, or ``hi - lo`` with a zero point) and ``grid_extent``
    the format's. A zero extent (an all-zero block, where any scale is exact) stores 1. E4M3
    rounds to nearest and saturates; E8M0 is the OCP MX rule
    ``2**(floor(log2(amax)) - emax_elem)``, computed exactly from the exponents.
    """
    extent = extent.astype(jnp.float32)
    if tensor_scale is not None:
        extent = extent / tensor_scale
    if scaling.scale_dtype == "e8m0":
        emax_elem = np.floor(np.log2(np.asarray(grid_extent, np.float64))).astype(np.int32)
        _, e = jnp.frexp(extent)  # floor(log2(a)) = e - 1, exactly
        exponent = jnp.where(extent > 0, jnp.clip(e - 1 - emax_elem, -127, 127), 0)
        return (exponent + 127).astype(jnp.uint8)
    s = extent * reciprocal(grid_extent)
    s = jnp.where(s > 0, s, 1.0)
    if scaling.scale_dtype == "float32":
        return s
    if scaling.scale_dtype == "bfloat16":
        return s.astype(jnp.bfloat16)
    q = formats_lib.E4M3.round(s)
    return jnp.maximum(q, _E4M3_MIN_SUBNORMAL).astype(jnp.float8_e4m3fn)


def decode_scale(stored: jax.Array, scaling: Scaling) -> jax.Array:
    """f32 value of stored scales."""
    if scaling.scale_dtype == "e8m0":
        return jnp.ldexp(jnp.ones(stored.shape, jnp.float32), stored.astype(jnp.int32) - 127)
    return stored.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class StoredScales:
    """What a QArray keeps besides its codes (see the module docstring for the equations)."""

    scale: jax.Array  # [*scale_shape], or [2, *scale_shape] with split_sign
    zero: jax.Array | None  # uint8 [*scale_shape]
    tensor_scale: jax.Array | None  # f32 []


def scales_from_range(
    lo: jax.Array,
    hi: jax.Array,
    fmt: formats_lib.Format,
    scaling: Scaling,
    tensor_scale: jax.Array | None = None,
) -> StoredScales:
    """Stored scales for per-block ranges ``lo <= 0 <= hi`` (any broadcastable shape).

    ``tensor_scale``, when given, is used instead of being derived from the ranges (calibration
    searches fix it first so that every candidate shares it).
    """
    lo = jnp.minimum(lo.astype(jnp.float32), 0.0)
    hi = jnp.maximum(hi.astype(jnp.float32), 0.0)
    if scaling.zero_point:
        extent, grid_extent = hi - lo, fmt.max_value - fmt.min_value
    elif scaling.split_sign:
        extent = jnp.stack([-lo, hi])
        grid_extent = np.array([-fmt.min_value, fmt.max_value]).reshape((2,) + (1,) * lo.ndim)
    else:
        extent, grid_extent = jnp.maximum(-lo, hi), fmt.max_value
    t = None
    if scaling.tensor_scale:
        if tensor_scale is None:
            peak = jnp.max(extent * reciprocal(grid_extent))
            tensor_scale = peak * reciprocal(scale_dtype_max(scaling))
            tensor_scale = jnp.where(tensor_scale > 0, tensor_scale, 1.0)
        t = jnp.asarray(tensor_scale, jnp.float32)
    stored = encode_scale(extent, grid_extent, scaling, t)
    zero = None
    if scaling.zero_point:
        s = decode_scale(stored, scaling) * (1.0 if t is None else t)
        zero = jnp.clip(jnp.round(-lo / s), fmt.min_value, fmt.max_value).astype(jnp.uint8)
    return StoredScales(stored, zero, t)


def effective_scale(stored: StoredScales, scaling: Scaling) -> jax.Array:
    """f32 scale(s) as stored, times the tensor scale; [2, ...] with split_sign."""
    s = decode_scale(stored.scale, scaling)
    return s if stored.tensor_scale is None else s * stored.tensor_scale


def divide(x: jax.Array, s: jax.Array, zero: jax.Array | None, scaling: Scaling) -> jax.Array:
    """``x`` in format units: x / s (+ z); ``s``/``zero`` broadcast against ``x``."""
    if scaling.split_sign:
        return x / jnp.where(x < 0, s[0], s[1])
    y = x / s
    return y if zero is None else y + zero.astype(jnp.float32)


def multiply(v: jax.Array, s: jax.Array, zero: jax.Array | None, scaling: Scaling) -> jax.Array:
    """Inverse of ``divide`` on grid values: v · s, (v − z) · s, or v · s₋/s₊."""
    if scaling.split_sign:
        return v * jnp.where(v < 0, s[0], s[1])
    if zero is not None:
        v = v - zero.astype(jnp.float32)
    return v * s


def broadcastable(a: jax.Array, view_shape, reduce_axes, split_sign: bool) -> jax.Array:
    """Reshapes a scale-shaped array so it broadcasts against the block view."""
    target = tuple(1 if i in reduce_axes else d for i, d in enumerate(view_shape))
    return a.reshape(((2,) if split_sign else ()) + target)


def np_scale_shape(shape, scaling: Scaling) -> tuple[int, ...]:
    """Stored scale array shape (with the leading 2 of split_sign)."""
    return ((2,) if scaling.split_sign else ()) + scaling.scale_shape(tuple(shape))
