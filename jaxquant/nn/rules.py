"""Quantization rules: which layers are quantized, how, and in which mode.

Terminology:
  path:         a layer's place in the model, its scope names joined by ``/``
                (``decoder/layers_0/attn/query``).
  role:         what a layer is: ``'linear'`` (dense/einsum projections), ``'embedding'`` (a
                lookup table) or ``'head'`` (the output projection to the vocabulary). Rules
                touch only ``'linear'`` layers unless they name other roles, so embeddings and
                the head stay in float by default.
  contracting:  the axes of a weight (or activation) that a matmul sums over. Scales are shared
                along them: per-channel scaling shares over all of them, per-group scaling
                groups the last one, so one preset fits Dense, DenseGeneral and Einsum kernels.
  mode:         ``'float'`` (no quantization), ``'qat'`` (fake-quant weights and activations,
                straight-through gradients), ``'calibrate'`` (float compute; input statistics
                accumulate in ``'qstats'``), ``'freeze'`` (write each matched weight's QArray to
                ``'quant'``), ``'serve'`` (read weights from ``'quant'``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from jaxquant.numerics import Calibration, Format, Preset, Scaling
from jaxquant.numerics.formats import ROUNDINGS
from jaxquant.vq import VQ

MODES = ("float", "qat", "calibrate", "freeze", "serve")
ROLES = ("linear", "embedding", "head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorQuant:
    """How one tensor (a weight or an activation) is quantized.

    Attributes:
      format: an element format, a preset, or a ``jaxquant.vq.VQ`` recipe (vector
        quantization: weights only, contracted over the leading axes of their view).
      scaling: overrides the preset's scaling (its ``axis`` is replaced by the contracting axes
        of the tensor at hand; only ``None`` vs per-channel vs ``group_size`` matters).
      calibration: ``'absmax'``, ``'mse'``, ``'percentile'`` or a ``Calibration``.
      rounding: ``'nearest'``. (Stochastic rounding needs a key per call; layers do not draw one.)
      lsq: in QAT, learn the scale (LSQ) as a param ``<weight>_scale`` / ``input_scale``
        instead of calibrating it each step; freeze then quantizes with the learned scale.
    """

    format: Format | Preset | VQ
    scaling: Scaling | None = None
    calibration: str | Calibration = "absmax"
    rounding: str = "nearest"
    lsq: bool = False

    def __post_init__(self):
        if not isinstance(self.format, (Format, Preset, VQ)):
            raise TypeError(
                f"TensorQuant format={self.format!r}: expected a Format, a Preset or a VQ."
            )
        if isinstance(self.format, VQ) and (self.scaling is not None or self.lsq):
            raise ValueError(
                f"TensorQuant format={self.format.name}: a VQ recipe sets its own scales; "
                "scaling= and lsq=True do not apply."
            )
        if self.scaling is not None and not isinstance(self.scaling, Scaling):
            raise TypeError(f"TensorQuant scaling={self.scaling!r}: expected a Scaling or None.")
        if self.rounding not in ROUNDINGS or self.rounding == "stochastic":
            raise ValueError(
                f"TensorQuant rounding={self.rounding!r}: layers round to 'nearest' "
                "(stochastic rounding needs a PRNG key per call; use fake_quant directly)."
            )
        if not isinstance(self.calibration, (str, Calibration)):
            raise TypeError(
                f"TensorQuant calibration={self.calibration!r}: expected str/Calibration."
            )

    @property
    def name(self) -> str:
        return str(self.format)

    @property
    def is_vq(self) -> bool:
        return isinstance(self.format, VQ)

    def resolve(self, contracting: Sequence[int], ndim: int) -> tuple[Format, Scaling]:
        """(format, scaling) for a tensor of rank ``ndim`` contracted over ``contracting``."""
        if isinstance(self.format, Preset):
            fmt, base = self.format.format, self.format.scaling
        else:
            fmt, base = self.format, Scaling()
        scaling = self.scaling if self.scaling is not None else base
        if scaling.axis is None:
            return fmt, scaling
        axes = tuple(sorted(a % ndim for a in contracting))
        if not axes:
            raise ValueError(f"{self.name}: per-channel/group scaling needs contracting axes.")
        if scaling.group_size is not None:
            return fmt, dataclasses.replace(scaling, axis=axes[-1])
        return fmt, dataclasses.replace(scaling, axis=axes if len(axes) > 1 else axes[0])


def as_tensor_quant(spec) -> TensorQuant | None:
    if spec is None or isinstance(spec, TensorQuant):
        return spec
    if isinstance(spec, (Format, Preset, VQ)):
        return TensorQuant(format=spec)
    raise TypeError(f"expected a TensorQuant, Preset, Format, VQ or None, got {spec!r}.")


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """``QuantRule(path_regex, weight=..., act=...)``: layers whose path matches are quantized.

    ``re.search`` on the layer path; the first matching rule of a config wins. ``weight`` and
    ``act`` are a ``TensorQuant``, a preset or a format (or None to leave that tensor in float).
    ``roles`` limits the rule to those layer roles (default: linear layers only).
    """

    path: str
    weight: TensorQuant | Preset | Format | None = dataclasses.field(default=None, kw_only=True)
    act: TensorQuant | Preset | Format | None = dataclasses.field(default=None, kw_only=True)
    roles: tuple[str, ...] = dataclasses.field(default=("linear",), kw_only=True)

    def __post_init__(self):
        try:
            re.compile(self.path)
        except re.error as e:
            raise ValueError(
                f"QuantRule path={self.path!r} is not a regular expression: {e}"
            ) from None
        object.__setattr__(self, "weight", as_tensor_quant(self.weight))
        object.__setattr__(self, "act", as_tensor_quant(self.act))
        if self.act is not None and self.act.is_vq:
            raise ValueError(
                f"QuantRule({self.path!r}) act={self.act.name}: VQ recipes quantize weights, "
                "not activations."
            )
        roles = (self.roles,) if isinstance(self.roles, str) else tuple(self.roles)
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            raise ValueError(f"QuantRule roles={self.roles!r}: expected a subset of {ROLES}.")
        object.__setattr__(self, "roles", roles)

    def matches(self, path: str, role: str) -> bool:
        return role in self.roles and re.search(self.path, path) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """A mode and the rules, handed to every quantized layer of a model (hashable, static)."""

    mode: str = "float"
    rules: tuple[QuantRule, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"QuantConfig mode={self.mode!r}: expected one of {MODES}.")
        rules = tuple(self.rules)
        for r in rules:
            if not isinstance(r, QuantRule):
                raise TypeError(f"QuantConfig rules: expected QuantRule items, got {r!r}.")
        object.__setattr__(self, "rules", rules)

    def match(self, path: str, role: str = "linear") -> QuantRule | None:
        """The first rule that matches ``path`` and ``role``, or None."""
        for rule in self.rules:
            if rule.matches(path, role):
                return rule
        return None

    def with_mode(self, mode: str) -> QuantConfig:
        return dataclasses.replace(self, mode=mode)


def layer_path(module) -> str:
    """The ``/``-joined scope path of a bound Flax module."""
    return "/".join(str(p) for p in module.scope.path)
