"""QDense, QDenseGeneral, QEinsum, QEmbed: Flax Linen layers with a quantization config.

Each subclasses the Linen layer of the same name, so arguments, param names, shapes and
initializers are the same (a float checkpoint loads as is), and adds two fields:

  quant: a ``QuantConfig`` (mode and rules; None is float);
  role:  ``'linear'``, or ``'head'`` for an output projection (rules skip heads and
         embeddings unless they name those roles).

The computation is written once, as functions of a module (``dense_general``, ``einsum``), so
``intercept`` runs the same code for plain ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

from jaxquant.nn import ops
from jaxquant.nn.rules import QuantConfig, layer_path
from jaxquant.numerics import QuantizedTensor

_FLOAT = QuantConfig()


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _promote(module, inputs, kernel, bias):
    """Flax's dtype promotion, with a quantized kernel passed through (dequantized later)."""
    if isinstance(kernel, QuantizedTensor):
        inputs, bias = module.promote_dtype(inputs, bias, dtype=module.dtype)
        return inputs, kernel, bias
    return module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)


def _base_dot_general(module):
    if getattr(module, "dot_general_cls", None) is not None:
        return module.dot_general_cls()
    return getattr(module, "dot_general", None)


def dense_general(module, inputs, config: QuantConfig, role: str = "linear"):
    """``nn.DenseGeneral.__call__`` (and ``nn.Dense``'s) with quantization per ``config``."""
    features = _tuple(module.features)
    axis = _tuple(getattr(module, "axis", -1))
    batch_dims = _tuple(getattr(module, "batch_dims", ()))
    if batch_dims and set(batch_dims) != set(range(max(batch_dims) + 1)):
        raise ValueError(f"batch_dims {batch_dims} must be consecutive leading dimensions.")
    ndim = inputs.ndim
    axis = tuple(sorted(a % ndim for a in axis))
    batch_dims = tuple(sorted(a % ndim for a in batch_dims))
    n_batch, n_axis, n_features = len(batch_dims), len(axis), len(features)

    def kernel_init_wrap(rng, shape, dtype=jnp.float32):
        # As Flax: initialize the kernel as a 2-D matrix, so fan-in/fan-out are the same.
        flat = (
            int(np.prod(shape[:n_batch]) * np.prod(shape[n_batch : n_batch + n_axis])),
            int(np.prod(shape[-n_features:])),
        )
        kernel = module.kernel_init(rng, flat, dtype)
        if isinstance(kernel, meta.AxisMetadata):
            return meta.replace_boxed(kernel, jnp.reshape(kernel.unbox(), shape))
        return jnp.reshape(kernel, shape)

    batch_shape = tuple(inputs.shape[a] for a in batch_dims)
    kernel_shape = batch_shape + tuple(inputs.shape[a] for a in axis) + features
    contract_ind = tuple(range(n_batch, n_batch + n_axis))
    rule = config.match(layer_path(module), role)
    kernel = ops.layer_weight(
        module,
        "kernel",
        kernel_init_wrap,
        kernel_shape,
        module.param_dtype,
        contract_ind,
        config,
        rule,
    )
    # A QArray frozen in its merged view [K, *features] is served as is (the kernel reads it)
    # when the input's contracted axes are trailing: they merge into K by a free reshape.
    merged = (
        isinstance(kernel, QuantizedTensor)
        and tuple(kernel.shape) != kernel_shape
        and not n_batch
        and axis == tuple(range(ndim - n_axis, ndim))
        and (rule is None or rule.act is None)
    )
    if not merged:
        kernel = ops.as_kernel(kernel, kernel_shape)
    bias = None
    if module.use_bias:

        def bias_init_wrap(rng, shape, dtype=jnp.float32):
            flat = (int(np.prod(shape[:n_batch]) * np.prod(shape[-n_features:])),)
            bias = module.bias_init(rng, flat, dtype)
            if isinstance(bias, meta.AxisMetadata):
                return meta.replace_boxed(bias, jnp.reshape(bias.unbox(), shape))
            return jnp.reshape(bias, shape)

        bias = module.param("bias", bias_init_wrap, batch_shape + features, module.param_dtype)
    inputs, kernel, bias = _promote(module, inputs, kernel, bias)
    dot_general = ops.quant_dot_general(module, config, rule, _base_dot_general(module))
    if merged:
        x = inputs.reshape(inputs.shape[: ndim - n_axis] + (-1,))
        out = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
    else:
        out = dot_general(
            inputs,
            kernel,
            ((axis, contract_ind), (batch_dims, tuple(range(n_batch)))),
            precision=module.precision,
        )
    if bias is not None:
        expanded = tuple(
            inputs.shape[a] if a in batch_dims else 1 for a in range(ndim) if a not in axis
        )
        out = out + jnp.reshape(bias, expanded + features)
    return out


def einsum_contracting(einsum_str: str) -> tuple[int, ...]:
    """The kernel axes an ``'lhs,rhs->out'`` einsum sums over (in rhs and lhs, not in out)."""
    lhs, rest = einsum_str.split(",")
    rhs, out = rest.split("->")
    if "." in rhs:
        raise ValueError(f"einsum_str={einsum_str!r}: ellipsis in the kernel is not supported.")
    return tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)


def _matmul_einsum(einsum_str: str) -> int:
    """``len(C)`` when ``einsum_str`` is ``'AC,CF->AF'`` (the kernel's leading axes are the
    contracted ones, in the input's trailing order, and nothing else is shared), else 0."""
    lhs, rest = einsum_str.split(",")
    rhs, out = rest.split("->")
    c = "".join(ch for ch in rhs if ch in lhs and ch not in out)
    if not c or "." in einsum_str or not rhs.startswith(c) or not lhs.endswith(c):
        return 0
    a, f = lhs[: -len(c)], rhs[len(c) :]
    if out != a + f or set(a) & set(f):
        return 0
    return len(c)


def einsum(module, inputs, einsum_str, config: QuantConfig, role: str = "linear"):
    """``nn.Einsum.__call__`` with quantization per ``config``."""
    einsum_str = nn.module.merge_param("einsum_str", module.einsum_str, einsum_str)
    einsum_str = einsum_str.replace(" ", "")
    if "->" not in einsum_str:
        raise ValueError('`einsum_str` equation must be explicit and include "->".')
    if einsum_str.count(",") != 1:
        raise ValueError(
            "`einsum_str` equation must have exactly two operands and therefore, exactly one "
            f"comma character, instead of {einsum_str.count(',')}"
        )
    rule = config.match(layer_path(module), role)
    kernel = ops.layer_weight(
        module,
        "kernel",
        module.kernel_init,
        tuple(module.shape),
        module.param_dtype,
        einsum_contracting(einsum_str),
        config,
        rule,
    )
    n_contract = _matmul_einsum(einsum_str)
    served = (
        isinstance(kernel, QuantizedTensor) and n_contract and (rule is None or rule.act is None)
    )
    if isinstance(kernel, QuantizedTensor) and not served:  # jnp.einsum takes arrays: dequantize
        kernel = kernel.dequantize(module.param_dtype).reshape(tuple(module.shape))
    bias = None
    if module.use_bias:
        kernel_like = jax.ShapeDtypeStruct(tuple(module.shape), module.param_dtype)
        bias_shape, broadcast_shape = nn.Einsum._get_bias_shape(
            module, einsum_str, inputs, kernel_like
        )
        bias = module.param("bias", module.bias_init, bias_shape, module.param_dtype)
    if served:  # x [..., C] @ w [C, F]: the kernel (or dequantize-then-matmul) via dot_general
        inputs, _, bias = _promote(module, inputs, kernel, bias)
        x = inputs.reshape(inputs.shape[: inputs.ndim - n_contract] + (-1,))
        y = ops.quant_dot_general(module, config, rule)(
            x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision
        )
        y = y.reshape(inputs.shape[: inputs.ndim - n_contract] + tuple(module.shape[n_contract:]))
        return y if bias is None else y + jnp.reshape(bias, broadcast_shape)
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    y = jnp.einsum(
        einsum_str,
        inputs,
        kernel,
        precision=module.precision,
        preferred_element_type=module.preferred_element_type,
        _dot_general=ops.quant_dot_general(module, config, rule),
    )
    if bias is not None:
        y = y + jnp.reshape(bias, broadcast_shape)
    return y


class QDenseGeneral(nn.DenseGeneral):
    """``nn.DenseGeneral`` with a quantization config (see the module docstring)."""

    quant: QuantConfig | None = None
    role: str = "linear"

    @nn.compact
    def __call__(self, inputs):
        return dense_general(self, inputs, self.quant or _FLOAT, self.role)


class QDense(nn.Dense):
    """``nn.Dense`` with a quantization config (see the module docstring)."""

    quant: QuantConfig | None = None
    role: str = "linear"

    @nn.compact
    def __call__(self, inputs):
        return dense_general(self, inputs, self.quant or _FLOAT, self.role)


class QEinsum(nn.Einsum):
    """``nn.Einsum`` with a quantization config (see the module docstring)."""

    quant: QuantConfig | None = None
    role: str = "linear"

    @nn.compact
    def __call__(self, inputs, einsum_str: str | None = None):
        return einsum(self, inputs, einsum_str, self.quant or _FLOAT, self.role)


class QEmbed(nn.Embed):
    """``nn.Embed`` with a quantization config; its role is ``'embedding'``.

    The table is quantized with scales shared along the feature axis (one scale, or one per
    group, per row), which serves both the lookup and ``attend`` (a tied output head).
    """

    quant: QuantConfig | None = None

    def setup(self):
        config = self.quant or _FLOAT
        rule = config.match(layer_path(self), "embedding")
        self.embedding = ops.layer_weight(
            self,
            "embedding",
            self.embedding_init,
            (self.num_embeddings, self.features),
            self.param_dtype,
            (1,),
            config,
            rule,
        )

    def _table(self):
        table = self.embedding
        if isinstance(table, QuantizedTensor):
            table = table.dequantize(self.param_dtype)
        return table

    def __call__(self, inputs):
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (table,) = self.promote_dtype(self._table(), dtype=self.dtype, inexact=False)
        if self.num_embeddings == 1:
            return jnp.broadcast_to(table, inputs.shape + (self.features,))
        return jnp.take(table, inputs, axis=0)

    def attend(self, query):
        query, table = self.promote_dtype(query, self._table(), dtype=self.dtype)
        return jnp.dot(query, table.T)
