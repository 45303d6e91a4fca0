"""jaxquant.vq: vector quantization, as formats that rules select.

A ``VQ`` recipe (``formats``) names a ``VectorFormat`` and how scales, codebooks and the
randomized Hadamard rotation are shared; ``quantize_vq`` turns a weight into a ``VQArray``
(``vqarray``), which layers serve through ``vq_matmul`` (``codebook_matmul`` on the codes).

Formats: ``KMeans`` (k-means codebooks, ``kmeans``), ``E8P`` (QuIP#'s E8 lattice codebook
and residual stages, ``e8p``), ``PyramidVQ`` (Fischer-enumerated pyramid codes with
a quantized gain, ``pyramid``), ``Trellis`` (QTIP's bitshift trellis with a computed code,
tail-biting Viterbi, ``trellis``). QAT: straight-through (``fake_quant_vq``) or differentiable
k-means (``dkm``, ``VQ(qat='dkm')``). Building blocks: ``nearest_d8`` /
``nearest_e8`` (``lattice``), ``rotation`` (RHT incoherence).
"""

from jaxquant.vq import dkm, e8p, pyramid, rotation, trellis
from jaxquant.vq.formats import (
    E8P,
    VQ,
    KMeans,
    PyramidVQ,
    Trellis,
    VectorFormat,
    gaussian_code_mse,
    get_vq,
)
from jaxquant.vq.kmeans import assign, distortion, kmeans
from jaxquant.vq.lattice import nearest_d8, nearest_e8
from jaxquant.vq.vqarray import VQArray, fake_quant_vq, quantize_vq, vq_matmul

__all__ = [
    "E8P",
    "VQ",
    "KMeans",
    "PyramidVQ",
    "Trellis",
    "VQArray",
    "VectorFormat",
    "assign",
    "distortion",
    "dkm",
    "e8p",
    "fake_quant_vq",
    "gaussian_code_mse",
    "get_vq",
    "kmeans",
    "nearest_d8",
    "nearest_e8",
    "pyramid",
    "quantize_vq",
    "rotation",
    "trellis",
    "vq_matmul",
]
