"""jaxquant.numerics: element formats, scaling, calibration, rounding, packing and QArray.

Top-level ``INT4``, ``INT8``, ``NF4``, ... are presets (format + scaling); the bare element
formats are ``IntFormat(bits)``, ``E4M3``, ``E2M1``, ``LookupFormat.normal_float(4)``, ...

The two entry points everything builds on are ``quantize(x, fmt, ...) -> QArray`` and
``fake_quant(x, fmt, ...)``; ``fmt`` is a ``Format`` or a named ``Preset``.
"""

from jaxquant.numerics.calibration import Calibration
from jaxquant.numerics.fake_quant import fake_quant, lsq_init_scale
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
from jaxquant.numerics.presets import (
    FP4_AFPQ_G128,
    FP8_E4M3,
    FP8_E5M2,
    INT2_G128,
    INT3_G128,
    INT4,
    INT4_G128,
    INT4_G128_ASYM,
    INT8,
    MXFP4,
    MXFP6,
    MXFP6_E3M2,
    MXFP8,
    MXFP8_E5M2,
    NF4,
    NVFP4,
    PRESETS,
    Preset,
    get_preset,
)
from jaxquant.numerics.qarray import QArray, QuantizedTensor, quantize
from jaxquant.numerics.scaling import Scaling
from pallas_kernels.packing import pack, packed_length, unpack

__all__ = [
    "Calibration",
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
    "INT4_G128",
    "INT4_G128_ASYM",
    "INT8",
    "IntFormat",
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
    "Preset",
    "QArray",
    "QuantizedTensor",
    "Scaling",
    "UINT4",
    "UINT8",
    "fake_quant",
    "get_preset",
    "lsq_init_scale",
    "pack",
    "packed_length",
    "quantize",
    "unpack",
]
