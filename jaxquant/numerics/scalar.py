"""ScalarQuantizer: an element format, how its scales are shared, calibrated and learned.

Each element is rounded onto the format's grid after dividing by its block's scale (module
``scaling``): round to nearest (RTN), or, given the Hessian of the weight's inputs, GPTQ
(``gptq``). In QAT the quantize-dequantize gets a straight-through gradient, or LSQ's learned
scale (``fake_quant``).

Names (``name`` / ``get_quantizer``) are a family and options, each option printed only where
it differs from the family's default:

  ===============  =================================  ======================
  family           format, scales                     default granularity
  ===============  =================================  ======================
  ``int2..int8``   signed int, f32                    channel
  ``fp4``          E2M1, f32                          channel
  ``fp8_e4m3``     E4M3, f32                          tensor
  ``fp8_e5m2``     E5M2, f32                          tensor
  ``mxfp8``        E4M3, E8M0 (OCP MX)                g32
  ``mxfp8_e5m2``   E5M2, E8M0                         g32
  ``mxfp6``        E2M3, E8M0                         g32
  ``mxfp6_e3m2``   E3M2, E8M0                         g32
  ``mxfp4``        E2M1, E8M0                         g32
  ``nvfp4``        E2M1, E4M3 + f32 tensor scale      g16
  ``nf<b>``        NF-b lookup table, f32             g64
  ``e<E>m<M>...``  any other FloatFormat, f32         channel
  ===============  =================================  ======================

Options, in printed order: ``asym`` (unsigned codes with a zero point), ``afpq`` (split-sign
scales), ``s<dtype>`` (scale dtype ``sf32``/``sbf16``/``se8m0``/``se4m3``), ``ts`` / ``nots``
(tensor scale), ``tensor`` / ``channel`` / ``g<N>`` (granularity), ``axis<a>`` (a scale axis
other than 0, e.g. ``axis-1``), ``mse`` / ``mse<n>x<min>`` / ``p<pct>`` (calibration),
``lsq`` (QAT), ``sr`` (stochastic rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.numerics import calibration as calibration_lib
from jaxquant.numerics import formats as F
from jaxquant.numerics import scaling as scaling_lib
from jaxquant.numerics.fake_quant import lsq, lsq_init_scale, ste
from jaxquant.numerics.gptq import gptq
from jaxquant.numerics.qarray import QArray, check_input
from jaxquant.numerics.quantizer import FLOAT_PATTERN, Axis, Quantizer, get_quantizer
from jaxquant.numerics.scaling import Scaling
from pallas_kernels import packing

QAT_MODES = ("ste", "lsq")

# family -> (format, default scaling). Order matters where two families share a format: the
# first whose scale dtype and tensor scale match a quantizer names it.
_FAMILIES: dict[str, tuple[F.Format, Scaling]] = {
    **{f"int{b}": (F.IntFormat(b), Scaling(axis=0)) for b in range(2, 9)},
    "fp8_e4m3": (F.E4M3, Scaling()),
    "fp8_e5m2": (F.E5M2, Scaling()),
    "mxfp8": (F.E4M3, Scaling(axis=0, group_size=32, scale_dtype="e8m0")),
    "mxfp8_e5m2": (F.E5M2, Scaling(axis=0, group_size=32, scale_dtype="e8m0")),
    "mxfp6": (F.E2M3, Scaling(axis=0, group_size=32, scale_dtype="e8m0")),
    "mxfp6_e3m2": (F.E3M2, Scaling(axis=0, group_size=32, scale_dtype="e8m0")),
    "mxfp4": (F.E2M1, Scaling(axis=0, group_size=32, scale_dtype="e8m0")),
    "nvfp4": (
        F.E2M1,
        Scaling(axis=0, group_size=16, scale_dtype="e4m3", tensor_scale=True),
    ),
    "fp4": (F.E2M1, Scaling(axis=0)),
    # NF4 is QLoRA's published table (F.NF4); the other widths are computed (normal_float).
    **{
        f"nf{b}": (
            F.NF4 if b == 4 else F.LookupFormat.normal_float(b),
            Scaling(axis=0, group_size=64),
        )
        for b in range(2, 9)
    },
}
_SCALE_TOKENS = {"float32": "sf32", "bfloat16": "sbf16", "e8m0": "se8m0", "e4m3": "se4m3"}


def _float_family(fmt: F.FloatFormat) -> str:
    """``e<E>m<M>`` plus ``fn``/``ieee`` for the special values and ``b<bias>`` when not the
    default bias: a name for any FloatFormat outside the families."""
    special = {"fn": "fn", "ieee": "ieee", "none": ""}[fmt.special]
    default_bias = 2 ** (fmt.exponent_bits - 1) - 1
    bias = f"b{fmt.bias}" if fmt.bias != default_bias else ""
    return f"e{fmt.exponent_bits}m{fmt.mantissa_bits}{special}{bias}"


def _parse_float_family(base: str) -> F.FloatFormat | None:
    m = re.fullmatch(r"e(\d+)m(\d+)(fn|ieee)?(?:b(-?\d+))?", base)
    if m is None:
        return None
    special = m.group(3) or "none"
    bias = None if m.group(4) is None else int(m.group(4))
    return F.FloatFormat(int(m.group(1)), int(m.group(2)), bias=bias, special=special)


@dataclasses.dataclass(frozen=True)
class ScalarQuantizer(Quantizer):
    """A scalar quantization recipe: what each element is and how its scale is found.

    Frozen and hashable (a static argument under jit). ``INT4_G128``, ``MXFP4``, ``NVFP4``, ...
    are instances (``presets``); build others from a format and a scaling.

    Attributes:
      format: the element format (``IntFormat(3)``, ``E4M3``, ``NF4``, ...).
      scaling: how scales are shared and stored (``Scaling()``: one per tensor). Its ``axis``
        is the default contracted axis; ``quantize(x, axis=...)`` and layers replace it with
        the axes their matmul contracts.
      calibration: ``'absmax'``, ``'mse'``, ``'percentile'`` or a ``Calibration``.
      rounding: ``'nearest'`` (ties to even) or ``'stochastic'`` (unbiased; needs a ``key``).
      qat: ``'ste'`` (calibrated scales, straight-through gradient) or ``'lsq'`` (a learned
        scale, LSQ's gradient; symmetric f32 scales only).

    Example:
      >>> q = ScalarQuantizer(IntFormat(3), Scaling(axis=0, group_size=64))
      >>> q.name                                   # 'int3_g64'
      >>> quantize(w, q).bits_per_weight           # 3 + 32 / 64 = 3.5
    """

    format: F.Format
    scaling: Scaling = Scaling()
    calibration: calibration_lib.Calibration = dataclasses.field(
        default=calibration_lib.Calibration(), kw_only=True
    )
    rounding: str = dataclasses.field(default="nearest", kw_only=True)
    qat: str = dataclasses.field(default="ste", kw_only=True)

    hessian_method = "gptq"
    FAMILIES = tuple(_FAMILIES)

    def __post_init__(self):
        if not isinstance(self.format, F.Format):
            raise TypeError(
                f"ScalarQuantizer format={self.format!r}: expected an element Format "
                "(IntFormat, FloatFormat, LookupFormat)."
            )
        if not isinstance(self.scaling, Scaling):
            raise TypeError(f"ScalarQuantizer scaling={self.scaling!r}: expected a Scaling.")
        self.scaling.check_format(self.format)
        cal = calibration_lib.as_calibration(self.calibration)
        # Only the fields of the chosen method matter: the rest take their defaults, so that
        # equal recipes are equal (and a name parses back to the same quantizer).
        default = calibration_lib.Calibration()
        if cal.method != "percentile":
            cal = dataclasses.replace(cal, percentile=default.percentile)
        if cal.method != "mse":
            cal = dataclasses.replace(
                cal, num_ratios=default.num_ratios, min_ratio=default.min_ratio
            )
        object.__setattr__(self, "calibration", cal)
        if self.rounding not in F.ROUNDINGS:
            raise ValueError(
                f"ScalarQuantizer rounding={self.rounding!r}: expected one of {F.ROUNDINGS}."
            )
        if self.qat not in QAT_MODES:
            raise ValueError(f"ScalarQuantizer qat={self.qat!r}: expected one of {QAT_MODES}.")
        s = self.scaling
        if self.qat == "lsq" and (
            s.zero_point or s.split_sign or s.tensor_scale or s.scale_dtype != "float32"
        ):
            raise ValueError(
                f"ScalarQuantizer qat='lsq' learns one f32 scale per block: it needs a "
                f"symmetric float32 scaling (no zero point, split sign or tensor scale), got {s}."
            )

    # -- names --------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        fmt, s = self.format, self.scaling
        tokens = []
        if isinstance(fmt, F.IntFormat) and not fmt.signed:
            fmt = F.IntFormat(fmt.bits)  # the signed family, with 'asym'
            tokens.append("asym")
        family, default = self._family(fmt, s)
        if s.split_sign:
            tokens.append("afpq")
        if s.scale_dtype != default.scale_dtype:
            tokens.append(_SCALE_TOKENS[s.scale_dtype])
        if s.tensor_scale != default.tensor_scale:
            tokens.append("ts" if s.tensor_scale else "nots")
        if (s.axis is None, s.group_size) != (default.axis is None, default.group_size):
            if s.axis is None:
                tokens.append("tensor")
            else:
                tokens.append(f"g{s.group_size}" if s.group_size else "channel")
        if s.axis not in (None, 0):
            axes = s.axis if isinstance(s.axis, tuple) else (s.axis,)
            tokens.append("axis" + ".".join(str(a) for a in axes))
        cal = self.calibration
        if cal.method == "mse":
            d = calibration_lib.Calibration()
            same = (cal.num_ratios, cal.min_ratio) == (d.num_ratios, d.min_ratio)
            tokens.append("mse" if same else f"mse{cal.num_ratios}x{float(cal.min_ratio)!r}")
        elif cal.method == "percentile":
            tokens.append(f"p{float(cal.percentile)!r}")
        if self.qat == "lsq":
            tokens.append("lsq")
        if self.rounding == "stochastic":
            tokens.append("sr")
        return "_".join([family] + tokens)

    @staticmethod
    def _family(fmt: F.Format, s: Scaling) -> tuple[str, Scaling]:
        same_format = [(n, d) for n, (f, d) in _FAMILIES.items() if f == fmt]
        for n, d in same_format:
            if (d.scale_dtype, d.tensor_scale) == (s.scale_dtype, s.tensor_scale):
                return n, d
        if same_format:
            return same_format[0]
        if isinstance(fmt, F.FloatFormat):
            return _float_family(fmt), Scaling(axis=0)
        # A lookup table outside the families: named by its label in brackets, which no family
        # parses (so get_quantizer refuses it rather than returning another table).
        return f"lookup[{fmt.name}]", Scaling(axis=0)

    @classmethod
    def from_name(cls, name: str) -> ScalarQuantizer | None:
        parts = name.lower().split("_")
        for n in range(len(parts), 0, -1):  # the longest family prefix
            base = "_".join(parts[:n])
            if base in _FAMILIES:
                fmt, scaling = _FAMILIES[base]
                break
            fmt = _parse_float_family(base) if n == 1 else None
            if fmt is not None:
                scaling = Scaling(axis=0)
                break
        else:
            return None
        kw = dict(axis=scaling.axis, group_size=scaling.group_size)
        sc = dict(
            scale_dtype=scaling.scale_dtype,
            tensor_scale=scaling.tensor_scale,
            zero_point=False,
            split_sign=False,
        )
        options: dict = {}
        axis = None
        for token in parts[n:]:
            if token == "asym":
                fmt = F.IntFormat(fmt.bits, signed=False) if isinstance(fmt, F.IntFormat) else None
                if fmt is None:
                    raise ValueError(f"quantizer name {name!r}: 'asym' needs an int family.")
                sc["zero_point"] = True
            elif token == "afpq":
                sc["split_sign"] = True
            elif token in _SCALE_TOKENS.values():
                sc["scale_dtype"] = {v: k for k, v in _SCALE_TOKENS.items()}[token]
            elif token in ("ts", "nots"):
                sc["tensor_scale"] = token == "ts"
            elif token == "tensor":
                kw = dict(axis=None, group_size=None)
            elif token == "channel":
                kw = dict(axis=0, group_size=None)
            elif re.fullmatch(r"g\d+", token):
                kw = dict(axis=0, group_size=int(token[1:]))
            elif re.fullmatch(r"axis-?\d+(\.-?\d+)*", token):
                axes = tuple(int(a) for a in token[4:].split("."))
                axis = axes[0] if len(axes) == 1 else axes
            elif token == "mse":
                options["calibration"] = calibration_lib.Calibration(method="mse")
            elif re.fullmatch(r"mse\d+x" + FLOAT_PATTERN, token):
                num, lo = token[3:].split("x")
                options["calibration"] = calibration_lib.Calibration(
                    method="mse", num_ratios=int(num), min_ratio=float(lo)
                )
            elif re.fullmatch("p" + FLOAT_PATTERN, token):
                options["calibration"] = calibration_lib.Calibration(
                    method="percentile", percentile=float(token[1:])
                )
            elif token == "lsq":
                options["qat"] = "lsq"
            elif token == "sr":
                options["rounding"] = "stochastic"
            else:
                raise ValueError(
                    f"quantizer name {name!r}: unknown option {token!r} for family {base!r} "
                    "(options: asym, afpq, sf32/sbf16/se8m0/se4m3, ts/nots, tensor/channel/g<N>, "
                    "axis<a>, mse, mse<n>x<min>, p<pct>, lsq, sr)."
                )
        if axis is not None:
            if kw["axis"] is None:
                raise ValueError(f"quantizer name {name!r}: 'axis' with one scale per tensor.")
            kw["axis"] = axis
        return cls(fmt, Scaling(**kw, **sc), **options)

    # -- the protocol -------------------------------------------------------------------------

    def with_group_size(self, group_size: int | None) -> ScalarQuantizer:
        """The same recipe with blocks of ``group_size`` along its axis (None: per channel)."""
        axis = self.scaling.axis if self.scaling.axis is not None else 0
        if isinstance(axis, tuple) and group_size is not None:
            axis = axis[-1]
        scaling = dataclasses.replace(self.scaling, axis=axis, group_size=group_size)
        return dataclasses.replace(self, scaling=scaling)

    def on_axis(self, axis: int | tuple[int, ...]) -> ScalarQuantizer:
        """The same recipe sharing scales along ``axis`` by default (e.g. -1 for activations
        ``[..., features]`` quantized outside a layer)."""
        if self.scaling.axis is None:
            raise ValueError(f"{self.name} has one scale per tensor; it has no axis.")
        return dataclasses.replace(self, scaling=dataclasses.replace(self.scaling, axis=axis))

    def scaling_for(self, ndim: int, axis: Axis = None) -> Scaling:
        """The scaling of a rank-``ndim`` tensor contracted over ``axis`` (None: this
        quantizer's own axis): per-channel scales are shared along every contracted axis,
        groups run along the last of them; one scale per tensor stays so."""
        s = self.scaling
        if axis is None or s.axis is None:
            return s
        raw = axis if isinstance(axis, (tuple, list)) else (axis,)
        if not raw:
            raise ValueError(f"{self.name}: per-channel/group scaling needs a contracted axis.")
        for a in raw:
            if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
                raise ValueError(f"{self.name} axis={axis!r}: out of range for rank {ndim}.")
        axes = tuple(sorted(int(a) % ndim for a in raw))
        if s.group_size is not None:
            return dataclasses.replace(s, axis=axes[-1])
        return dataclasses.replace(s, axis=axes if len(axes) > 1 else axes[0])

    def check_shape(self, shape, axis: Axis = None) -> None:
        shape = tuple(shape)
        if not shape:
            raise ValueError(
                f"{self.name}: expected an array with at least one axis, got a scalar."
            )
        self.scaling_for(len(shape), axis).block_view(shape)

    def quantize(
        self, x, *, axis=None, hessian=None, learned=None, key=None, damp=0.01, order=None
    ):
        """``x`` as a ``QArray``: round to nearest (or stochastically), or GPTQ with a Hessian.

        Args:
          x: a float array (NaN/Inf is an error when ``x`` is concrete).
          axis: the contracted axis or axes (default: ``scaling.axis``).
          hessian: f32 ``[K, K]`` over the contracted axis (a single one; 0 for one scale per
            tensor when ``axis`` is None): GPTQ (``gptq``) instead of RTN.
          learned: ``{'scale': s}``, f32 ``scaling.scale_shape(x.shape)`` scales to use
            instead of calibrating (LSQ's, or any given scale); symmetric f32 scalings only.
          key: PRNG key for ``rounding='stochastic'``.
          damp, order: GPTQ's damping and row order (``gptq``).
        """
        x = check_input(x)
        self.check_shape(x.shape, axis)
        scaling = self.scaling_for(x.ndim, axis)
        scale = _learned_scale(learned, self.name)
        F.check_rounding(self.rounding, key)
        if hessian is not None:
            if scale is not None or self.rounding != "nearest":
                raise ValueError(
                    f"{self.name}: GPTQ (a Hessian) rounds to nearest with its own scales; "
                    "learned scales and stochastic rounding are RTN options."
                )
            return self._gptq(x, scaling, hessian, axis, damp, order)
        if order is not None:
            raise ValueError(f"{self.name}: order= is a GPTQ option; pass a hessian too.")
        return _rtn(
            x,
            key,
            scale,
            fmt=self.format,
            scaling=scaling,
            calibration=self.calibration,
            rounding=self.rounding,
        )

    def _gptq(self, x, scaling, hessian, axis, damp, order) -> QArray:
        """GPTQ on the ``[K, rest]`` matrix view of the contracted axis, back in ``x``'s
        layout (codes and scales moved alike)."""
        if scaling.axis is None:
            raw = 0 if axis is None else axis
            raw = raw if isinstance(raw, (tuple, list)) else (raw,)
            if len(raw) != 1:
                raise ValueError(f"{self.name}: GPTQ contracts one axis, got axis={axis!r}.")
            k_axis = raw[0] % x.ndim
        elif isinstance(scaling.axis, tuple):
            raise ValueError(
                f"{self.name}: GPTQ needs the weight's contracted axes as one axis (merge them, "
                f"as layers do), got scales along axes {scaling.axis}."
            )
        else:
            k_axis = scaling.axis % x.ndim
        w2 = jnp.moveaxis(x, k_axis, 0)
        rest = w2.shape[1:]
        w2 = w2.reshape(w2.shape[0], -1)
        matrix_scaling = scaling if scaling.axis is None else dataclasses.replace(scaling, axis=0)
        q2 = gptq(
            w2, hessian, dataclasses.replace(self, scaling=matrix_scaling), damp=damp, order=order
        )
        if x.ndim == 2 and k_axis == 0:
            return q2
        return _from_matrix(q2, tuple(x.shape), k_axis, rest, scaling)

    def fake_quant(self, x, *, axis=None, learned=None, key=None) -> jax.Array:
        """Quantize-dequantize ``x``: the value ``quantize(x, ...).dequantize()`` with the
        clipped straight-through gradient, or with ``learned={'scale': s}`` LSQ's gradients
        (``fake_quant`` module)."""
        x = check_input(x)
        self.check_shape(x.shape, axis)
        scaling = self.scaling_for(x.ndim, axis)
        F.check_rounding(self.rounding, key)
        scale = _learned_scale(learned, self.name)
        if scale is None:
            return ste(x, self.format, scaling, self.calibration, self.rounding, key)
        if scaling.zero_point or scaling.split_sign or scaling.tensor_scale:
            raise ValueError(f"{self.name}: a learned scale needs a symmetric scaling.")
        return lsq(x, self.format, scaling, scale, self.rounding, key)

    @property
    def learned_names(self) -> tuple[str, ...]:
        return ("scale",) if self.qat == "lsq" else ()

    @property
    def needs_key(self) -> bool:
        return self.rounding == "stochastic"

    def init_learned(self, x, *, axis=None) -> dict[str, jax.Array]:
        """``{'scale': LSQ's initial scale}`` with ``qat='lsq'``, else ``{}``."""
        if self.qat != "lsq":
            return {}
        x = check_input(x)
        scaling = self.scaling_for(x.ndim, axis)
        return {"scale": lsq_init_scale(x, self.format, scaling)}


def _learned_scale(learned: Mapping | None, name: str):
    if not learned:
        return None
    extra = set(learned) - {"scale"}
    if extra:
        raise ValueError(f"{name}: learned={sorted(learned)}: a ScalarQuantizer learns 'scale'.")
    return jnp.asarray(learned["scale"])


# One compiled computation per (shape, recipe), eagerly or inside a caller's jit: eager
# op-by-op dispatch of the many small ops costs seconds per call.
@functools.partial(jax.jit, static_argnames=("fmt", "scaling", "calibration", "rounding"))
def _rtn(x, key, scale, *, fmt, scaling, calibration, rounding) -> QArray:
    view_shape, reduce_axes = scaling.block_view(x.shape)
    xv = x.astype(jnp.float32).reshape(view_shape)
    if scale is None:
        lo, hi, t = calibration_lib.calibrate(xv, reduce_axes, fmt, scaling, calibration)
        stored = scaling_lib.scales_from_range(lo, hi, fmt, scaling, t)
    else:
        stored = _given_scale(scale, x.shape, scaling, view_shape, reduce_axes)
    s = scaling_lib.effective_scale(stored, scaling)
    y = scaling_lib.divide(xv, s, stored.zero, scaling)
    codes = fmt.quantize_values(y, rounding, key).reshape(x.shape)
    scale_shape = scaling_lib.np_scale_shape(x.shape, scaling)
    zero = None if stored.zero is None else stored.zero.reshape(scale_shape)
    return QArray(
        codes=packing.pack(codes, fmt.bits),
        scale=stored.scale.reshape(scale_shape),
        shape=tuple(x.shape),
        dtype=np.dtype(x.dtype),
        format=fmt,
        scaling=scaling,
        zero=zero,
        tensor_scale=stored.tensor_scale,
    )


def _given_scale(scale, shape, scaling, view_shape, reduce_axes) -> scaling_lib.StoredScales:
    if scaling.zero_point or scaling.split_sign or scaling.tensor_scale:
        raise ValueError("a given (learned) scale: supported for symmetric scalings only.")
    if scaling.scale_dtype != "float32":
        raise ValueError(
            f"a given (learned) scale needs scale_dtype='float32', got {scaling.scale_dtype!r}."
        )
    expected = scaling.scale_shape(shape)
    if tuple(scale.shape) != expected:
        raise ValueError(f"learned scale: expected shape {expected}, got {tuple(scale.shape)}.")
    s = scaling_lib.broadcastable(scale.astype(jnp.float32), view_shape, reduce_axes, False)
    return scaling_lib.StoredScales(s, None, None)


@functools.partial(jax.jit, static_argnames=("shape", "axis", "rest", "scaling"))
def _from_matrix(q: QArray, shape, axis, rest, scaling) -> QArray:
    """A ``[K, prod(rest)]`` QArray with scales along axis 0 back in ``shape`` (K at ``axis``)
    with scales along ``axis``: codes, scales and zero points moved alike."""

    def move(a):
        return jnp.moveaxis(a.reshape((a.shape[0],) + rest), 0, axis)

    codes = move(packing.unpack(q.codes, q.format.bits, q.shape[-1]))
    one_scale = scaling.axis is None  # per tensor: [1, 1] stays [1, ..., 1]
    scale_shape = scaling_lib.np_scale_shape(shape, scaling)
    return QArray(
        codes=packing.pack(codes, q.format.bits),
        scale=q.scale.reshape(scale_shape) if one_scale else move(q.scale),
        shape=tuple(shape),
        dtype=q.dtype,
        format=q.format,
        scaling=scaling,
        zero=None
        if q.zero is None
        else (q.zero.reshape(scale_shape) if one_scale else move(q.zero)),
        tensor_scale=q.tensor_scale,
    )


def as_quantizer(spec, what: str = "quantizer") -> Quantizer:
    """A ``Quantizer`` from a quantizer, a registry name (``get_quantizer``), or a bare element
    ``Format`` (one scale per tensor)."""
    if isinstance(spec, Quantizer):
        return spec
    if isinstance(spec, str):
        return get_quantizer(spec)
    if isinstance(spec, F.Format):
        return ScalarQuantizer(spec)
    raise TypeError(
        f"{what}={spec!r}: expected a Quantizer (a preset such as INT4_G128, a ScalarQuantizer, "
        "a VectorQuantizer), a registry name ('int4_g128', 'e8p2_rht') or an element Format."
    )
