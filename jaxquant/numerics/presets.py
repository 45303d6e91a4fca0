"""Named quantization recipes: a format and a scaling, under the names users know.

Grouped presets group along axis 0, the contraction axis of a Flax kernel ``[in, out]``; use
``preset.on_axis(-1)`` for activations ``[..., features]``, and ``preset.with_group_size(g)`` to
change the block. MX presets follow OCP Microscaling Formats (MX) v1.0 (block 32, E8M0 shared
scale); NVFP4 is E2M1 with blocks of 16, an E4M3 scale per block and an f32 tensor scale.
"""

from __future__ import annotations

import dataclasses

from jaxquant.numerics import formats as F
from jaxquant.numerics.scaling import Scaling


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named (format, scaling) pair; accepted wherever a format is."""

    name: str
    format: F.Format
    scaling: Scaling

    def with_group_size(self, group_size: int | None) -> Preset:
        """The same recipe with blocks of ``group_size`` along its axis (None: per channel)."""
        axis = self.scaling.axis if self.scaling.axis is not None else 0
        scaling = dataclasses.replace(self.scaling, axis=axis, group_size=group_size)
        suffix = f"_g{group_size}" if group_size else "_channel"
        return Preset(self.name + suffix, self.format, scaling)

    def on_axis(self, axis: int) -> Preset:
        """The same recipe sharing scales along ``axis`` instead."""
        if self.scaling.axis is None:
            raise ValueError(f"Preset {self.name} has one scale per tensor; it has no axis.")
        return Preset(self.name, self.format, dataclasses.replace(self.scaling, axis=axis))

    def __str__(self) -> str:
        return self.name


def _channel(**kw) -> Scaling:
    return Scaling(axis=0, **kw)


def _group(size: int, **kw) -> Scaling:
    return Scaling(axis=0, group_size=size, **kw)


INT8 = Preset("INT8", F.INT8, _channel())
INT4 = Preset("INT4", F.INT4, _channel())
INT4_G128 = Preset("INT4_G128", F.INT4, _group(128))
INT4_G128_ASYM = Preset("INT4_G128_ASYM", F.UINT4, _group(128, zero_point=True))
INT3_G128 = Preset("INT3_G128", F.INT3, _group(128))
INT2_G128 = Preset("INT2_G128", F.INT2, _group(128))
FP8_E4M3 = Preset("FP8_E4M3", F.E4M3, Scaling())
FP8_E5M2 = Preset("FP8_E5M2", F.E5M2, Scaling())
MXFP8 = Preset("MXFP8", F.E4M3, _group(32, scale_dtype="e8m0"))
MXFP8_E5M2 = Preset("MXFP8_E5M2", F.E5M2, _group(32, scale_dtype="e8m0"))
MXFP6 = Preset("MXFP6", F.E2M3, _group(32, scale_dtype="e8m0"))
MXFP6_E3M2 = Preset("MXFP6_E3M2", F.E3M2, _group(32, scale_dtype="e8m0"))
MXFP4 = Preset("MXFP4", F.E2M1, _group(32, scale_dtype="e8m0"))
NVFP4 = Preset("NVFP4", F.E2M1, _group(16, scale_dtype="e4m3", tensor_scale=True))
NF4 = Preset("NF4", F.NF4, _group(64))
FP4_AFPQ_G128 = Preset("FP4_AFPQ_G128", F.E2M1, _group(128, split_sign=True))

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        INT8,
        INT4,
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


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive)."""
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise ValueError(f"preset {name!r}: expected one of {sorted(PRESETS)}.") from None
