"""jaxquant.ptq: post-training quantization of whole models.

``quantize_model`` quantizes a model block by block from the Hessians of each layer's inputs
on calibration data (GPTQ for scalar formats, block LDLQ for vector ones: each quantizer's
``quantize(w, hessian=H)``), on hidden states cached between blocks. One layer at a time:
``jaxquant.quantize(w, quantizer, hessian=H)``; round to nearest: ``jaxquant.nn.freeze``.
"""

from jaxquant.ptq.pipeline import quantize_model

__all__ = ["quantize_model"]
