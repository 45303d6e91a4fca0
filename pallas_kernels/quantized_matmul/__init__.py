"""Matmul with low-bit packed weights: reference, TPU (Mosaic) and GPU (Triton) kernels.

``api.quantized_matmul`` is the entry point; ``reference`` defines the computation and its
terminology, ``decode`` the in-kernel decoders of codes and scales.
"""

from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.quantized_matmul.reference import (
    dequantize_reference,
    quantized_matmul_reference,
)

__all__ = ["dequantize_reference", "quantized_matmul", "quantized_matmul_reference"]
