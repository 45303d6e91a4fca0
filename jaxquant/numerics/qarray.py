"""QArray, the quantized array, and ``quantize``, the entry point that makes one.

Terminology:
  codes:  the elements' codes, packed densely along the last axis (``pallas_kernels.packing``).
  scale:  stored per-block scales (see ``scaling``): the rank of the array, 1 on shared axes,
          ``n // group_size`` on a group axis; with split-sign scales a leading axis of 2
          holds (negative, positive).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxquant.numerics import calibration as calibration_lib
from jaxquant.numerics import formats as formats_lib
from jaxquant.numerics import scaling as scaling_lib
from jaxquant.numerics.presets import Preset
from pallas_kernels import packing


class QuantizedTensor:
    """Base of the quantized-weight pytrees: ``QArray`` (scalar codes) and
    ``jaxquant.vq.VQArray`` (vector codes). Subclasses have ``shape``, ``dtype``, ``size``,
    ``dequantize(dtype=None)``, ``nbytes`` and ``bits_per_weight``; layers, ``freeze`` and the
    PTQ pipeline handle any of them through this interface."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array (every pytree leaf)."""
        leaves = jax.tree_util.tree_leaves(self)
        return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves)


@struct.dataclass
class QArray(QuantizedTensor):
    """A quantized array: packed codes, per-block scales, and the static recipe to read them.

    Invariants:
      * ``codes`` is uint8 ``shape[:-1] + (packed_length(shape[-1], format.bits),)``: code ``i`` of
        each row of the last axis sits at bits ``[i*bits, (i+1)*bits)`` of that row's
        little-endian bit stream (``pallas_kernels.packing``).
      * ``scale`` has ``scaling.stored_dtype`` and ``scaling.scale_shape(shape)`` (with a leading
        2 for split-sign scales); ``zero`` (uint8, same shape) only with a zero point;
        ``tensor_scale`` (f32 scalar) only with a second-level scale.
      * Dequantization, with ``v = format.decode(code)`` and ``s`` the decoded scale times
        ``tensor_scale``, broadcast over each block::

            x ≈ v · s            (symmetric)
            x ≈ (v − zero) · s   (zero point)
            x ≈ v · s₋ if v < 0 else v · s₊   (split sign)

    It is a pytree (arrays are leaves, the rest is static), so it passes through ``jit``,
    ``vmap``, sharding and orbax like any array. A QArray made under ``vmap`` carries the batch
    axes in front of every leaf; ``dequantize`` maps over them.

    Attributes:
      codes: uint8 packed codes.
      scale: stored scales.
      shape: the logical shape of the array.
      dtype: the dtype ``dequantize`` returns.
      format: the element format.
      scaling: how scales are shared and stored.
      zero: uint8 zero points, or None.
      tensor_scale: f32 second-level scale, or None.
    """

    codes: jax.Array
    scale: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)
    format: formats_lib.Format = struct.field(pytree_node=False)
    scaling: scaling_lib.Scaling = struct.field(pytree_node=False)
    zero: jax.Array | None = None
    tensor_scale: jax.Array | None = None

    @property
    def _batch_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[: self.codes.ndim - len(self.shape)])

    def dequantize(self, dtype=None) -> jax.Array:
        """The array the codes stand for, in ``dtype`` (default ``self.dtype``)."""
        if self._batch_shape:
            return jax.vmap(lambda q: q.dequantize(dtype))(self)
        view_shape, reduce_axes = self.scaling.block_view(self.shape)
        codes = packing.unpack(self.codes, self.format.bits, self.shape[-1])
        v = self.format.decode(codes).reshape(view_shape)
        stored = scaling_lib.StoredScales(self.scale, self.zero, self.tensor_scale)
        s = scaling_lib.effective_scale(stored, self.scaling)
        split = self.scaling.split_sign
        s = scaling_lib.broadcastable(s, view_shape, reduce_axes, split)
        zero = self.zero
        if zero is not None:
            zero = scaling_lib.broadcastable(zero, view_shape, reduce_axes, False)
        x = scaling_lib.multiply(v, s, zero, self.scaling)
        return x.reshape(self.shape).astype(self.dtype if dtype is None else dtype)

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / number of elements``: every overhead counted, padding included."""
        return 8 * self.nbytes / (self.size * math.prod(self._batch_shape))


def is_qarray(x) -> bool:
    """For ``is_leaf=`` in tree maps that should stop at quantized arrays (``QArray``,
    ``VQArray``)."""
    return isinstance(x, QuantizedTensor)


def resolve(fmt, scaling: scaling_lib.Scaling | None):
    """(format, scaling) from a Format or a Preset, with an explicit ``scaling`` winning."""
    if isinstance(fmt, Preset):
        return fmt.format, scaling if scaling is not None else fmt.scaling
    if isinstance(fmt, formats_lib.Format):
        return fmt, scaling if scaling is not None else scaling_lib.Scaling()
    raise TypeError(f"fmt={fmt!r}: expected a Format (IntFormat, FloatFormat, ...) or a Preset.")


def check_input(x, name: str = "x") -> jax.Array:
    """Rejects non-float arrays, and NaN/Inf in concrete (non-traced) arrays."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}.")
    if not isinstance(x, jax.core.Tracer) and x.size:
        bad = int(np.sum(~np.isfinite(np.asarray(x, np.float32))))
        if bad:
            raise ValueError(f"{name}: {bad} NaN/Inf value(s) in an array of shape {x.shape}.")
    return x


def quantize(
    x: jax.Array,
    fmt: formats_lib.Format | Preset,
    scaling: scaling_lib.Scaling | None = None,
    *,
    calibration: str | calibration_lib.Calibration = "absmax",
    rounding: formats_lib.Rounding = "nearest",
    key: jax.Array | None = None,
    scale: jax.Array | None = None,
) -> QArray:
    """Quantizes ``x`` to a QArray.

    Each block's range is calibrated, its scale computed and rounded to the scale dtype, and
    ``x / scale`` rounded onto the format's grid (saturating):
    ``code = encode(round(x / s))`` (``round(x / s + zero)`` with a zero point).

    Args:
      x: a float array of any shape (f32, bf16, f16); NaN/Inf is an error when ``x`` is concrete.
      fmt: an element format (``IntFormat(4)``, ``FloatFormat(2, 1)``, ``NF4``) or a preset
        (``INT4_G128``, ``MXFP4``, ...).
      scaling: how scales are shared; overrides a preset's. Default for a bare format: one
        f32 scale per tensor.
      calibration: ``'absmax'``, ``'mse'``, ``'percentile'`` or a ``Calibration``.
      rounding: ``'nearest'`` (ties to even) or ``'stochastic'`` (unbiased; needs ``key``).
      key: PRNG key for stochastic rounding.
      scale: f32 scales of shape ``scaling.scale_shape(x.shape)`` to use instead of calibrating
        (a scale learned by LSQ); symmetric f32-scale scalings only.

    Returns:
      A QArray with ``dequantize()`` of ``x.shape`` and ``x.dtype``.

    Example:
      >>> q = quantize(w, INT4_G128)           # w: [4096, 1024]
      >>> q.bits_per_weight                    # 4 + 32 / 128 = 4.25
    """
    fmt, scaling = resolve(fmt, scaling)
    x = check_input(x)
    scaling.check_format(fmt)
    calibration = calibration_lib.as_calibration(calibration)
    formats_lib.check_rounding(rounding, key)
    if x.ndim == 0:
        raise ValueError("quantize x: expected an array with at least one axis, got a scalar.")
    scaling.block_view(x.shape)  # shape errors here, not from inside the trace
    return _quantize(
        x, key, scale, fmt=fmt, scaling=scaling, calibration=calibration, rounding=rounding
    )


# One compiled computation per (shape, recipe), eagerly or inside a caller's jit: eager
# op-by-op dispatch of the many small ops above costs seconds per call.
@functools.partial(jax.jit, static_argnames=("fmt", "scaling", "calibration", "rounding"))
def _quantize(x, key, scale, *, fmt, scaling, calibration, rounding) -> QArray:
    view_shape, reduce_axes = scaling.block_view(x.shape)
    xv = x.astype(jnp.float32).reshape(view_shape)
    if scale is None:
        lo, hi, t = calibration_lib.calibrate(xv, reduce_axes, fmt, scaling, calibration)
        stored = scaling_lib.scales_from_range(lo, hi, fmt, scaling, t)
    else:
        stored = _given_scale(scale, x.shape, scaling, view_shape, reduce_axes)
    s = scaling_lib.effective_scale(stored, scaling)
    y = scaling_lib.divide(xv, s, stored.zero, scaling)
    codes = fmt.quantize_values(y, rounding, key).reshape(x.shape)
    scale_shape = scaling_lib.np_scale_shape(x.shape, scaling)
    zero = None if stored.zero is None else stored.zero.reshape(scale_shape)
    return QArray(
        codes=packing.pack(codes, fmt.bits),
        scale=stored.scale.reshape(scale_shape),
        shape=tuple(x.shape),
        dtype=np.dtype(x.dtype),
        format=fmt,
        scaling=scaling,
        zero=zero,
        tensor_scale=stored.tensor_scale,
    )


def _given_scale(scale, shape, scaling, view_shape, reduce_axes) -> scaling_lib.StoredScales:
    if scaling.zero_point or scaling.split_sign or scaling.tensor_scale:
        raise ValueError("quantize scale=: supported for symmetric scalings only.")
    if scaling.scale_dtype != "float32":
        raise ValueError(
            f"quantize scale=: needs scale_dtype='float32', got {scaling.scale_dtype!r}."
        )
    expected = scaling.scale_shape(shape)
    if tuple(scale.shape) != expected:
        raise ValueError(f"quantize scale: expected shape {expected}, got {tuple(scale.shape)}.")
    s = scaling_lib.broadcastable(scale.astype(jnp.float32), view_shape, reduce_axes, False)
    return scaling_lib.StoredScales(s, None, None)
