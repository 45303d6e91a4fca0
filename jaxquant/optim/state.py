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

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxquant.numerics import QArray, ScalarQuantizer, Scaling
from jaxquant.numerics import formats as formats_lib
from jaxquant.optim.maps import dynamic_map, linear_map
from pallas_kernels import packing

NORMALIZATIONS = ("block", "rank1")


@struct.dataclass
class QuantizedMoment:
    """A state stored in a few bits: codes on a map, times a normalization.

    Two normalizations (``StateQuantizer.normalization``):

    * ``'block'``: ``q`` is a 1-D QArray of ``ceil(size / block_size) * block_size`` elements
      (the flattened state, zero-padded; at least one block) with ``Scaling(axis=0,
      group_size=block_size)``: one f32 absmax per block. Padding elements are 0, which every
      block map holds or saturates to, so they never raise a block's scale. ``axis_max`` is
      empty.
    * ``'rank1'`` (states of rank >= 2): ``q`` is a QArray of ``shape`` holding ``x / n`` with
      one stored scale of 1, where ``n[i, j, ...] = min(axis_max[0][i], axis_max[1][j], ...)``
      and ``axis_max[d]`` is the max of ``|x|`` over every axis but ``d`` (f32 ``[shape[d]]``).

    Attributes:
      q: the codes (and block scales).
      shape: the state's logical shape.
      axis_max: rank-1 normalization's per-axis maxima, or ``()``.
    """

    q: QArray
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    axis_max: tuple[jax.Array, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def dequantize(self) -> jax.Array:
        """f32 [*shape]."""
        if self.axis_max:
            return self.q.dequantize(jnp.float32) * _rank1_scale(self.axis_max)
        return self.q.dequantize(jnp.float32)[: self.size].reshape(self.shape)


def _rank1_scale(axis_max) -> jax.Array:
    nd = len(axis_max)
    out = None
    for d, m in enumerate(axis_max):
        b = m.reshape((1,) * d + (-1,) + (1,) * (nd - d - 1))
        out = b if out is None else jnp.minimum(out, b)
    return out


@functools.cache
def dynamic_format(signed: bool, bits: int = 8) -> formats_lib.LookupFormat:
    """The dynamic map as a ``LookupFormat`` (label ``dynamic8s`` / ``dynamic8u``)."""
    label = f"dynamic{bits}{'s' if signed else 'u'}"
    return formats_lib.LookupFormat(tuple(dynamic_map(signed, bits)), label=label)


@functools.cache
def linear_format(signed: bool, bits: int = 4, power: int = 1) -> formats_lib.LookupFormat:
    """``maps.linear_map`` as a ``LookupFormat`` (label ``linear4u``, ``linear4s_p2``, ...)."""
    label = f"linear{bits}{'s' if signed else 'u'}" + (f"_p{power}" if power != 1 else "")
    return formats_lib.LookupFormat(tuple(linear_map(signed, bits, power)), label=label)


@dataclasses.dataclass(frozen=True)
class StateQuantizer:
    """How one optimizer state is stored between steps. Frozen and hashable.

    Attributes:
      fmt: the element format: a map as a ``LookupFormat`` (``dynamic_format``,
        ``linear_format``) or a float format (``formats.E4M3``).
      block_size: elements per f32 absmax scale (``'block'``; also rank-1's fallback for
        states of rank < 2).
      normalization: ``'block'`` (block-wise absmax of the flattened state) or ``'rank1'``
        (``min`` of per-axis maxima; "Memory Efficient Optimizers with 4-bit States", Sec. 4.2).
      sign_nudge: move a code whose decoded sign flipped back toward its value's sign
        (bitsandbytes' 8-bit first moment; ``quantize_state`` explains the rule).
    """

    fmt: formats_lib.Format
    block_size: int = 256
    normalization: str = "block"
    sign_nudge: bool = False

    def __post_init__(self):
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"StateQuantizer block_size={b!r}: expected a positive int.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"StateQuantizer normalization={self.normalization!r}: expected one of "
                f"{NORMALIZATIONS}."
            )
        if not isinstance(self.fmt, formats_lib.Format):
            raise ValueError(f"StateQuantizer fmt={self.fmt!r}: expected a numerics Format.")

    def quantize(self, x: jax.Array, key: jax.Array | None = None) -> QuantizedMoment:
        """``x`` (any shape, cast to f32) as a QuantizedMoment.

        Nearest rounding, or with a PRNG ``key`` stochastic rounding between the two
        neighbouring map values (unbiased: ``E[x̂] = x`` within the block's range).
        """
        rounding = "nearest" if key is None else "stochastic"
        x = jnp.asarray(x)
        shape = tuple(x.shape)
        x = x.astype(jnp.float32)
        if self.normalization == "rank1" and x.ndim >= 2:
            a = jnp.abs(x)
            axis_max = tuple(
                jnp.max(a, axis=tuple(j for j in range(x.ndim) if j != d)) for d in range(x.ndim)
            )
            n = _rank1_scale(axis_max)
            y = jnp.where(n > 0, x / jnp.where(n > 0, n, 1.0), 0.0)
            quantizer = ScalarQuantizer(self.fmt, Scaling(), rounding=rounding)
            scale = jnp.ones(Scaling().scale_shape(shape))  # y is normalized already
            q = quantizer.quantize(y, learned={"scale": scale}, key=key)
            return QuantizedMoment(q=q, shape=shape, axis_max=axis_max)
        flat = x.reshape(-1)
        padded = max(1, math.ceil(flat.size / self.block_size)) * self.block_size
        flat = jnp.pad(flat, (0, padded - flat.size))
        scaling = Scaling(axis=0, group_size=self.block_size)
        q = ScalarQuantizer(self.fmt, scaling, rounding=rounding).quantize(flat, key=key)
        # An all-zero block gets scale 0, so it reads back as 0 even on a map without 0 (the
        # quantizer's guard scale of 1 would store 1/16 there: a zero second moment of 0.0625).
        absmax = jnp.max(jnp.abs(flat.reshape(-1, self.block_size)), axis=1)
        scale = jnp.where(absmax.reshape(q.scale.shape) > 0, q.scale, 0)
        q = q.replace(scale=scale.astype(q.scale.dtype))
        if self.sign_nudge:
            q = _sign_nudge(q, flat)
        return QuantizedMoment(q=q, shape=shape)


def dynamic_quantizer(signed: bool, bits: int = 8, block_size: int = 256) -> StateQuantizer:
    """Block-wise dynamic map, with the sign nudge for signed states (bitsandbytes)."""
    return StateQuantizer(dynamic_format(bool(signed), bits), block_size, "block", bool(signed))


def quantize_state(
    x: jax.Array, *, signed: bool, bits: int = 8, block_size: int = 256
) -> QuantizedMoment:
    """Quantizes a state block-wise onto the dynamic map, bitsandbytes-style.

    ``x`` is flattened, zero-padded to whole blocks and quantized by ``numerics.quantize``
    (a ``ScalarQuantizer``):
    per block ``s = max |x|``, ``code = argmin_i |m_i - x / s|`` (nearest map value). An
    unsigned map saturates negative values at 0. (``dynamic_quantizer(signed, bits,
    block_size).quantize(x)``; other maps and normalizations: ``StateQuantizer``.)

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
      A QuantizedMoment: ``ceil(x.size / block_size) * block_size`` codes of ``bits`` bits and
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
    return dynamic_quantizer(signed, bits, block_size).quantize(x)


def _sign_nudge(q: QArray, x: jax.Array) -> QArray:
    codes = packing.unpack(q.codes, q.format.bits, x.size).astype(jnp.int32)
    v = q.format.decode(codes)
    flipped = (x != 0) & (jnp.signbit(v) != jnp.signbit(x))
    # The map is sorted, so one code up is the next larger value: toward positive.
    codes = jnp.where(flipped, codes + jnp.where(x > 0, 1, -1), codes)
    return q.replace(codes=packing.pack(codes.astype(jnp.uint8), q.format.bits))


def dequantize_state(q: QuantizedMoment) -> jax.Array:
    """The f32 state a QuantizedMoment stands for, of its original shape."""
    return q.dequantize()


def state_nbytes(tree) -> int:
    """Exact bytes of every array in an optimizer state (or any pytree).

    QArrays and QuantizedMoments count their packed codes and their scales (padding included),
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
