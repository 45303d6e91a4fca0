"""The public low-bit weight matmul: validates, picks a kernel, falls back to the reference.

Terminology: see ``reference`` (x, codes, fmt, group, scales, zeros); ``tpu`` and ``gpu``
describe the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.quantized_matmul import cpu, gpu, tpu
from pallas_kernels.quantized_matmul.reference import (
    Problem,
    check_args,
    quantized_matmul_reference,
)

# Tile sizes per backend (static; see tpu.tiles and gpu.tiles). block_n counts output columns.
# TPU: 256 rows fill the MXU; 512 columns are 128 lanes of bytes at 2 bits (256 at 4, 512 at
# 8); block_k 512 holds 4 groups of 128 (32 of 16). GPU: one 64 x 128 output tile per program,
# K in steps of 64.
TPU_BLOCK_M, TPU_BLOCK_N, TPU_BLOCK_K = 256, 512, 512
GPU_BLOCK_M, GPU_BLOCK_N, GPU_BLOCK_K = 64, 128, 64
IMPLEMENTATIONS = dispatch.IMPLEMENTATIONS


def _pick(implementation, interpret, p: Problem) -> str:
    cpu_ok = cpu.supports(p)
    if cpu_ok and implementation is None and not interpret and jax.default_backend() == "cpu":
        cpu_ok = cpu.available(stacklevel=4)  # builds the kernel on the first call
    return dispatch.pick_implementation(
        "quantized_matmul", implementation, interpret, tpu_ok=tpu.supports(p), cpu_ok=cpu_ok
    )


def _reference_of(static: dict):
    """The reference as a function of quantized_matmul's six array arguments (``static``: its
    other keyword arguments)."""

    def reference(x, codes, scales, zeros, tensor_scale, lut):
        return quantized_matmul_reference(
            x, codes, scales, zeros, tensor_scale=tensor_scale, lut=lut, **static
        )

    return reference


def _cpu_kernel(p: Problem, reference):
    """The CPU kernel, differentiable: its VJP is ``reference``'s (a linear map of ``x``; the
    float scales, tensor scale and table get the reference's cotangents too)."""

    @jax.custom_vjp
    def f(x, codes, scales, zeros, tensor_scale, lut):
        return cpu.quantized_matmul_cpu(
            x, codes, scales, zeros, p=p, tensor_scale=tensor_scale, lut=lut
        )

    def fwd(*args):
        return f(*args), args

    def bwd(args, dy):
        diff = [
            i
            for i, a in enumerate(args)
            if a is not None and jnp.issubdtype(jnp.result_type(a), jnp.floating)
        ]

        def of_float_args(*values):
            full = list(args)
            for i, v in zip(diff, values, strict=True):
                full[i] = v
            return reference(*full)

        _, vjp = jax.vjp(of_float_args, *[args[i] for i in diff])
        out = [None] * len(args)
        for i, ct in zip(diff, vjp(dy), strict=True):
            out[i] = ct
        return tuple(out)

    f.defvjp(fwd, bwd)
    return f


def quantized_matmul(
    x: jax.Array,
    codes: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None = None,
    *,
    bits: int,
    group_size: int | None,
    fmt: str,
    scale_dtype: str = "float32",
    tensor_scale: jax.Array | None = None,
    lut: jax.Array | None = None,
    out_dtype=None,
    interpret: bool = False,
    implementation: str | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """``x @ w`` for a weight ``w`` stored as packed low-bit codes with group scales.

    ``y[m, n] = sum_k x[m, k] * w[k, n]`` with
    ``w[k, n] = (v[k, n] - zeros[k // g, n]) * scales[k // g, n] * tensor_scale``, where ``v``
    is the value of code ``[k, n]`` under ``fmt`` and ``g = group_size`` (all of K when None);
    float32 accumulation. The arguments are exactly the fields of a jaxquant ``QArray`` of a
    Flax kernel ``[in, out]`` quantized along ``in`` (``codes``, ``scale``, ``zero``,
    ``tensor_scale``; ``lut`` = ``LookupFormat.values``), so ``quantized_matmul(x, ...) ==
    x @ q.dequantize()`` up to float32 summation order.

    Implementations: ``'tpu'`` (Mosaic kernel, ``tpu.quantized_matmul_tpu``), ``'gpu'``
    (Triton kernel, ``gpu.quantized_matmul_gpu``), ``'cpu'`` (a C++ XLA FFI kernel,
    ``cpu.quantized_matmul_cpu``, built on first use), ``'xla'``
    (``quantized_matmul_reference``: dequantize to float32, then a float32 matmul). ``None``
    picks by ``jax.default_backend()``: the kernel on TPU (when ``tpu.supports`` the group
    size) and GPU; on CPU the C++ kernel for at most ``cpu.MAX_M`` rows (decoding; with a
    warning and ``'xla'`` when it cannot be built), ``'xla'`` for more; with
    ``interpret=True`` it picks the TPU kernel (the GPU kernel for group sizes the TPU kernel
    does not take), run in Pallas interpret mode on any backend. The kernels read the packed
    codes and dequantize in VMEM / registers; they are differentiable in ``x`` (the 'cpu'
    kernel through the reference's VJP).

    Args:
      x: float32 or bfloat16 [M, K] activations.
      codes: uint8 [K, packed_length(N, bits)]: w's codes packed along N
        (``pallas_kernels.packing.pack``).
      scales: [K // group_size, N] ([1, N] when ``group_size`` is None), stored as
        ``scale_dtype``: float32, bfloat16, uint8 (``'e8m0'``) or float8_e4m3fn (``'e4m3'``).
      zeros: optional uint8 zero points shaped like ``scales`` (``fmt='uint'`` only).
      bits: 2, 4 or 8 (``'e2m1'``: 4, ``'e4m3'``: 8).
      group_size: rows of w (along K) per scale, dividing K; None for one scale per column.
      fmt: ``'int'``, ``'uint'``, ``'e2m1'``, ``'e4m3'`` or ``'lut'`` (see ``reference``).
      scale_dtype: ``'float32'``, ``'bfloat16'``, ``'e8m0'`` or ``'e4m3'``.
      tensor_scale: optional float32 scalar multiplying every scale (NVFP4).
      lut: float [2**bits], the value of each code, for ``fmt='lut'`` (e.g. NF4's 16 values).
      out_dtype: the result's dtype; default ``x.dtype``.
      interpret: run the chosen Pallas kernel in interpret mode.
      implementation: None, ``'xla'``, ``'tpu'``, ``'gpu'`` or ``'cpu'``.
      block_m, block_n, block_k: tile sizes (``block_n`` in output columns); defaults
        ``TPU_BLOCK_*`` / ``GPU_BLOCK_*``; ignored by ``'xla'``. See ``tpu.tiles`` and
        ``gpu.tiles`` for what each kernel accepts.

    Returns:
      [M, N] in ``out_dtype``.

    Raises:
      ValueError: naming the argument, for an unknown ``fmt``, ``scale_dtype`` or
        ``implementation``; ``bits`` not in (2, 4, 8) or not ``fmt``'s width; ``group_size``
        not dividing K; ``x``, ``codes``, ``scales``, ``zeros``, ``tensor_scale`` or ``lut`` of
        the wrong dtype or shape; ``zeros`` with a ``fmt`` other than ``'uint'``; ``lut``
        missing for ``'lut'``; a kernel's own limits on block sizes and group sizes.

    Example:
      >>> import jaxquant.numerics as jn
      >>> q = jn.quantize(w, jn.INT4_G128)  # w: [4096, 1024] = [in, out]
      >>> y = quantized_matmul(x, q.codes, q.scale, bits=4, group_size=128, fmt="int")
      >>> # y ≈ x @ q.dequantize(), reading 4.25 bits per weight from memory

    References:
      Frantar et al., GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
      Transformers, arXiv:2210.17323 (grouped int4 weights).
      Dettmers et al., QLoRA: Efficient Finetuning of Quantized LLMs, arXiv:2305.14314,
      Sec. 3 (NF4).
      Rouhani et al., Microscaling Data Formats for Deep Learning, arXiv:2310.10537 (MXFP4).
    """
    kwargs = dict(
        bits=bits,
        group_size=group_size,
        fmt=fmt,
        scale_dtype=scale_dtype,
        tensor_scale=tensor_scale,
        lut=lut,
        out_dtype=out_dtype,
    )
    p = check_args(x, codes, scales, zeros, **kwargs)
    chosen = implementation
    implementation = _pick(implementation, interpret, p)
    if implementation == "xla":
        return quantized_matmul_reference(x, codes, scales, zeros, **kwargs)
    if p.m == 0 or p.n == 0 or p.k == 0:
        return jnp.zeros((p.m, p.n), p.out_dtype)
    if implementation == "cpu":
        static = {k: v for k, v in kwargs.items() if k not in ("tensor_scale", "lut")}
        reference = _reference_of(static)
        kernel = _cpu_kernel(p, reference)
        args = (x, codes, scales, zeros, tensor_scale, lut)
        if chosen == "cpu":
            return kernel(*args)
        # Picked by the default backend: the kernel where the computation is lowered for CPU,
        # the reference elsewhere (jax.export for TPU/CUDA from a CPU host).
        return jax.lax.platform_dependent(*args, cpu=kernel, default=reference)
    if implementation == "tpu":
        kernel, (dm, dn, dk) = tpu.quantized_matmul_tpu, (TPU_BLOCK_M, TPU_BLOCK_N, TPU_BLOCK_K)
    else:
        kernel, (dm, dn, dk) = gpu.quantized_matmul_gpu, (GPU_BLOCK_M, GPU_BLOCK_N, GPU_BLOCK_K)
    return kernel(
        jnp.asarray(x),
        jnp.asarray(codes),
        jnp.asarray(scales),
        None if zeros is None else jnp.asarray(zeros),
        **kwargs,
        block_m=dm if block_m is None else block_m,
        block_n=dn if block_n is None else block_n,
        block_k=dk if block_k is None else block_k,
        interpret=interpret,
    )
