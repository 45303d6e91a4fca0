"""QuantizedTensor, the interface of every quantized weight, and QArray, the scalar one.

Terminology:
  codes:  the elements' codes, packed densely along the last axis (``pallas_kernels.packing``).
  scale:  stored per-block scales (see ``scaling``): the rank of the array, 1 on shared axes,
          ``n // group_size`` on a group axis; with split-sign scales a leading axis of 2
          holds (negative, positive).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.numerics import formats as formats_lib
from jaxquant.numerics import scaling as scaling_lib
from jaxquant.numerics.kernel_options import current_kernel_options
from pallas_kernels import packing
from pallas_kernels.quantized_matmul import quantized_matmul


class QuantizedTensor(abc.ABC):
    """The interface of every quantized weight: ``QArray`` (scalar codes) and
    ``jaxquant.vq.VQArray`` (vector codes). Layers, ``freeze``, PTQ, partitioning and reports
    use only this interface, never the concrete type.

    Subclasses are pytrees (arrays are leaves, the layout is static) with ``shape``, ``dtype``,
    ``format`` (the element or vector format) and:

    * ``dequantize(dtype=None)``: the array the codes stand for;
    * ``dot_general(lhs, dimension_numbers, precision=None, preferred_element_type=None)``:
      ``lax.dot_general(lhs, self.dequantize(), ...)``, through a Pallas kernel that reads the
      codes where one applies (the serving path); ``x @ q`` is its matmul;
    * ``shardings(weight_sharding)``: the ``NamedSharding`` of each stored array, given the
      float weight's;
    * ``nbytes`` / ``bits_per_weight``: every stored array counted exactly.
    """

    shape: tuple[int, ...]
    dtype: Any

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

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading axes of a tensor made under ``vmap`` (every leaf carries them)."""
        return ()

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / number of elements``: every overhead counted, padding included."""
        return 8 * self.nbytes / (self.size * math.prod(self.batch_shape))

    @abc.abstractmethod
    def dequantize(self, dtype=None) -> jax.Array:
        """The array the codes stand for, in ``dtype`` (default ``self.dtype``)."""

    def __rmatmul__(self, lhs) -> jax.Array:
        """``lhs @ self`` for ``lhs [..., K]`` and this tensor ``[K, ...]``: ``dot_general``
        over ``lhs``'s last axis and this tensor's first (the kernel path when one applies)."""
        lhs = jnp.asarray(lhs)
        return self.dot_general(lhs, (((lhs.ndim - 1,), (0,)), ((), ())))

    @abc.abstractmethod
    def dot_general(self, lhs, dimension_numbers, precision=None, preferred_element_type=None):
        """``lax.dot_general(lhs, self.dequantize(lhs.dtype), dimension_numbers, ...)``."""

    @abc.abstractmethod
    def shardings(self, weight_sharding: NamedSharding):
        """This tensor with a ``NamedSharding`` in place of each stored array."""


def is_quantized(x) -> bool:
    """Whether ``x`` is a ``QuantizedTensor`` (for ``is_leaf=`` in tree maps that should stop
    at quantized tensors)."""
    return isinstance(x, QuantizedTensor)


def dequantized_dot_general(
    lhs, q: QuantizedTensor, dimension_numbers, precision=None, preferred_element_type=None
):
    """``lax.dot_general`` with ``q`` dequantized to ``lhs``'s dtype: every quantized tensor's
    fallback when no kernel reads it."""
    return lax.dot_general(
        lhs,
        q.dequantize(lhs.dtype),
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def is_plain_matmul(lhs, dimension_numbers) -> bool:
    """``lhs [..., K] @ w [K, ...]``: one contraction (lhs's last axis with w's first), no batch
    axes: what the matmul kernels compute."""
    (lc, rc), (lb, rb) = dimension_numbers
    return not lb and not rb and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)


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
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[: self.codes.ndim - len(self.shape)])

    def dequantize(self, dtype=None) -> jax.Array:
        """The array the codes stand for, in ``dtype`` (default ``self.dtype``)."""
        if self.batch_shape:
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

    def dot_general(self, lhs, dimension_numbers, precision=None, preferred_element_type=None):
        """``lax.dot_general(lhs, self.dequantize(lhs.dtype), dimension_numbers, ...)``.

        A plain ``lhs [..., K] @ self [K, ...]`` (``is_plain_matmul``) of a float32/bfloat16
        ``lhs`` goes to ``pallas_kernels.quantized_matmul`` on the packed codes when
        ``kernel_unsupported_reason`` is None and ``kernel_options(enabled=True)`` (the
        default): the TPU/GPU kernel on those backends, its reference on CPU. Anything else is
        dequantized to ``lhs.dtype``, then multiplied.
        """
        options = current_kernel_options()
        args = None
        if (
            options.enabled
            and lhs.dtype in (jnp.float32, jnp.bfloat16)
            and is_plain_matmul(lhs, dimension_numbers)
        ):
            args = self.kernel_args()
        if args is None:
            return dequantized_dot_general(
                lhs, self, dimension_numbers, precision, preferred_element_type
            )
        out_dtype = lhs.dtype if preferred_element_type is None else preferred_element_type
        y = quantized_matmul(
            lhs.reshape(-1, lhs.shape[-1]),
            **args,
            out_dtype=out_dtype,
            implementation=options.implementation,
            interpret=options.interpret,
        )
        return y.reshape(lhs.shape[:-1] + tuple(self.shape[1:]))

    def kernel_unsupported_reason(self) -> str | None:
        """Why ``quantized_matmul`` cannot read this QArray (a weight ``[K, *features]``
        contracted over axis 0) as stored, or None when it can.

        The kernel reads int/uint 2, 4 or 8 bits (uint with a zero point), E2M1 (MXFP4, NVFP4),
        E4M3 and 2/4/8-bit lookup formats (NF4), with one scale per tensor, per output channel
        or per group of inputs, in any stored scale dtype; not 3/5/6/7-bit codes,
        E5M2/E3M2/E2M3, split-sign scales, scales along an output axis, nor views whose last
        axis does not fill whole bytes.
        """
        s, fmt = self.scaling, self.format
        kind = _kernel_format(fmt)
        if kind is None:
            return f"format {fmt.name}"
        if fmt.bits not in (2, 4, 8):
            return f"{fmt.bits}-bit codes"
        if kind == "uint" and not s.zero_point:
            return "unsigned codes without a zero point"
        if s.split_sign:
            return "split-sign scales"
        if self.ndim < 2 or self.codes.ndim != self.ndim:
            return f"a QArray of shape {self.shape} (batched or not a matrix)"
        if s.axis is not None and s.axes(self.ndim) != (0,):
            return f"scales along axes {s.axes(self.ndim)}, not the contracted axis 0"
        if self.ndim > 2 and (self.shape[-1] * fmt.bits) % 8:
            return f"rows of {self.shape[-1]} {fmt.bits}-bit codes do not fill whole bytes"
        return None

    def kernel_args(self) -> dict | None:
        """The arguments of ``quantized_matmul`` that read this QArray as ``[K, N]`` (N: the
        product of its other axes), or None (``kernel_unsupported_reason``). Reshapes only."""
        if self.kernel_unsupported_reason() is not None:
            return None
        k, n = self.shape[0], math.prod(self.shape[1:])
        s = self.scaling
        codes = self.codes.reshape(k, packing.packed_length(n, self.format.bits))
        if s.axis is None:  # one scale for the tensor: one per column, all equal
            scales = jnp.broadcast_to(self.scale.reshape(1, 1), (1, n))
            zeros = None if self.zero is None else jnp.broadcast_to(self.zero.reshape(1, 1), (1, n))
        else:
            scales = self.scale.reshape(-1, n)
            zeros = None if self.zero is None else self.zero.reshape(-1, n)
        kind = _kernel_format(self.format)
        return dict(
            codes=codes,
            scales=scales,
            zeros=zeros,
            bits=self.format.bits,
            group_size=s.group_size,
            fmt=kind,
            scale_dtype=s.scale_dtype,
            tensor_scale=self.tensor_scale,
            lut=jnp.asarray(self.format.values, jnp.float32) if kind == "lut" else None,
        )

    def shardings(self, weight_sharding: NamedSharding) -> QArray:
        """The sharding of each array of this QArray, given the sharding of the float weight
        ``[*shape]`` it stores.

        Each leaf keeps the weight's mesh axes on a dimension where the shard boundaries fall
        at the same elements of the weight, and is replicated there otherwise:

        * codes: the weight's spec, except the packed last axis of ``n`` codes of ``b`` bits,
          sharded over ``k`` devices only when every shard is whole bytes of whole codes
          (``n % k == 0``, ``(n // k) * b % 8 == 0``, no padding);
        * scale, zero: the weight's spec on dimensions of the weight's length that ``k``
          divides, and on the group dimension (``n // group_size`` scales) when ``k`` divides
          the number of groups; replicated on shared dimensions (length 1). A leading
          split-sign axis of 2 is replicated;
        * tensor_scale: replicated.

        Works on concrete and abstract (``jax.eval_shape``) QArrays; returns a QArray with the
        same static fields whose leaves are ``NamedSharding``s, for ``jax.device_put`` or
        ``jax.jit(..., out_shardings=...)``.
        """
        mesh = weight_sharding.mesh
        ndim = len(self.shape)
        spec = list(weight_sharding.spec) + [None] * (ndim - len(weight_sharding.spec))
        if len(spec) != ndim:
            raise ValueError(
                f"QArray.shardings weight_sharding: spec {weight_sharding.spec} has more "
                f"dimensions than the QArray's shape {self.shape}."
            )

        def leaf_sharding(leaf, codes: bool):
            # Dimensions align at the end; leading extras (vmap batch, split sign) replicate.
            dims = tuple(leaf.shape)
            lead = len(dims) - ndim
            out = [None] * len(dims)
            for d, entry in enumerate(spec):
                if entry is None or lead + d < 0:
                    continue
                n, m, k = self.shape[d], dims[lead + d], mesh_axis_size(mesh, entry)
                if codes and d == ndim - 1:
                    bits = self.format.bits
                    keep = n % k == 0 and (n // k) * bits % 8 == 0 and m * 8 == n * bits
                else:
                    # m == n: a full dimension; m == n // group_size: whole groups per shard.
                    keep = m > 1 and n % m == 0 and m % k == 0
                if keep:
                    out[lead + d] = entry
            return NamedSharding(mesh, P(*out))

        replicated = NamedSharding(mesh, P())
        return self.replace(
            codes=leaf_sharding(self.codes, codes=True),
            scale=leaf_sharding(self.scale, codes=False),
            zero=None if self.zero is None else leaf_sharding(self.zero, codes=False),
            tensor_scale=None if self.tensor_scale is None else replicated,
        )


def mesh_axis_size(mesh, entry) -> int:
    """Devices along a PartitionSpec entry (a mesh axis name, a tuple of them, or None)."""
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def _kernel_format(fmt) -> str | None:
    if isinstance(fmt, formats_lib.IntFormat):
        return "int" if fmt.signed else "uint"
    if isinstance(fmt, formats_lib.LookupFormat):
        return "lut"
    if isinstance(fmt, formats_lib.FloatFormat):
        return {"e2m1": "e2m1", "e4m3fn": "e4m3"}.get(fmt.name)
    return None


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
