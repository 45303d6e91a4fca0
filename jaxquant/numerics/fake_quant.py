"""Quantize-dequantize for training: straight-through and LSQ gradients.

Terminology:
  STE:  straight-through estimator. The forward pass is ``dequantize(quantize(x))``; the backward
        pass treats rounding as the identity, so ``d out / d x = 1`` where ``x`` lies inside the
        representable range and 0 where it was clipped. The scale is calibrated from ``x`` and
        gets no gradient.
  LSQ:  learned step size. The scale ``s`` is a parameter; with ``y = clip(x / s, Qn, Qp)``,
        ``out = round(y) · s`` and (Esser et al., arXiv:1902.08153, Eq. 3 and Sec. 2.2)

            d out / d s = round(x/s) − x/s   inside,   Qn or Qp where clipped,

        scaled by ``g = 1 / sqrt(block_size · Qp)``; ``d out / d x`` is the clipped STE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.numerics import calibration as calibration_lib
from jaxquant.numerics import formats as formats_lib
from jaxquant.numerics import scaling as scaling_lib
from jaxquant.numerics.qarray import check_input, resolve


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


def fake_quant(
    x: jax.Array,
    fmt,
    scaling: scaling_lib.Scaling | None = None,
    *,
    scale: jax.Array | None = None,
    calibration: str | calibration_lib.Calibration = "absmax",
    rounding: formats_lib.Rounding = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantize-dequantize ``x`` with a straight-through gradient, or LSQ when ``scale`` is given.

    The forward value equals ``quantize(x, ...).dequantize()`` (STE mode) bit for bit.

    Args:
      x: float array.
      fmt: a format or a preset (see ``quantize``).
      scaling: overrides a preset's scaling.
      scale: None for STE with calibrated scales; or a learnable f32 scale of shape
        ``scaling.scale_shape(x.shape)`` for LSQ (symmetric scalings only; the scale is used as
        f32, whatever ``scale_dtype`` says). ``lsq_init_scale`` gives the paper's initial value.
      calibration, rounding, key: as in ``quantize`` (calibration is unused with ``scale``).

    Returns:
      An array like ``x``.
    """
    fmt, scaling = resolve(fmt, scaling)
    x = check_input(x)
    scaling.check_format(fmt)
    formats_lib.check_rounding(rounding, key)
    view_shape, reduce_axes = scaling.block_view(x.shape)
    xv = x.astype(jnp.float32).reshape(view_shape)
    if scale is None:
        xs = jax.lax.stop_gradient(xv)
        calibration = calibration_lib.as_calibration(calibration)
        lo, hi, t = calibration_lib.calibrate(xs, reduce_axes, fmt, scaling, calibration)
        stored = scaling_lib.scales_from_range(lo, hi, fmt, scaling, t)
        s = scaling_lib.effective_scale(stored, scaling)
        y = scaling_lib.divide(xs, s, stored.zero, scaling)
        deq = scaling_lib.multiply(fmt.round(y, rounding, key), s, stored.zero, scaling)
        # Clipped STE: gradient 1 where x was representable, 0 where it saturated.
        inside = (y >= fmt.min_value) & (y <= fmt.max_value)
        x_in = jnp.where(inside, xv, xs)
        out = deq + (x_in - jax.lax.stop_gradient(x_in))  # exactly deq forward
    else:
        if scaling.zero_point or scaling.split_sign:
            raise ValueError("fake_quant scale= (LSQ) supports symmetric scalings only.")
        expected = scaling.scale_shape(x.shape)
        if tuple(scale.shape) != expected:
            raise ValueError(
                f"fake_quant scale: expected shape {expected} for x of shape {x.shape} and "
                f"{scaling}, got {tuple(scale.shape)}."
            )
        block = scaling.block_size(x.shape)
        s = _grad_scale(scale.astype(jnp.float32), 1.0 / (block * fmt.max_value) ** 0.5)
        s = scaling_lib.broadcastable(s, view_shape, reduce_axes, False)
        y = jnp.clip(xv / s, fmt.min_value, fmt.max_value)
        out = _round_ste(y, fmt, rounding, key) * s
    return out.reshape(x.shape).astype(x.dtype)


def lsq_init_scale(x: jax.Array, fmt, scaling: scaling_lib.Scaling | None = None) -> jax.Array:
    """LSQ's initial scale ``2 · mean|x| / sqrt(Qp)`` per block: f32 [scale_shape]."""
    fmt, scaling = resolve(fmt, scaling)
    x = check_input(x)
    view_shape, reduce_axes = scaling.block_view(x.shape)
    xv = jnp.abs(x.astype(jnp.float32).reshape(view_shape))
    s = 2 * jnp.mean(xv, axis=reduce_axes) * scaling_lib.reciprocal(fmt.max_value**0.5)
    return jnp.maximum(s, jnp.finfo(jnp.float32).tiny).reshape(scaling.scale_shape(x.shape))
