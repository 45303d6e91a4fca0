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
