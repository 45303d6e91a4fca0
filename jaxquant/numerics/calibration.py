"""Calibration: choosing each block's range ``lo <= 0 <= hi``, from which its scale follows.

Terminology:
  absmax:      the block's extreme values; nothing is clipped.
  percentile:  the ``p``-th percentile of ``|x|`` (of ``x`` and ``-x`` with a zero point, split
               sign); outliers beyond it clip.
  mse:         the absmax range shrunk by the clip ratio ``r`` in ``[min_ratio, 1]`` that
               minimizes the block's squared quantization error, searched on a grid of
               ``num_ratios`` ratios with the block's real format, scale dtype and rounding to
               nearest (the grid search of GPTQ's and AWQ's reference implementations).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import formats as formats_lib
from jaxquant.numerics import scaling as scaling_lib

METHODS = ("absmax", "mse", "percentile")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """How block ranges are chosen. Frozen, hashable (static under jit).

    Attributes:
      method: ``'absmax'``, ``'mse'`` or ``'percentile'``.
      percentile: for ``'percentile'``, in (50, 100].
      num_ratios: for ``'mse'``, the number of clip ratios searched.
      min_ratio: for ``'mse'``, the smallest clip ratio, in (0, 1].
    """

    method: str = "absmax"
    percentile: float = 99.9
    num_ratios: int = 64
    min_ratio: float = 0.05

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Calibration method={self.method!r}: expected one of {METHODS}.")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"Calibration percentile={self.percentile}: expected (50, 100].")
        if not isinstance(self.num_ratios, int) or self.num_ratios < 1:
            raise ValueError(f"Calibration num_ratios={self.num_ratios!r}: expected an int >= 1.")
        if not 0 < self.min_ratio <= 1:
            raise ValueError(f"Calibration min_ratio={self.min_ratio}: expected (0, 1].")

    @property
    def ratios(self) -> np.ndarray:
        return np.linspace(1.0, self.min_ratio, self.num_ratios, dtype=np.float32)


def as_calibration(calibration: str | Calibration) -> Calibration:
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, str):
        return Calibration(method=calibration)
    raise TypeError(f"calibration={calibration!r}: expected a method name or a Calibration.")


def _reduce_quantile(x, reduce_axes, q):
    """Quantile ``q`` (in [0, 1]) of ``x`` over ``reduce_axes``, keepdims."""
    keep = [a for a in range(x.ndim) if a not in reduce_axes]
    moved = jnp.transpose(x, keep + list(reduce_axes))
    flat = moved.reshape(*moved.shape[: len(keep)], -1)
    out = jnp.quantile(flat, q, axis=-1)
    target = tuple(1 if a in reduce_axes else d for a, d in enumerate(x.shape))
    return out.reshape(target)


def block_range(xv, reduce_axes, scaling: scaling_lib.Scaling, calibration: Calibration):
    """(lo, hi) per block of the block view ``xv`` before any MSE search, keepdims."""
    two_sided = scaling.zero_point or scaling.split_sign
    if calibration.method == "percentile":
        p = calibration.percentile / 100
        if two_sided:
            return (
                _reduce_quantile(xv, reduce_axes, 1 - p),
                _reduce_quantile(xv, reduce_axes, p),
            )
        amax = _reduce_quantile(jnp.abs(xv), reduce_axes, p)
        return -amax, amax
    if two_sided:
        return (
            jnp.min(xv, axis=reduce_axes, keepdims=True),
            jnp.max(xv, axis=reduce_axes, keepdims=True),
        )
    amax = jnp.max(jnp.abs(xv), axis=reduce_axes, keepdims=True)
    return -amax, amax


def qdq_view(xv, lo, hi, fmt, scaling, tensor_scale=None, rounding="nearest", key=None):
    """Quantize-dequantize of the block view with ranges (lo, hi): (values, StoredScales)."""
    stored = scaling_lib.scales_from_range(lo, hi, fmt, scaling, tensor_scale)
    s = scaling_lib.effective_scale(stored, scaling)
    y = scaling_lib.divide(xv, s, stored.zero, scaling)
    v = fmt.round(y, rounding, key)
    return scaling_lib.multiply(v, s, stored.zero, scaling), stored


def calibrate(
    xv: jax.Array,
    reduce_axes: tuple[int, ...],
    fmt: formats_lib.Format,
    scaling: scaling_lib.Scaling,
    calibration: Calibration,
):
    """(lo, hi, tensor_scale) for every block of the block view ``xv`` (f32).

    ``tensor_scale`` is None unless ``scaling.tensor_scale``; the MSE search fixes it from the
    absmax ranges so that all candidate ratios share it.
    """
    lo, hi = block_range(xv, reduce_axes, scaling, calibration)
    t = None
    if scaling.tensor_scale:
        t = scaling_lib.scales_from_range(lo, hi, fmt, scaling).tensor_scale
    if calibration.method != "mse":
        return lo, hi, t

    def step(best, r):
        best_err, best_r = best
        deq, _ = qdq_view(xv, lo * r, hi * r, fmt, scaling, t)
        err = jnp.sum(jnp.square(deq - xv), axis=reduce_axes, keepdims=True)
        better = err < best_err  # strict: ties keep the larger ratio (searched first)
        return (jnp.where(better, err, best_err), jnp.where(better, r, best_r)), None

    init = (jnp.full(lo.shape, jnp.inf, jnp.float32), jnp.ones(lo.shape, jnp.float32))
    (_, ratio), _ = jax.lax.scan(step, init, jnp.asarray(calibration.ratios))
    return lo * ratio, hi * ratio, t
