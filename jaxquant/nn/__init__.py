"""jaxquant.nn: Flax layers with quantized parameter collections, rules, freeze and intercept.

Collections: 'params' (float master weights, and the quantizers' learned parameters in QAT),
'qstats' (calibration statistics), 'quant' (frozen quantized tensors). Modes: float, qat,
calibrate, serve. ``freeze`` writes 'quant' from 'params'; ``intercept`` quantizes models
written with plain Flax layers.
"""

from jaxquant.nn.freeze import (
    QuantReport,
    WeightReport,
    freeze,
    layer_infos,
    quantize_weight,
    serving_params,
)
from jaxquant.nn.intercept import apply_with_config, has_quant_field, intercept
from jaxquant.nn.layers import QConv, QDense, QDenseGeneral, QEinsum, QEmbed, QuantizedLayer
from jaxquant.nn.ops import LayerInfo
from jaxquant.nn.rules import MODES, ROLES, QuantConfig, QuantRule

__all__ = [
    "MODES",
    "ROLES",
    "LayerInfo",
    "QConv",
    "QDense",
    "QDenseGeneral",
    "QEinsum",
    "QEmbed",
    "QuantConfig",
    "QuantReport",
    "QuantRule",
    "QuantizedLayer",
    "WeightReport",
    "apply_with_config",
    "freeze",
    "has_quant_field",
    "intercept",
    "layer_infos",
    "quantize_weight",
    "serving_params",
]
