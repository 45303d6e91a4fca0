"""``quantize`` and ``fake_quant``: the two entry points everything builds on, for any format.

Both take a quantizer (a preset, a ``ScalarQuantizer``, a ``jaxquant.vq.VectorQuantizer``), a
registry name (``'int4_g128'``, ``'e8p2_rht'``) or a bare element format (one scale per
tensor), and call its ``Quantizer`` methods.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from jaxquant.numerics.quantizer import Axis
from jaxquant.numerics.scalar import as_quantizer


def quantize(
    x: jax.Array,
    quantizer,
    *,
    axis: Axis = None,
    hessian: jax.Array | None = None,
    learned: Mapping[str, jax.Array] | None = None,
    key: jax.Array | None = None,
    damp: float = 0.01,
    order=None,
):
    """Quantizes ``x``: round to nearest, or Hessian-aware when given the inputs' Hessian.

    The quantizer decides how: a scalar format rounds each element onto its grid after dividing
    by its block's scale (``QArray``), or runs GPTQ with a Hessian; a vector format encodes
    vectors of weights as codes (``VQArray``), or runs block LDLQ (``jaxquant.vq.havq``).

    Args:
      x: a float array (f32, bf16, f16); NaN/Inf is an error when ``x`` is concrete.
      quantizer: a ``Quantizer`` (``INT4_G128``, ``MXFP4``, ``ScalarQuantizer(...)``,
        ``VectorQuantizer(E8P(2), rotate=True)``), a registry name, or an element ``Format``.
      axis: the axis (or axes) the tensor's matmul contracts, along which scales are shared
        (default: the quantizer's own, axis 0 of a weight ``[in, out]`` for the presets).
      hessian: f32 ``[K, K]``, ``Σ x xᵀ`` of the inputs over the contracted axis of length K:
        minimize ``tr((w − ŵ)ᵀ H (w − ŵ))`` instead of rounding to nearest.
      learned: quantizer parameters trained in QAT (``{'scale': ...}`` for LSQ,
        ``{'codebook': ...}`` for DKM), used instead of calibrating.
      key: PRNG key for stochastic rounding.
      damp, order: the Hessian-aware algorithm's damping and row order (GPTQ: None, 'act',
        'babai' or a permutation; vector formats: None).

    Returns:
      A ``QuantizedTensor`` whose ``dequantize()`` has ``x.shape`` and ``x.dtype``.

    Example:
      >>> q = quantize(w, INT4_G128)           # w: [4096, 1024]
      >>> q.bits_per_weight                    # 4 + 32 / 128 = 4.25
      >>> q = quantize(w, "int3_g64", hessian=h)   # GPTQ
    """
    return as_quantizer(quantizer).quantize(
        x, axis=axis, hessian=hessian, learned=learned, key=key, damp=damp, order=order
    )


def fake_quant(
    x: jax.Array,
    quantizer,
    *,
    axis: Axis = None,
    learned: Mapping[str, jax.Array] | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantize-dequantize ``x`` for training: ``quantize(x, ...).dequantize()`` forward, the
    quantizer's training gradient backward (straight-through with clipping; LSQ's with a learned
    scale; DKM's soft assignment with a learned codebook).

    Args:
      x, quantizer, axis, learned, key: as ``quantize``.

    Returns:
      An array like ``x``.
    """
    return as_quantizer(quantizer).fake_quant(x, axis=axis, learned=learned, key=key)
