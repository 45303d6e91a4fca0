"""What every op of ``pallas_kernels`` shares: picking an implementation, Triton tile sizes.

Terminology:
  implementation:  ``'xla'`` (the op's plain-``jnp`` reference), ``'tpu'`` (its Mosaic kernel),
                   ``'gpu'`` (its Triton kernel) or ``'cpu'`` (a C++ XLA FFI kernel, for the
                   ops that have one: ``quantized_matmul``).
  tile size:       a Triton block dimension: a power of two, at least ``MIN_DOT``.

This module imports only jax.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl

IMPLEMENTATIONS = ("xla", "tpu", "gpu", "cpu")
GPU_BACKENDS = ("gpu", "cuda", "rocm")
MIN_DOT = 16  # Triton's dot needs M, N, K >= 16.


def pick_implementation(
    op: str,
    implementation: str | None,
    interpret: bool,
    *,
    tpu_ok: bool,
    gpu_ok: bool = True,
    cpu_ok: bool | None = None,
) -> str:
    """The implementation an op runs.

    ``cpu_ok`` is None for an op without a CPU kernel, else whether its CPU kernel serves this
    call. ``implementation`` when given (checked; ``'cpu'`` only for an op with a CPU
    kernel); else with ``interpret`` the TPU kernel (the GPU one when ``not tpu_ok``), run
    in interpret mode; else by ``jax.default_backend()``: the TPU kernel on TPU when
    ``tpu_ok``, the GPU kernel on GPU when ``gpu_ok``, the CPU kernel on CPU when ``cpu_ok``,
    otherwise ``'xla'``.
    """
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"{op} implementation={implementation!r}: expected None or one of "
                f"{IMPLEMENTATIONS}."
            )
        if implementation == "cpu" and cpu_ok is None:
            raise ValueError(
                f"{op} implementation='cpu': {op} has no CPU kernel (its 'xla' reference is "
                "what runs on CPU); expected None, 'xla', 'tpu' or 'gpu'."
            )
        return implementation
    if interpret:
        return "tpu" if tpu_ok else "gpu"
    backend = jax.default_backend()
    if backend == "tpu" and tpu_ok:
        return "tpu"
    if backend in GPU_BACKENDS and gpu_ok:
        return "gpu"
    if backend == "cpu" and cpu_ok:
        return "cpu"
    return "xla"


def is_tile_size(b) -> bool:
    """A power of two ``>= MIN_DOT`` (a valid Triton block dimension)."""
    return isinstance(b, int) and not isinstance(b, bool) and b >= MIN_DOT and b & (b - 1) == 0


def clamp_tile(block: int, size: int) -> int:
    """``block``, shrunk to the smallest tile size covering ``size`` when that is smaller."""
    return min(block, max(MIN_DOT, pl.next_power_of_2(size)))
