"""The one protocol every weight format implements, and the name registry.

A ``Quantizer`` says how a tensor becomes a ``QuantizedTensor``: ``ScalarQuantizer`` (an
element format, its scaling and calibration: ``jaxquant.numerics``) and ``VectorQuantizer``
(a vector format, its scales, codebooks and rotation: ``jaxquant.vq``) both implement it, so
rules, layers, freeze, PTQ, sharding and reports treat them alike. Adding a format is one file:
a ``Quantizer`` subclass (with ``from_name``) and, if it needs one, a ``QuantizedTensor``.

Terminology:
  axis:      the axis (or axes) of a tensor that its matmul contracts, along which scales are
             shared. A Flax kernel ``[in, out]`` contracts axis 0; an activation
             ``[..., features]`` axis -1.
  hessian:   ``H = Σ x xᵀ`` over the inputs a weight multiplies, ``[K, K]`` with K the length of
             its contracted axis. With a Hessian, ``quantize`` minimizes
             ``tr((w − ŵ)ᵀ H (w − ŵ))`` (GPTQ for scalar formats, block LDLQ for vector ones)
             instead of rounding each element to nearest (RTN).
  learned:   quantizer parameters trained in QAT (LSQ's ``'scale'``, DKM's ``'codebook'``), by
             name; ``init_learned`` gives their initial values, and ``quantize``/``fake_quant``
             use them instead of calibrating.
  name:      a short string that ``get_quantizer`` parses back to an equal quantizer
             (``'int4_g128'``, ``'nvfp4'``, ``'e8p2_rht'``, ``'trellis3_t64_rht'``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

Axis = int | tuple[int, ...] | None

# A non-negative float as ``repr`` prints it in a quantizer name (``0.5``, ``99.9``, ``1e-05``).
FLOAT_PATTERN = r"[0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?"

_REGISTRY: list[type[Quantizer]] = []


class Quantizer(abc.ABC):
    """How a tensor is quantized: the protocol of scalar and vector formats.

    Subclasses are frozen dataclasses (hashable: static under jit, usable in rules) and are
    registered by name family when defined (see ``get_quantizer``).
    """

    # What ``quantize(..., hessian=H)`` runs: 'gptq' or 'havq' (reports print it).
    hessian_method: ClassVar[str]

    # The name families this class parses (for error messages).
    FAMILIES: ClassVar[tuple[str, ...]] = ()
    # Whether it can quantize activations (vector formats quantize weights only).
    activations: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "from_name" in cls.__dict__:  # a concrete family: parse its names
            _REGISTRY.append(cls)

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The registry name (``get_quantizer(q.name) == q``)."""

    @classmethod
    @abc.abstractmethod
    def from_name(cls, name: str) -> Quantizer | None:
        """The quantizer ``name`` stands for, None when the name is not of this class's family,
        a ValueError when it is but a part of it is wrong."""

    @abc.abstractmethod
    def quantize(
        self,
        x: jax.Array,
        *,
        axis: Axis = None,
        hessian: jax.Array | None = None,
        learned: Mapping[str, jax.Array] | None = None,
        key: jax.Array | None = None,
        damp: float = 0.01,
        order: Any = None,
    ):
        """``x`` as a ``QuantizedTensor`` (see ``jaxquant.numerics.quantize``)."""

    @abc.abstractmethod
    def fake_quant(
        self,
        x: jax.Array,
        *,
        axis: Axis = None,
        learned: Mapping[str, jax.Array] | None = None,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Quantize-dequantize ``x`` with this quantizer's training gradient (QAT)."""

    @property
    def learned_names(self) -> tuple[str, ...]:
        """The names of the parameters QAT learns (the keys of ``init_learned``)."""
        return ()

    @property
    def needs_key(self) -> bool:
        """Whether ``quantize``/``fake_quant`` need a PRNG ``key`` (stochastic rounding)."""
        return False

    def init_learned(self, x: jax.Array, *, axis: Axis = None) -> dict[str, jax.Array]:
        """Initial values of the parameters QAT learns for ``x`` (none by default)."""
        del x, axis
        return {}

    @abc.abstractmethod
    def with_group_size(self, group_size: int | None) -> Quantizer:
        """The same quantizer with one scale per ``group_size`` elements along the contracted
        axis (None: per channel)."""

    def check_shape(self, shape: tuple[int, ...], axis: Axis = None) -> None:
        """Raises ValueError when a tensor of ``shape`` contracted over ``axis`` cannot take
        this quantizer (checked before tracing, so errors name the shape, not XLA)."""
        del shape, axis

    def bits_per_weight(self, shape: tuple[int, ...], *, axis: Axis = None) -> float:
        """Exact bits per element of a tensor of ``shape`` quantized this way: every stored
        array (codes, scales, zero points, codebooks, rotation signs) counted."""
        shape = tuple(shape)
        self.check_shape(shape, axis)
        q = jax.eval_shape(lambda x: self.quantize(x, axis=axis), jnp.zeros(shape, jnp.float32))
        nbytes = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(q))
        return 8 * nbytes / math.prod(shape)

    def __str__(self) -> str:
        return self.name


def get_quantizer(name: str) -> Quantizer:
    """The quantizer a registry name stands for.

    Names are a family followed by ``_``-separated options, each printed only when it differs
    from the family's default: scalar families ``int2``..``int8``, ``fp4``, ``fp8_e4m3``,
    ``fp8_e5m2``, ``mxfp4``, ``mxfp6``, ``mxfp6_e3m2``, ``mxfp8``, ``mxfp8_e5m2``, ``nvfp4``,
    ``nf4`` (options ``g<N>``, ``channel``, ``tensor``, ``asym``, ``afpq``, ``mse``, ``p<pct>``,
    ``lsq``, ...); vector families ``kmeans_d<d>_b<bits>``, ``e8p<bits>``,
    ``pvq_n<n>_k<K>_b<bits>``, ``trellis<bits>_t<T>`` (options ``rht``, ``g<N>``, ``cb<G>``,
    ``dkm``, ...). Case-insensitive.

    Example:
      >>> get_quantizer("int4_g64")        # INT4_G128.with_group_size(64)
      >>> get_quantizer("e8p2_rht")        # VectorQuantizer(E8P(2), rotate=True)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"quantizer name={name!r}: expected a non-empty string.")
    for cls in _REGISTRY:
        q = cls.from_name(name.lower())
        if q is not None:
            return q
    families = sorted({f for cls in _REGISTRY for f in getattr(cls, "FAMILIES", ())})
    raise ValueError(f"quantizer name {name!r}: no family matches; known families: {families}.")
