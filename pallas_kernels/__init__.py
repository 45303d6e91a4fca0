"""Pallas kernels for low-precision matmuls, and the packed-code layout they read.

Depends on jax and numpy only: kernels take raw arrays (packed codes, scales, codebooks) and
static layout parameters, so any JAX codebase can call them. The ops, each with a reference,
a Mosaic TPU kernel and a Triton GPU kernel in its own folder:

* ``quantized_matmul``: ``x @ w`` with w stored as packed 2/4/8-bit codes and group scales;
* ``codebook_matmul``: ``x @ w`` with w stored as indices into a codebook of vectors;
* ``hadamard``: the blockwise Walsh–Hadamard transform (the rotation of incoherence
  processing);

and ``pack`` / ``unpack`` / ``packed_length``, the layout (``packing``). Each op's reference is
``<op>_reference`` (and ``dequantize_reference``, ``hadamard_matrix`` in its folder).
"""

from pallas_kernels.codebook_matmul import codebook_matmul, codebook_matmul_reference
from pallas_kernels.hadamard import hadamard, hadamard_reference
from pallas_kernels.packing import pack, packed_length, unpack
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference

__all__ = [
    "codebook_matmul",
    "codebook_matmul_reference",
    "hadamard",
    "hadamard_reference",
    "pack",
    "packed_length",
    "quantized_matmul",
    "quantized_matmul_reference",
    "unpack",
]
