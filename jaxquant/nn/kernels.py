"""Serve-mode matmuls with a frozen QArray: the Pallas kernel when it can read the QArray.

One dispatch function, ``qarray_dot_general``, takes every matmul of a served layer
(``QDense``, ``QDenseGeneral``, ``QEinsum`` and intercepted Flax layers): when the contraction
is a plain ``x [..., K] @ w [K, ...]`` and ``kernel_args`` can hand the QArray's packed codes
and scales to ``pallas_kernels.quantized_matmul`` as they are stored, the kernel computes it
(on TPU and GPU; on CPU its reference, dequantize then matmul); otherwise the weight is
dequantized to the input's dtype and ``lax.dot_general`` runs. Both give ``x @ q.dequantize()``.

The kernel reads: int/uint 2, 4 or 8 bits (uint with a zero point), E2M1 (MXFP4, NVFP4), E4M3
and 4/2/8-bit lookup formats (NF4), with one scale per tensor, per output channel or per group
of inputs, in any stored scale dtype. Not: 3/5/6/7-bit codes, E5M2/E3M2/E2M3, split-sign scales,
scales along an output axis, and views whose last axis does not fill whole bytes.

``kernel_options(implementation=..., interpret=..., enabled=...)`` sets how the kernel is
called inside its ``with`` block (read while tracing: enter it inside the jitted function, or
around the first call of a fresh jit).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.numerics import QArray
from jaxquant.numerics import formats as formats_lib
from jaxquant.vq import VQArray, vq_matmul
from pallas_kernels import packing
from pallas_kernels.quantized_matmul import quantized_matmul


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    enabled: bool = True  # False: always dequantize, then matmul
    implementation: str | None = None  # None: by backend; 'xla', 'tpu' or 'gpu'
    interpret: bool = False  # run the Pallas kernel in interpret mode (tests, CPU)


_DEFAULT = KernelOptions()  # frozen, so one shared default is safe
_OPTIONS = contextvars.ContextVar("jaxquant_kernel_options", default=_DEFAULT)  # noqa: B039


@contextlib.contextmanager
def kernel_options(**kwargs):
    """Overrides ``KernelOptions`` fields inside the block, e.g. ``interpret=True``."""
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **kwargs))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def _kernel_format(fmt) -> str | None:
    if isinstance(fmt, formats_lib.IntFormat):
        return "int" if fmt.signed else "uint"
    if isinstance(fmt, formats_lib.LookupFormat):
        return "lut"
    if isinstance(fmt, formats_lib.FloatFormat):
        return {"e2m1": "e2m1", "e4m3fn": "e4m3"}.get(fmt.name)
    return None


def unsupported_reason(q: QArray) -> str | None:
    """Why ``quantized_matmul`` cannot read ``q`` (a weight ``[K, *features]`` contracted over
    axis 0) as stored, or None when it can."""
    s, fmt = q.scaling, q.format
    kind = _kernel_format(fmt)
    if kind is None:
        return f"format {fmt.name}"
    if fmt.bits not in (2, 4, 8):
        return f"{fmt.bits}-bit codes"
    if kind == "uint" and not s.zero_point:
        return "unsigned codes without a zero point"
    if s.split_sign:
        return "split-sign scales"
    if q.ndim < 2 or q.codes.ndim != q.ndim:
        return f"a QArray of shape {q.shape} (batched or not a matrix)"
    if s.axis is not None and s.axes(q.ndim) != (0,):
        return f"scales along axes {s.axes(q.ndim)}, not the contracted axis 0"
    if q.ndim > 2 and (q.shape[-1] * fmt.bits) % 8:
        return f"rows of {q.shape[-1]} {fmt.bits}-bit codes do not fill whole bytes"
    return None


def kernel_args(q: QArray) -> dict | None:
    """The arguments of ``quantized_matmul`` that read ``q`` as ``[K, N]`` (N: the product of
    its other axes), or None (see ``unsupported_reason``). Only reshapes, no copies."""
    if unsupported_reason(q) is not None:
        return None
    k, n = q.shape[0], math.prod(q.shape[1:])
    s = q.scaling
    codes = q.codes.reshape(k, packing.packed_length(n, q.format.bits))
    if s.axis is None:  # one scale for the tensor: one per column, all equal
        scales = jnp.broadcast_to(q.scale.reshape(1, 1), (1, n))
        zeros = None if q.zero is None else jnp.broadcast_to(q.zero.reshape(1, 1), (1, n))
    else:
        scales = q.scale.reshape(-1, n)
        zeros = None if q.zero is None else q.zero.reshape(-1, n)
    kind = _kernel_format(q.format)
    return dict(
        codes=codes,
        scales=scales,
        zeros=zeros,
        bits=q.format.bits,
        group_size=s.group_size,
        fmt=kind,
        scale_dtype=s.scale_dtype,
        tensor_scale=q.tensor_scale,
        lut=jnp.asarray(q.format.values, jnp.float32) if kind == "lut" else None,
    )


def qarray_dot_general(
    lhs: jax.Array,
    q: QArray,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """``lax.dot_general(lhs, q.dequantize(lhs.dtype), dimension_numbers, ...)``, through
    ``pallas_kernels.quantized_matmul`` when it is ``lhs [..., K] @ q [K, ...]`` and the kernel
    reads ``q`` (``kernel_args``); a ``VQArray`` in such a contraction goes to
    ``jaxquant.vq.vq_matmul`` (``codebook_matmul`` on its codes, the rotation on the
    activations)."""
    (lc, rc), (lb, rb) = dimension_numbers
    options = _OPTIONS.get()
    plain = not lb and not rb and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)
    if isinstance(q, VQArray):
        if plain and options.enabled and lhs.dtype in (jnp.float32, jnp.bfloat16):
            out_dtype = lhs.dtype if preferred_element_type is None else preferred_element_type
            return vq_matmul(
                lhs,
                q,
                out_dtype=out_dtype,
                implementation=options.implementation,
                interpret=options.interpret,
            )
        args = None
    else:
        args = kernel_args(q) if plain and options.enabled else None
    if args is None or lhs.dtype not in (jnp.float32, jnp.bfloat16):
        return lax.dot_general(
            lhs,
            q.dequantize(lhs.dtype),
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    out_dtype = lhs.dtype if preferred_element_type is None else preferred_element_type
    y = quantized_matmul(
        lhs.reshape(-1, lhs.shape[-1]),
        **args,
        out_dtype=out_dtype,
        implementation=options.implementation,
        interpret=options.interpret,
    )
    return y.reshape(lhs.shape[:-1] + tuple(q.shape[1:]))
