"""jaxquant.vq: vector quantization, as quantizers that rules select.

A ``VectorQuantizer`` (``quantizer``) names a ``VectorFormat`` (``formats``) and how scales,
codebooks and the randomized Hadamard rotation are shared; ``jaxquant.quantize(w, vq)`` turns
a weight into a ``VQArray`` (``vqarray``), whose ``dot_general`` serves it through
``codebook_matmul`` on the codes. With the Hessian of the weight's inputs, ``quantize`` runs
Hessian-aware VQ (``havq``: block LDLQ).

Formats: ``KMeans`` (k-means codebooks, ``kmeans``), ``E8P`` (QuIP#'s E8 lattice codebook
and residual stages, ``e8p``), ``PyramidVQ`` (Fischer-enumerated pyramid codes with
a quantized gain, ``pyramid``), ``Trellis`` (QTIP's bitshift trellis with a computed code,
tail-biting Viterbi, ``trellis``). QAT: straight-through, or differentiable k-means (``dkm``,
``VectorQuantizer(qat='dkm')``). Building blocks: ``nearest_d8`` / ``nearest_e8``
(``lattice``), ``rotation`` (RHT incoherence).
"""

from jaxquant.vq import dkm, e8p, pyramid, rotation, trellis
from jaxquant.vq.formats import E8P, KMeans, PyramidVQ, Trellis, VectorFormat
from jaxquant.vq.havq import havq
from jaxquant.vq.kmeans import assign, distortion, kmeans
from jaxquant.vq.lattice import nearest_d8, nearest_e8
from jaxquant.vq.quantizer import VectorQuantizer
from jaxquant.vq.vqarray import VQArray

__all__ = [
    "E8P",
    "KMeans",
    "PyramidVQ",
    "Trellis",
    "VQArray",
    "VectorFormat",
    "VectorQuantizer",
    "assign",
    "distortion",
    "dkm",
    "e8p",
    "havq",
    "kmeans",
    "nearest_d8",
    "nearest_e8",
    "pyramid",
    "rotation",
    "trellis",
]
