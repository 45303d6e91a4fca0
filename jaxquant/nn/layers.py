"""QDense, QDenseGeneral, QEinsum, QConv, QEmbed: Flax Linen layers with a quantization config.

Each subclasses the Linen layer of the same name, so arguments, param names, shapes and
initializers are Flax's own (a float checkpoint loads as is), and adds two fields:

  quant: a ``QuantConfig`` (mode and rules; None is float);
  role:  ``'linear'``, or ``'head'`` for an output projection (rules skip heads and
         embeddings unless they name those roles).

Flax's own ``__call__`` runs in float and calibrate modes and creates every param at
initialization. The one override, ``QuantizedLayer.__call__``, hands quantized modes to
``ops.quantized_call`` with the layer's ``Contraction``: which weight it multiplies with its
input, along which axes, and how (``dense_contraction``, ``einsum_contraction``,
``conv_contraction``). The same
contractions serve plain ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum``/``nn.Conv`` layers
under ``intercept`` (``contraction_of``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

from jaxquant.nn import ops
from jaxquant.nn.rules import QuantConfig
from jaxquant.numerics import is_quantized


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _bias(module):
    if not module.use_bias:
        return None
    return nn.unbox(module.get_variable("params", "bias"))


def _promote(module, x, w, bias):
    """Flax's dtype promotion; a frozen weight passes through (dequantized by its matmul)."""
    if is_quantized(w):
        x, bias = module.promote_dtype(x, bias, dtype=module.dtype)
        return x, w, bias
    return module.promote_dtype(x, w, bias, dtype=module.dtype)


def served_dot_general(x, q, dims, kernel_shape, precision=None, preferred_element_type=None):
    """``x`` contracted with a frozen weight ``q`` as ``lax.dot_general(x, kernel, dims)``.

    ``q`` has the kernel's shape, or its merged view ``[K, *rest]`` (``ops.weight_view``): then
    when ``x``'s contracted axes are its trailing ones, in the kernel's order, and there are no
    batch axes, they merge into K by a free reshape and ``q.dot_general`` reads the codes (a
    Pallas kernel); otherwise ``q`` is dequantized to the kernel's shape first.
    """
    (lc, rc), (lb, _) = dims
    if tuple(q.shape) == tuple(kernel_shape):
        return q.dot_general(x, dims, precision, preferred_element_type)
    n = len(lc)
    if not lb and tuple(lc) == tuple(range(x.ndim - n, x.ndim)) and tuple(rc) == tuple(range(n)):
        x2 = x.reshape(x.shape[: x.ndim - n] + (-1,))
        y = q.dot_general(x2, (((x2.ndim - 1,), (0,)), ((), ())), precision, preferred_element_type)
        return y.reshape(x.shape[: x.ndim - n] + tuple(kernel_shape[n:]))
    w = q.dequantize(x.dtype).reshape(kernel_shape)
    return lax.dot_general(
        x, w, dims, precision=precision, preferred_element_type=preferred_element_type
    )


@jax.custom_vjp
def matmul_2d(x2: jax.Array, w2: jax.Array) -> jax.Array:
    """``x2 [M, K] @ w2 [K, N]``, with its backward written on the 2-D views.

    The values of ``lax.dot_general`` and its gradients (up to summation order); but the
    automatic weight gradient of a matmul over leading batch axes transposes a copy of the
    output gradient first, which ``x2ᵀ @ g`` on the 2-D view does not (on XLA:CPU that copy
    was most of QAT's step-time overhead over float: BENCHMARKS.md, "Training throughput").
    """
    return lax.dot_general(x2, w2, (((1,), (0,)), ((), ())))


def _matmul_2d_fwd(x2, w2):
    return matmul_2d(x2, w2), (x2, w2)


def _matmul_2d_bwd(res, g):
    x2, w2 = res
    dx = lax.dot_general(g, w2, (((1,), (1,)), ((), ())))  # g @ w2ᵀ
    dw = lax.dot_general(x2, g, (((0,), (0,)), ((), ())))  # x2ᵀ @ g
    return dx.astype(x2.dtype), dw.astype(w2.dtype)


matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def _is_plain(ndim: int, dims) -> bool:
    """The input's trailing axes contracted, in order, with the kernel's leading ones, no batch
    axes: a 2-D matmul after free reshapes."""
    (lc, rc), (lb, _) = dims
    n = len(lc)
    return not lb and tuple(lc) == tuple(range(ndim - n, ndim)) and tuple(rc) == tuple(range(n))


def dense_contraction(module, args, kwargs) -> ops.Contraction:
    """The matmul of ``nn.Dense`` and ``nn.DenseGeneral`` (axes, batch dims and bias as Flax
    defines them)."""
    (inputs,) = args
    if kwargs:
        raise TypeError(f"{type(module).__name__}: unexpected keyword arguments {sorted(kwargs)}.")
    ndim = inputs.ndim
    features = _tuple(module.features)
    axis = tuple(sorted(a % ndim for a in _tuple(getattr(module, "axis", -1))))
    batch_dims = tuple(sorted(a % ndim for a in _tuple(getattr(module, "batch_dims", ()))))
    if batch_dims and set(batch_dims) != set(range(max(batch_dims) + 1)):
        raise ValueError(f"batch_dims {batch_dims} must be consecutive leading dimensions.")
    n_batch = len(batch_dims)
    batch_shape = tuple(inputs.shape[a] for a in batch_dims)
    kernel_shape = batch_shape + tuple(inputs.shape[a] for a in axis) + features
    contract_ind = tuple(range(n_batch, n_batch + len(axis)))
    dims = ((axis, contract_ind), (batch_dims, tuple(range(n_batch))))
    # the bias broadcasts over the input's free axes: [batch..., 1 (free)..., features]
    expanded = tuple(
        inputs.shape[a] if a in batch_dims else 1 for a in range(ndim) if a not in axis
    )

    def apply(x, w):
        x, w, bias = _promote(module, x, w, _bias(module))
        if is_quantized(w):
            y = served_dot_general(x, w, dims, kernel_shape, module.precision)
        elif module.precision is None and _is_plain(x.ndim, dims):
            n = len(axis)
            lead, k = x.shape[: x.ndim - n], math.prod(x.shape[x.ndim - n :])
            y = matmul_2d(x.reshape(-1, k), w.reshape(k, -1)).reshape(lead + features)
        else:
            y = lax.dot_general(x, w, dims, precision=module.precision)
        return y if bias is None else y + jnp.reshape(bias, expanded + features)

    def as_matmul(x, w, mm):
        x, w, bias = _promote(module, x, w, _bias(module))
        n = len(axis)
        lead, k = x.shape[: x.ndim - n], math.prod(x.shape[x.ndim - n :])
        y = mm(x.reshape(-1, k), w.reshape(k, -1)).astype(x.dtype).reshape(lead + features)
        return y if bias is None else y + jnp.reshape(bias, expanded + features)

    return ops.Contraction(
        inputs=inputs,
        weight="kernel",
        shape=kernel_shape,
        weight_axes=contract_ind,
        input_axes=axis,
        batched=bool(batch_dims),
        apply=apply,
        matmul=as_matmul if _is_plain(ndim, dims) else None,
    )


def _einsum_parts(einsum_str: str):
    einsum_str = einsum_str.replace(" ", "")
    if "->" not in einsum_str:
        raise ValueError('`einsum_str` equation must be explicit and include "->".')
    if einsum_str.count(",") != 1:
        raise ValueError(
            "`einsum_str` equation must have exactly two operands and therefore, exactly one "
            f"comma character, instead of {einsum_str.count(',')}"
        )
    lhs, rest = einsum_str.split(",")
    rhs, out = rest.split("->")
    if "." in rhs:
        raise ValueError(f"einsum_str={einsum_str!r}: ellipsis in the kernel is not supported.")
    return einsum_str, lhs, rhs, out


def _axes_of(spec: str, ndim: int) -> dict[str, int]:
    """Letter -> axis of an operand spec that may hold one ``...``."""
    if "..." not in spec:
        return {c: i for i, c in enumerate(spec)}
    head, tail = spec.split("...")
    out = {c: i for i, c in enumerate(head)}
    out.update({c: ndim - len(tail) + i for i, c in enumerate(tail)})
    return out


def einsum_contraction(module, args, kwargs) -> ops.Contraction:
    """The contraction of ``nn.Einsum``: contracted letters are in both operands and not in
    the output; a letter in both operands and the output is a batch axis. A frozen weight
    serves a matmul-shaped equation (``'AC,CF->AF'``) through its ``dot_general``; other
    equations dequantize it first."""
    inputs = args[0]
    einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    einsum_str = nn.merge_param("einsum_str", module.einsum_str, einsum_str)
    einsum_str, lhs, rhs, out = _einsum_parts(einsum_str)
    kernel_shape = tuple(module.shape)
    if len(rhs) != len(kernel_shape):
        raise ValueError(f"einsum_str={einsum_str!r}: the kernel has shape {kernel_shape}.")
    in_axes = _axes_of(lhs, inputs.ndim)
    contracted = [c for c in rhs if c in lhs and c not in out]
    batched = any(c in lhs and c in out for c in rhs)
    # the bias: the kernel's output letters, broadcast over the output's other axes
    out_letters = re.findall(r"\.\.\.|.", out)
    bias_shape = tuple(kernel_shape[rhs.index(c)] for c in out_letters if c in rhs)

    def add_bias(y, bias):
        if bias is None:
            return y
        lead = y.ndim - (len(out_letters) - ("..." in out_letters))
        shape = []
        for c in out_letters:
            if c == "...":
                shape.extend([1] * lead)
            else:
                shape.append(kernel_shape[rhs.index(c)] if c in rhs else 1)
        return y + jnp.reshape(bias.reshape(bias_shape), shape)

    def apply(x, w):
        x, w, bias = _promote(module, x, w, _bias(module))
        if is_quantized(w) and _is_matmul(lhs, rhs, out, contracted):
            n = len(contracted)
            x2 = x.reshape(x.shape[: x.ndim - n] + (-1,))
            y = w.dot_general(
                x2,
                (((x2.ndim - 1,), (0,)), ((), ())),
                module.precision,
                module.preferred_element_type,
            )
            y = y.reshape(x.shape[: x.ndim - n] + kernel_shape[n:])
        else:
            if is_quantized(w):
                w = w.dequantize(module.param_dtype).reshape(kernel_shape)
                x, w, bias = module.promote_dtype(x, w, bias, dtype=module.dtype)
            y = jnp.einsum(
                einsum_str,
                x,
                w,
                precision=module.precision,
                preferred_element_type=module.preferred_element_type,
            )
        return add_bias(y, bias)

    def as_matmul(x, w, mm):
        x, w, bias = _promote(module, x, w, _bias(module))
        n = len(contracted)
        lead, k = x.shape[: x.ndim - n], math.prod(x.shape[x.ndim - n :])
        y = mm(x.reshape(-1, k), w.reshape(k, -1)).astype(x.dtype)
        return add_bias(y.reshape(lead + kernel_shape[n:]), bias)

    return ops.Contraction(
        inputs=inputs,
        weight="kernel",
        shape=kernel_shape,
        weight_axes=tuple(rhs.index(c) for c in contracted),
        input_axes=tuple(in_axes[c] for c in contracted),
        batched=batched,
        apply=apply,
        matmul=as_matmul if _is_matmul(lhs, rhs, out, contracted) else None,
    )


def _is_matmul(lhs: str, rhs: str, out: str, contracted) -> bool:
    """``'AC,CF->AF'``: the kernel's leading letters are the contracted ones, the input's
    trailing ones in the same order, and nothing else is shared."""
    c = "".join(contracted)
    if not c or not rhs.startswith(c) or not lhs.endswith(c):
        return False
    a, f = lhs[: -len(c)], rhs[len(c) :]
    return out == a + f and not set(a.replace(".", "")) & set(f)


def _conv_geometry(module, inputs):
    """Flax's ``nn.Conv`` input handling: (kernel_size, strides, input dilation, kernel
    dilation, lax padding, ``prepare``: inputs -> the padded ``[N, *spatial, C]`` array the
    convolution reads, ``restore``: output -> the input's batch shape)."""
    kernel_size = _tuple(module.kernel_size)
    n = len(kernel_size)

    def broadcast(v):
        v = 1 if v is None else v
        return (v,) * n if isinstance(v, int) else tuple(v)

    strides = broadcast(module.strides)
    input_dilation = broadcast(module.input_dilation)
    kernel_dilation = broadcast(module.kernel_dilation)
    num_batch = inputs.ndim - (n + 1)
    batch_shape = inputs.shape[:num_batch]
    padding = canonicalize_padding(module.padding, n)
    pads = None
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
        padding = "VALID"
    elif padding == "CAUSAL":
        if n != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        pads, mode = [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)], "constant"
        padding = "VALID"

    def prepare(x):
        if num_batch != 1:
            x = x.reshape((-1,) + x.shape[num_batch:])
        return x if pads is None else jnp.pad(x, pads, mode=mode)

    def restore(y):
        return y if num_batch == 1 else y.reshape(batch_shape + y.shape[1:])

    return kernel_size, strides, input_dilation, kernel_dilation, padding, prepare, restore


def conv_contraction(module, args, kwargs) -> ops.Contraction:
    """The convolution of ``nn.Conv`` (shared weights; any padding, stride, dilation and
    feature grouping Flax takes): the kernel ``[*window, C_in / groups, C_out]`` contracts its
    window and input features, so its view is ``[window * C_in / groups, C_out]`` and the
    Hessian's samples are the input's patches (``lax.conv_general_dilated_patches``, reordered
    to the kernel's window-major order). An activation quantizer scales each pixel's input
    features (the input's last axis). A grouped convolution has no single input Hessian
    (each group reads other channels): it is quantized like a batched contraction. A frozen
    kernel is dequantized, then convolved."""
    (inputs,) = args
    if kwargs:
        raise TypeError(f"{type(module).__name__}: unexpected keyword arguments {sorted(kwargs)}.")
    size, strides, in_dil, k_dil, padding, prepare, restore = _conv_geometry(module, inputs)
    groups = module.feature_group_count
    in_features = inputs.shape[-1]
    if in_features % groups:
        raise ValueError(
            f"{type(module).__name__}: {in_features} input features do not split into "
            f"feature_group_count={groups} groups."
        )
    kernel_shape = size + (in_features // groups, module.features)
    n = len(size)

    def convolve(x, w):
        x = prepare(x)
        return lax.conv_general_dilated(
            x,
            w,
            strides,
            padding,
            lhs_dilation=in_dil,
            rhs_dilation=k_dil,
            dimension_numbers=_conv_dimension_numbers(x.shape),
            feature_group_count=groups,
            precision=module.precision,
        )

    def apply(x, w):
        if is_quantized(w):
            w = w.dequantize(module.param_dtype).reshape(kernel_shape)
        x, w, bias = module.promote_dtype(x, w, _bias(module), dtype=module.dtype)
        y = convolve(x, w)
        if bias is not None:
            y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
        return restore(y)

    def rows(x):
        x = prepare(x)
        patches = lax.conv_general_dilated_patches(
            x,
            size,
            strides,
            padding,
            lhs_dilation=in_dil,
            rhs_dilation=k_dil,
            dimension_numbers=_conv_dimension_numbers(x.shape),
        )  # [N, *out, C * window], channel-major
        patches = patches.reshape((-1, in_features, math.prod(size)))
        return jnp.swapaxes(patches, 1, 2).reshape(-1, math.prod(size) * in_features)

    def as_matmul(x, w, mm):
        # the convolution as its patches [tokens, window * C_in] times the kernel's view
        x, w, bias = module.promote_dtype(x, w, _bias(module), dtype=module.dtype)
        out = jax.eval_shape(convolve, x, w)
        y = mm(rows(x), w.reshape(-1, module.features)).astype(out.dtype).reshape(out.shape)
        if bias is not None:
            y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
        return restore(y)

    return ops.Contraction(
        inputs=inputs,
        weight="kernel",
        shape=kernel_shape,
        weight_axes=tuple(range(n + 1)),
        input_axes=(inputs.ndim - 1,),
        batched=groups > 1,
        apply=apply,
        rows=rows,
        matmul=as_matmul if groups == 1 else None,
    )


def _conv_dimension_numbers(shape) -> lax.ConvDimensionNumbers:
    """Channels-last input and output, kernel ``[*window, C_in, C_out]`` (Flax's layout)."""
    ndim = len(shape)
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(
        (0, ndim - 1) + spatial,
        (ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
        (0, ndim - 1) + spatial,
    )


def contraction_of(module):
    """The contraction function of a Flax layer type jaxquant quantizes, or None."""
    if isinstance(module, (nn.Dense, nn.DenseGeneral)):
        return dense_contraction
    if isinstance(module, nn.Einsum):
        return einsum_contraction
    if isinstance(module, nn.Conv) and module.mask is None:  # a masked conv: not quantized
        return conv_contraction
    return None


class QuantizedLayer(nn.Module):
    """The quantized layers' one override: ``__call__`` runs per the ``quant`` config's mode
    (``ops.quantized_call``), with Flax's own ``__call__`` in float and calibrate modes."""

    quant: QuantConfig | None = None
    role: str = "linear"

    @nn.compact
    def __call__(self, *args, **kwargs):
        contraction = contraction_of(self)
        if contraction is None:
            raise ValueError(
                f"{type(self).__name__} at {self.scope.path}: jaxquant does not quantize a "
                "convolution with a mask; use nn.Conv for it."
            )
        return ops.quantized_call(
            self, self.quant, self.role, contraction, super().__call__, args, kwargs
        )


class QDense(QuantizedLayer, nn.Dense):
    """``nn.Dense`` with a quantization config (see the module docstring)."""


class QDenseGeneral(QuantizedLayer, nn.DenseGeneral):
    """``nn.DenseGeneral`` with a quantization config (see the module docstring)."""


class QEinsum(QuantizedLayer, nn.Einsum):
    """``nn.Einsum`` with a quantization config (see the module docstring)."""


class QConv(QuantizedLayer, nn.Conv):
    """``nn.Conv`` with a quantization config (see the module docstring and
    ``conv_contraction``)."""


class QEmbed(nn.Embed):
    """``nn.Embed`` with a quantization config; its role is ``'embedding'``.

    The table is quantized with scales shared along the feature axis (one scale, or one per
    group, per row), which serves both the lookup and ``attend`` (a tied output head). Flax's
    ``Embed`` makes its table in ``setup``, so that is what this layer overrides: the table is
    the float param, its fake-quantized value (QAT) or the frozen one, dequantized (serve,
    where the float table is not needed); ``__call__`` and ``attend`` are Flax's own.
    """

    quant: QuantConfig | None = None

    def setup(self):
        config = self.quant or QuantConfig()
        shape = (self.num_embeddings, self.features)
        served = config.mode == "serve" and self.has_variable("quant", "embedding")
        # Flax's own table param (not needed, and absent, once the table is frozen)
        w = (
            None
            if served
            else self.param("embedding", self.embedding_init, shape, self.param_dtype)
        )
        table, _ = ops.layer_weight(
            self,
            config,
            "embedding",
            "embedding",
            shape,
            (1,),
            hessian=False,
            float_weight=lambda: w,
        )
        if table is None:
            table = w
        elif is_quantized(table):
            table = table.dequantize(self.param_dtype)
        self.embedding = table
