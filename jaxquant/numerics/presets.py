"""Presets: the scalar quantizers users know by name.

Grouped presets group along axis 0, the contraction axis of a Flax kernel ``[in, out]``
(layers replace it with the axes each matmul contracts); ``preset.with_group_size(g)`` changes
the block. MX presets follow OCP Microscaling Formats (MX) v1.0 (block 32, E8M0 shared scale);
NVFP4 is E2M1 with blocks of 16, an E4M3 scale per block and an f32 tensor scale. Each
preset's ``name`` is its registry name (``get_quantizer``).
"""

from __future__ import annotations

from jaxquant.numerics import formats as F
from jaxquant.numerics.scalar import ScalarQuantizer
from jaxquant.numerics.scaling import Scaling


def _channel(**kw) -> Scaling:
    return Scaling(axis=0, **kw)


def _group(size: int, **kw) -> Scaling:
    return Scaling(axis=0, group_size=size, **kw)


# one scale per output channel, at every integer width
INT8 = ScalarQuantizer(F.INT8, _channel())
INT7 = ScalarQuantizer(F.IntFormat(7), _channel())
INT6 = ScalarQuantizer(F.IntFormat(6), _channel())
INT5 = ScalarQuantizer(F.IntFormat(5), _channel())
INT4 = ScalarQuantizer(F.INT4, _channel())
INT3 = ScalarQuantizer(F.INT3, _channel())
INT2 = ScalarQuantizer(F.INT2, _channel())
INT4_G128 = ScalarQuantizer(F.INT4, _group(128))
INT4_G128_ASYM = ScalarQuantizer(F.UINT4, _group(128, zero_point=True))
INT3_G128 = ScalarQuantizer(F.INT3, _group(128))
INT2_G128 = ScalarQuantizer(F.INT2, _group(128))
FP8_E4M3 = ScalarQuantizer(F.E4M3, Scaling())
FP8_E5M2 = ScalarQuantizer(F.E5M2, Scaling())
MXFP8 = ScalarQuantizer(F.E4M3, _group(32, scale_dtype="e8m0"))
MXFP8_E5M2 = ScalarQuantizer(F.E5M2, _group(32, scale_dtype="e8m0"))
MXFP6 = ScalarQuantizer(F.E2M3, _group(32, scale_dtype="e8m0"))
MXFP6_E3M2 = ScalarQuantizer(F.E3M2, _group(32, scale_dtype="e8m0"))
MXFP4 = ScalarQuantizer(F.E2M1, _group(32, scale_dtype="e8m0"))
NVFP4 = ScalarQuantizer(F.E2M1, _group(16, scale_dtype="e4m3", tensor_scale=True))
NF4 = ScalarQuantizer(F.NF4, _group(64))
FP4_AFPQ_G128 = ScalarQuantizer(F.E2M1, _group(128, split_sign=True))

# name -> preset, in the order of the rate-distortion report.
PRESETS: dict[str, ScalarQuantizer] = {
    p.name: p
    for p in (
        INT8,
        INT7,
        INT6,
        INT5,
        INT4,
        INT3,
        INT2,
        INT4_G128,
        INT4_G128_ASYM,
        INT3_G128,
        INT2_G128,
        FP8_E4M3,
        FP8_E5M2,
        MXFP8,
        MXFP8_E5M2,
        MXFP6,
        MXFP6_E3M2,
        MXFP4,
        NVFP4,
        NF4,
        FP4_AFPQ_G128,
    )
}
