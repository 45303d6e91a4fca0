"""Matmul with vector-quantized weights: reference, TPU (Mosaic) and GPU (Triton) kernels.

``api.codebook_matmul`` is the entry point; ``reference`` defines the computation and its
terminology (vectors of ``vector_dim`` weights along K, each stored as a codebook index).
"""

from pallas_kernels.codebook_matmul.api import codebook_matmul
from pallas_kernels.codebook_matmul.reference import (
    codebook_matmul_reference,
    dequantize_reference,
)

__all__ = ["codebook_matmul", "codebook_matmul_reference", "dequantize_reference"]
