"""jaxquant.vq: vector quantization.

So far: nearest-point decoding in the D8 and E8 lattices (``lattice``), the search step of
E8 codebooks (QuIP#-style). Codebooks, k-means, Pyramid VQ and DKM come with the rest of the
vector-quantization issue.
"""

from jaxquant.vq.lattice import nearest_d8, nearest_e8

__all__ = ["nearest_d8", "nearest_e8"]
