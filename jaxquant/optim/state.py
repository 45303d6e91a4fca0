"""Optimizer states stored in a few bits between steps, and their exact memory.

Terminology:
  state:       one moment of one parameter (Adam's ``mu`` or ``nu``), any shape.
  block:       ``block_size`` consecutive elements of the flattened, zero-padded state; each
               has one f32 absmax scale.
  map:         the dynamic map (``maps.dynamic_map``), held as a ``LookupFormat``.
  sign nudge:  moving a signed state's code one step back toward its value's sign.

Dequantization (``m`` the map, ``s`` the block's absmax)::

    x ≈ m[code] · s
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxquant.numerics import formats as formats_lib
from jaxquant.numerics.qarray import QArray, quantize
from jaxquant.numerics.scaling import Scaling
from jaxquant.optim.maps import dynamic_map
from pallas_kernels import packing


@struct.dataclass
class QuantizedState:
    """A state quantized block-wise onto the dynamic map.

    Invariants: ``q`` is a 1-D QArray of ``ceil(size / block_size) * block_size`` elements (the
    flattened state, zero-padded; at least one block) with a ``LookupFormat`` of the dynamic map
    and ``Scaling(axis=0, group_size=block_size)``; ``shape`` is the state's shape. Padding
    elements are 0, which the map represents exactly, so they never raise a block's scale.

    Attributes:
      q: the quantized, flattened, padded state.
      shape: the state's logical shape.
    """

    q: QArray
    shape: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def dequantize(self) -> jax.Array:
        """f32 [*shape]."""
        return self.q.dequantize(jnp.float32)[: self.size].reshape(self.shape)


def is_quantized_state(x) -> bool:
    """For ``is_leaf=`` in tree maps that should stop at QuantizedStates."""
    return isinstance(x, QuantizedState)


@functools.cache
def dynamic_format(signed: bool, bits: int = 8) -> formats_lib.LookupFormat:
    """The dynamic map as a ``LookupFormat`` (label ``dynamic8s`` / ``dynamic8u``)."""
    label = f"dynamic{bits}{'s' if signed else 'u'}"
    return formats_lib.LookupFormat(tuple(dynamic_map(signed, bits)), label=label)


def quantize_state(
    x: jax.Array, *, signed: bool, bits: int = 8, block_size: int = 256
) -> QuantizedState:
    """Quantizes a state block-wise onto the dynamic map, bitsandbytes-style.

    ``x`` is flattened, zero-padded to whole blocks and quantized by ``numerics.quantize``:
    per block ``s = max |x|``, ``code = argmin_i |m_i - x / s|`` (nearest map value). An
    unsigned map saturates negative values at 0.

    Signed states get the sign nudge: where a nonzero value's code decodes to a value of the
    other sign bit, the code moves one step toward the value's sign. As in bitsandbytes'
    8-bit optimizer kernels the comparison is of sign bits, so +0 counts as positive: with
    nearest rounding (the map holds 0, so no value can round past it) the nudge acts only on
    negative values that rounded to 0, which become the smallest negative map value
    (``-5.5e-7 · s`` for 8 bits), while positive ones that rounded to 0 stay 0.

    Args:
      x: a float array of any shape (the state), cast to f32.
      signed: the signed map and the sign nudge (first moment) or the unsigned map (second).
      bits: code width of the map, 2 to 8.
      block_size: elements per absmax scale.

    Returns:
      A QuantizedState: ``ceil(x.size / block_size) * block_size`` codes of ``bits`` bits and
      as many f32 scales as blocks.

    Example:
      >>> q = quantize_state(mu, signed=True)      # mu: [1024, 1024] f32
      >>> state_nbytes(q) / mu.size                # 1 + 4 / 256 = 1.016

    References:
      Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861,
      Sec. 2.1 (block-wise quantization) and 2.2 (dynamic quantization).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"quantize_state block_size={block_size!r}: expected a positive int.")
    x = jnp.asarray(x)
    shape = tuple(x.shape)
    flat = x.astype(jnp.float32).reshape(-1)
    padded = max(1, math.ceil(flat.size / block_size)) * block_size
    flat = jnp.pad(flat, (0, padded - flat.size))
    fmt = dynamic_format(bool(signed), bits)
    q = quantize(flat, fmt, Scaling(axis=0, group_size=block_size))
    if signed:
        q = _sign_nudge(q, flat)
    return QuantizedState(q=q, shape=shape)


def _sign_nudge(q: QArray, x: jax.Array) -> QArray:
    codes = packing.unpack(q.codes, q.format.bits, x.size).astype(jnp.int32)
    v = q.format.decode(codes)
    flipped = (x != 0) & (jnp.signbit(v) != jnp.signbit(x))
    # The map is sorted, so one code up is the next larger value: toward positive.
    codes = jnp.where(flipped, codes + jnp.where(x > 0, 1, -1), codes)
    return q.replace(codes=packing.pack(codes.astype(jnp.uint8), q.format.bits))


def dequantize_state(q: QuantizedState) -> jax.Array:
    """The f32 state a QuantizedState stands for, of its original shape."""
    return q.dequantize()


def state_nbytes(tree) -> int:
    """Exact bytes of every array in an optimizer state (or any pytree).

    QArrays and QuantizedStates count their packed codes and their scales (padding included),
    float and integer arrays ``size * itemsize`` (the step ``count`` too). Works on concrete
    arrays and on ``jax.eval_shape`` results.
    """
    return sum(_size(leaf) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def _size(leaf) -> int:
    return math.prod(leaf.shape)  # arrays and ShapeDtypeStructs alike


def bytes_per_param(state, params) -> float:
    """``state_nbytes(state)`` divided by the number of parameter elements."""
    n = sum(_size(p) for p in jax.tree.leaves(params))
    if n == 0:
        raise ValueError("bytes_per_param params: expected at least one parameter element.")
    return state_nbytes(state) / n
