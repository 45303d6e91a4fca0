"""jaxquant.ptq: post-training quantization of layers (RTN, GPTQ, Babai's nearest plane).

The model-wide, layer-sequential pipeline (``quantize_model``) builds on these next.
"""

from jaxquant.ptq.gptq import (
    babai_error_bound,
    babai_nearest_plane,
    babai_order,
    gptq,
    layer_error,
    rtn,
)

__all__ = [
    "babai_error_bound",
    "babai_nearest_plane",
    "babai_order",
    "gptq",
    "layer_error",
    "rtn",
]
