"""jaxquant.nn: Flax layers with quantized parameter collections, rules, freeze and intercept.

Collections: 'params' (float master weights, and LSQ scales in QAT), 'qstats' (calibration
statistics), 'quant' (frozen QArrays). Modes: float, qat, calibrate, freeze, serve.
"""

from jaxquant.nn.freeze import FreezeReport, freeze, intercept, serving_params
from jaxquant.nn.layers import QDense, QDenseGeneral, QEinsum, QEmbed
from jaxquant.nn.ops import quant_dot_general
from jaxquant.nn.rules import MODES, ROLES, QuantConfig, QuantRule, TensorQuant

__all__ = [
    "MODES",
    "ROLES",
    "FreezeReport",
    "QDense",
    "QDenseGeneral",
    "QEinsum",
    "QEmbed",
    "QuantConfig",
    "QuantRule",
    "TensorQuant",
    "freeze",
    "intercept",
    "quant_dot_general",
    "serving_params",
]
