"""jaxquant.ptq: post-training quantization.

Layers: ``rtn``, ``gptq`` (jitted), ``babai_nearest_plane`` and its bound and order.
Models: ``quantize_model`` (GPTQ block by block on cached hidden states, or RTN).
"""

from jaxquant.ptq.gptq import (
    babai_error_bound,
    babai_nearest_plane,
    babai_order,
    gptq,
    layer_error,
    rtn,
)
from jaxquant.ptq.pipeline import LayerResult, PTQReport, quantize_model

__all__ = [
    "LayerResult",
    "PTQReport",
    "babai_error_bound",
    "babai_nearest_plane",
    "babai_order",
    "gptq",
    "layer_error",
    "quantize_model",
    "rtn",
]
