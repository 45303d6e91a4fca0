"""Quantize-dequantize for training: straight-through and LSQ gradients (the element-level
functions behind ``ScalarQuantizer.fake_quant``).

Terminology:
  STE:  straight-through estimator. The forward pass is ``dequantize(quantize(x))``; the backward
        pass treats rounding as the identity, so ``d out / d x = 1`` where ``x`` lies inside the
        representable range and 0 where it was clipped (with absmax ranges and exact scales
        nothing is: ``can_saturate``). The scale is calibrated from ``x`` and gets no gradient.
  LSQ:  learned step size. The scale ``s`` is a parameter; with ``y = clip(x / s, Qn, Qp)``,
        ``out = round(y) · s`` and (Esser et al., arXiv:1902.08153, Eq. 3 and Sec. 2.2)

            d out / d s = round(x/s) − x/s   inside,   Qn or Qp where clipped,

        scaled by ``g = 1 / sqrt(block_size · Qp)``; ``d out / d x`` is the clipped STE.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.numerics import calibration as calibration_lib
from jaxquant.numerics import formats as formats_lib
from jaxquant.numerics import scaling as scaling_lib


@jax.custom_vjp
def _grad_scale(s: jax.Array, g: float) -> jax.Array:
    """Identity forward (exactly); multiplies the gradient by ``g``."""
    return s


def _grad_scale_fwd(s, g):
    return s, g


def _grad_scale_bwd(g, ct):
    return ct * g, None


_grad_scale.defvjp(_grad_scale_fwd, _grad_scale_bwd)


def _round_ste(y: jax.Array, fmt, rounding, key) -> jax.Array:
    """Rounds onto the grid forward; identity backward."""
    # round(y) + (y - y) rather than y + (round(y) - y): the forward value is exact.
    return jax.lax.stop_gradient(fmt.round(y, rounding, key)) + (y - jax.lax.stop_gradient(y))


def ste(
    x: jax.Array,
    fmt: formats_lib.Format,
    scaling: scaling_lib.Scaling,
    calibration: calibration_lib.Calibration,
    rounding: formats_lib.Rounding = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantize-dequantize ``x`` with calibrated scales and the clipped straight-through
    gradient; the forward value equals ``ScalarQuantizer.quantize(x).dequantize()`` bit for bit.

    Args:
      x: float array (checked by the caller), with ``scaling.block_view(x.shape)`` valid.
      fmt, scaling, calibration, rounding, key: the recipe (``ScalarQuantizer``).

    Returns:
      An array like ``x``.
    """
    view_shape, reduce_axes = scaling.block_view(x.shape)
    xv = x.astype(jnp.float32).reshape(view_shape)
    out = _ste_view(xv, key, fmt, scaling, calibration, rounding, tuple(reduce_axes))
    return out.reshape(x.shape).astype(x.dtype)


# A custom gradient rather than ``deq + (x − stop_gradient(x))``: the forward pass is the
# quantize-dequantize alone, and the backward one masked select (no recomputed arithmetic).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _ste_view(xv, key, fmt, scaling, calibration, rounding, reduce_axes):
    return _ste_view_fwd(xv, key, fmt, scaling, calibration, rounding, reduce_axes)[0]


def _ste_view_fwd(xv, key, fmt, scaling, calibration, rounding, reduce_axes):
    lo, hi, t = calibration_lib.calibrate(xv, reduce_axes, fmt, scaling, calibration)
    stored = scaling_lib.scales_from_range(lo, hi, fmt, scaling, t)
    s = scaling_lib.effective_scale(stored, scaling)
    y = scaling_lib.divide(xv, s, stored.zero, scaling)
    deq = scaling_lib.multiply(fmt.round(y, rounding, key), s, stored.zero, scaling)
    if not can_saturate(scaling, calibration):
        return deq, None
    # Clipped STE: gradient 1 where x was representable, 0 where it saturated.
    return deq, (y >= fmt.min_value) & (y <= fmt.max_value)


def can_saturate(scaling: scaling_lib.Scaling, calibration: calibration_lib.Calibration) -> bool:
    """Whether calibrated scales can leave elements outside the grid.

    Absmax ranges with exact scales (f32, symmetric, no second-level tensor scale) put every
    element inside the grid by construction (``|x| / s`` can exceed the grid's end by one ulp
    of rounding, which ``round`` clips to the same value): nothing saturates, the clipped STE
    is the identity, and its mask (a pass over the tensor in the forward and one in the
    backward, about 5% of a W8A8 QAT step on CPU) is skipped. MSE and percentile ranges,
    rounded scales (bf16, e8m0, e4m3), tensor scales and zero points can clip.
    """
    exact_scale = (
        scaling.scale_dtype == "float32" and not scaling.tensor_scale and not scaling.zero_point
    )
    return not (calibration.method == "absmax" and exact_scale)


def _ste_view_bwd(fmt, scaling, calibration, rounding, reduce_axes, inside, g):
    del fmt, scaling, calibration, rounding, reduce_axes
    if inside is None:  # nothing can saturate (can_saturate)
        return g, None
    return jnp.where(inside, g, jnp.zeros((), g.dtype)), None


_ste_view.defvjp(_ste_view_fwd, _ste_view_bwd)


def lsq(
    x: jax.Array,
    fmt: formats_lib.Format,
    scaling: scaling_lib.Scaling,
    scale: jax.Array,
    rounding: formats_lib.Rounding = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantize-dequantize ``x`` with a learned f32 ``scale`` of shape
    ``scaling.scale_shape(x.shape)`` and LSQ's gradients (module docstring); symmetric
    scalings only (checked by ``ScalarQuantizer``)."""
    expected = scaling.scale_shape(x.shape)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"LSQ scale: expected shape {expected} for x of shape {x.shape} and {scaling}, got "
            f"{tuple(scale.shape)}."
        )
    view_shape, reduce_axes = scaling.block_view(x.shape)
    xv = x.astype(jnp.float32).reshape(view_shape)
    block = scaling.block_size(x.shape)
    s = _grad_scale(scale.astype(jnp.float32), 1.0 / (block * fmt.max_value) ** 0.5)
    s = scaling_lib.broadcastable(s, view_shape, reduce_axes, False)
    y = jnp.clip(xv / s, fmt.min_value, fmt.max_value)
    out = _round_ste(y, fmt, rounding, key) * s
    return out.reshape(x.shape).astype(x.dtype)


def lsq_init_scale(x: jax.Array, fmt, scaling: scaling_lib.Scaling) -> jax.Array:
    """LSQ's initial scale ``2 · mean|x| / sqrt(Qp)`` per block: f32 [scale_shape]."""
    view_shape, reduce_axes = scaling.block_view(x.shape)
    xv = jnp.abs(x.astype(jnp.float32).reshape(view_shape))
    s = 2 * jnp.mean(xv, axis=reduce_axes) * scaling_lib.reciprocal(fmt.max_value**0.5)
    return jnp.maximum(s, jnp.finfo(jnp.float32).tiny).reshape(scaling.scale_shape(x.shape))
