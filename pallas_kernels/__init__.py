"""Pallas kernels for low-precision matmuls, and the packed-code layout they read.

Depends on jax and numpy only: kernels take raw arrays (packed codes, scales, codebooks) and
static layout parameters, so any JAX codebase can call them. ``packing`` defines the layout;
one folder per op holds its reference, kernels and public function:
``from pallas_kernels.hadamard import hadamard`` (the blockwise Walsh–Hadamard transform, the
rotation applied before quantizing), ``from pallas_kernels.quantized_matmul import
quantized_matmul`` (``x @ w`` with w stored as packed 2/4/8-bit codes and group scales).
"""

from pallas_kernels.packing import pack, packed_length, unpack

__all__ = ["pack", "packed_length", "unpack"]
