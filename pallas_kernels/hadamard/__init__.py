"""Blockwise fast Walsh–Hadamard transform: reference, TPU (Mosaic) and GPU (Triton) kernels.

``api.hadamard`` is the entry point; ``reference`` defines the transform and its terminology.
"""

from pallas_kernels.hadamard.api import hadamard
from pallas_kernels.hadamard.reference import hadamard_matrix, hadamard_reference

__all__ = ["hadamard", "hadamard_matrix", "hadamard_reference"]
