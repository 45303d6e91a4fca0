"""jaxquant.numerics: element formats, scaling, calibration, QArray, and the quantizer protocol.

A ``Quantizer`` says how a tensor is quantized; ``ScalarQuantizer`` is the scalar one (an
element format and its scaling, calibration and QAT mode), and ``INT4``, ``INT4_G128``,
``MXFP4``, ``NVFP4``, ``NF4``, ... are named instances (presets). The bare element formats are
``IntFormat(bits)``, ``E4M3``, ``E2M1``, ``LookupFormat.normal_float(4)``, ...

The two entry points everything builds on are ``quantize(x, quantizer, ...)`` (a
``QuantizedTensor``: here a ``QArray``) and ``fake_quant(x, quantizer, ...)``; with a Hessian,
``quantize`` runs GPTQ (``gptq``). ``get_quantizer(name)`` parses every registry name.

Fully quantized training (``training``): ``train_matmul(x, w, recipe)`` quantizes the forward
and both backward products per a ``TrainingRecipe`` (``get_training_recipe('fp8')``,
``'fp8_delayed'``, ``'mxfp4_quartet'``, ``'nvfp4'``, ...).
"""

from jaxquant.numerics.api import fake_quant, quantize
from jaxquant.numerics.calibration import Calibration
from jaxquant.numerics.formats import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    NF4_VALUES,
    UINT4,
    UINT8,
    FloatFormat,
    Format,
    IntFormat,
    LookupFormat,
)
from jaxquant.numerics.gptq import babai_error_bound, babai_nearest_plane, babai_order, gptq
from jaxquant.numerics.hessian import DampedHessian, damp_hessian, layer_error
from jaxquant.numerics.kernel_options import KernelOptions, kernel_options
from jaxquant.numerics.presets import (
    FP4_AFPQ_G128,
    FP8_E4M3,
    FP8_E5M2,
    INT2,
    INT2_G128,
    INT3,
    INT3_G128,
    INT4,
    INT4_G128,
    INT4_G128_ASYM,
    INT5,
    INT6,
    INT7,
    INT8,
    MXFP4,
    MXFP6,
    MXFP6_E3M2,
    MXFP8,
    MXFP8_E5M2,
    NF4,
    NVFP4,
    PRESETS,
)
from jaxquant.numerics.qarray import QArray, QuantizedTensor, is_quantized
from jaxquant.numerics.quantizer import Quantizer, get_quantizer
from jaxquant.numerics.scalar import ScalarQuantizer, as_quantizer
from jaxquant.numerics.scaling import Scaling
from jaxquant.numerics.training import (
    TRAINING_RECIPES,
    OperandQuant,
    ProductRecipe,
    TrainingRecipe,
    get_training_recipe,
    train_matmul,
)
from pallas_kernels.packing import pack, packed_length, unpack

__all__ = [
    "TRAINING_RECIPES",
    "OperandQuant",
    "ProductRecipe",
    "TrainingRecipe",
    "get_training_recipe",
    "train_matmul",
    "Calibration",
    "DampedHessian",
    "E2M1",
    "E2M3",
    "E3M2",
    "E4M3",
    "E5M2",
    "FP4_AFPQ_G128",
    "FP8_E4M3",
    "FP8_E5M2",
    "FloatFormat",
    "Format",
    "INT2",
    "INT2_G128",
    "INT3",
    "INT3_G128",
    "INT4",
    "INT5",
    "INT6",
    "INT7",
    "INT4_G128",
    "INT4_G128_ASYM",
    "INT8",
    "IntFormat",
    "KernelOptions",
    "LookupFormat",
    "MXFP4",
    "MXFP6",
    "MXFP6_E3M2",
    "MXFP8",
    "MXFP8_E5M2",
    "NF4",
    "NF4_VALUES",
    "NVFP4",
    "PRESETS",
    "QArray",
    "Quantizer",
    "QuantizedTensor",
    "ScalarQuantizer",
    "Scaling",
    "UINT4",
    "UINT8",
    "as_quantizer",
    "babai_error_bound",
    "babai_nearest_plane",
    "babai_order",
    "damp_hessian",
    "fake_quant",
    "get_quantizer",
    "gptq",
    "is_quantized",
    "kernel_options",
    "layer_error",
    "pack",
    "packed_length",
    "quantize",
    "unpack",
]
