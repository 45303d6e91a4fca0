"""Quantization maps for optimizer states.

Terminology:
  map:       the sorted values in [-1, 1] (signed) or [0, 1] (unsigned) that the codes of a
             state stand for, before the block's absmax scale (a ``LookupFormat`` grid).
  exponent:  ``k`` in ``10**-k``, the decade a value sits in.
  fraction:  the linear part in [0.1, 1] that multiplies ``10**-k``.
"""

from __future__ import annotations

import numpy as np


def dynamic_map(signed: bool, bits: int = 8) -> np.ndarray:
    """The dynamic-exponent ("dynamic tree") quantization map of 8-bit optimizers.

    A code is read as: a sign bit (signed maps only), a run of ``k`` zero bits giving the
    decade ``10**-k``, an indicator bit 1, and the remaining bits, a linear fraction. With
    ``f`` fraction bits the fraction takes the ``2**f`` midpoints of ``2**f`` equal bins of
    [0.1, 1]. So, for ``k = 0 .. bits - 2``::

        signed:    ±10**-k · mid_j,  f = bits - 2 - k
        unsigned:   10**-k · mid_j,  f = bits - 1 - k   (the sign bit becomes a fraction bit)

    plus the two codes without an indicator bit, which stand for 0 and 1. That is
    ``2 · (2**(bits-1) - 1) + 2`` (signed) or ``(2**bits - 2) + 2`` (unsigned) values: exactly
    ``2**bits``, so nothing is padded or trimmed. (bitsandbytes' ``create_dynamic_map`` pads its
    table with zeros to 256 entries for its CUDA kernels when ``bits < 8``; a ``LookupFormat``
    needs distinct values, so this map keeps only the ``2**bits`` real ones.)

    The signed map is not symmetric: it holds 1 but its most negative value is
    ``-(1 - 0.9 / 2**(bits-1))`` (-0.99297 for 8 bits), so a block whose absmax is a negative
    value rounds it to half a step away, as in bitsandbytes. The smallest nonzero magnitude is
    ``10**-(bits-2)`` times the first midpoint (5.5e-7 signed, 3.25e-7 unsigned for 8 bits).
    For ``bits=8`` this equals bitsandbytes' ``create_dynamic_map(signed)`` (computed here in
    float64, bitsandbytes rounds to float32).

    Args:
      signed: a map for signed data (the first moment) or non-negative data (the second).
      bits: code width, 2 to 8.

    Returns:
      float64 [2**bits], sorted ascending, distinct, containing 0 and 1.

    Example:
      >>> m = dynamic_map(signed=True)
      >>> m.shape, m[0], m[-1]
      ((256,), -0.99296875, 1.0)

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861,
      Sec. 2 (dynamic tree quantization) and Appendix (dynamic quantization, unsigned).
      Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", arXiv:1511.04561.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"dynamic_map bits={bits!r}: expected an integer from 2 to 8.")
    values = [0.0, 1.0]
    for k in range(bits - 1):
        fraction_bits = bits - 2 - k if signed else bits - 1 - k
        edges = np.linspace(0.1, 1.0, 2**fraction_bits + 1)
        mids = 10.0**-k * (edges[:-1] + edges[1:]) / 2
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    out = np.sort(np.asarray(values, np.float64))
    assert out.size == 2**bits and np.all(np.diff(out) > 0), out
    return out


def linear_map(signed: bool, bits: int = 4, power: int = 1) -> np.ndarray:
    """Linear (``power=1``) or power-law maps without a zero, for 4-bit states.

    ::

        unsigned:  ((j + 1) / 2**bits) ** power,                 j = 0 .. 2**bits − 1
        signed:    sign(t_j) · |t_j| ** power,  t_j = −1 + 2j / (2**bits − 1)

    The unsigned linear map is the second-moment map of 4-bit Adam: its smallest value is
    ``1 / 2**bits``, not 0, so no second moment is stored as zero (which would turn its update
    ``m / (sqrt(v) + eps)`` into ``m / eps``, the "zero-point problem"). The signed map with
    ``power=2`` is the "Linear-2" map of 4-bit Shampoo's eigenvector matrices: symmetric, ±1
    included, denser near 0.

    Args:
      signed: a map for [-1, 1] or for (0, 1].
      bits: code width, 2 to 8.
      power: 1 (linear) or a larger integer exponent.

    Returns:
      float64 [2**bits], sorted ascending, distinct, with no 0, ending at 1.

    References:
      Li et al., "Memory Efficient Optimizers with 4-bit States", arXiv:2309.01507, Sec. 4.1.
      Wang et al., "4-bit Shampoo for Memory-Efficient Network Training", arXiv:2405.18144,
      Sec. 3 (linear square quantization).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"linear_map bits={bits!r}: expected an integer from 2 to 8.")
    if isinstance(power, bool) or not isinstance(power, int) or power < 1:
        raise ValueError(f"linear_map power={power!r}: expected a positive integer.")
    j = np.arange(2**bits, dtype=np.float64)
    if signed:
        t = -1.0 + 2.0 * j / (2**bits - 1)
        out = np.sign(t) * np.abs(t) ** power
    else:
        out = ((j + 1) / 2**bits) ** power
    assert np.all(np.diff(out) > 0) and not np.any(out == 0), out
    return out
