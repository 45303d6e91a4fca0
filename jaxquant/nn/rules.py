"""Quantization rules: which layers are quantized, how, and in which mode.

Terminology:
  path:         a layer's place in the model, its scope names joined by ``/``
                (``decoder/layers_0/attn/query``).
  role:         what a layer is: ``'linear'`` (dense/einsum projections), ``'embedding'`` (a
                lookup table) or ``'head'`` (the output projection to the vocabulary). Rules
                touch only ``'linear'`` layers unless they name other roles, so embeddings and
                the head stay in float by default.
  quantizer:    how a tensor is quantized (``jaxquant.numerics.Quantizer``): a preset such as
                ``INT4_G128``, a ``ScalarQuantizer``, a ``VectorQuantizer``, or its registry name
                (``'int4_g128'``, ``'e8p2_rht'``). Its scales are shared along the axes the
                layer's matmul contracts, so one quantizer fits Dense, DenseGeneral and Einsum.
  mode:         ``'float'`` (no quantization), ``'qat'`` (fake-quant weights and activations,
                the quantizers' training gradients), ``'calibrate'`` (float compute; input
                statistics accumulate in ``'qstats'``), ``'serve'`` (weights read from the
                ``'quant'`` collection that ``freeze`` or ``quantize_model`` wrote).
"""

from __future__ import annotations

import dataclasses
import re

from jaxquant.numerics import Quantizer, as_quantizer
from jaxquant.numerics.training import TrainingRecipe, get_training_recipe

MODES = ("float", "qat", "calibrate", "serve")
ROLES = ("linear", "embedding", "head")


def _as_spec(spec, rule_path: str, tensor: str) -> Quantizer | None:
    if spec is None:
        return None
    q = as_quantizer(spec, f"QuantRule({rule_path!r}) {tensor}")
    if q.needs_key:
        raise ValueError(
            f"QuantRule({rule_path!r}) {tensor}={q.name}: stochastic rounding needs a PRNG key "
            "per call, which layers do not draw; use rounding='nearest' (or call fake_quant "
            "with a key yourself)."
        )
    return q


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """``QuantRule(path_regex, weight=..., act=...)``: layers whose path matches are quantized.

    ``re.search`` on the layer path; the first matching rule of a config wins.

    Attributes:
      path: a regular expression over layer paths.
      weight: the weight's quantizer (a ``Quantizer``, a registry name, or an element format
        for one scale per tensor), or None to leave the weight in float.
      act: the input activation's quantizer (scalar formats only), or None.
      train: a ``TrainingRecipe`` or its name (``'fp8'``, ``'fp8_delayed'``,
        ``'mxfp4_quartet'``, ``'nvfp4'``, ...): in qat mode the layer's matmul quantizes its
        forward and both backward products (``jaxquant.numerics.training``) instead of
        fake-quantizing ``weight`` and ``act`` (so it takes neither).
      roles: the layer roles the rule applies to (default: linear layers only).

    A rule with no weight, act or train quantizes nothing: it keeps the layers it matches in
    float (put it before a broader rule, e.g. to keep the last block of a model in high
    precision).
    """

    path: str
    weight: Quantizer | None = dataclasses.field(default=None, kw_only=True)
    act: Quantizer | None = dataclasses.field(default=None, kw_only=True)
    train: TrainingRecipe | None = dataclasses.field(default=None, kw_only=True)
    roles: tuple[str, ...] = dataclasses.field(default=("linear",), kw_only=True)

    def __post_init__(self):
        if not isinstance(self.path, str):
            raise TypeError(f"QuantRule path={self.path!r}: expected a regular expression string.")
        try:
            re.compile(self.path)
        except re.error as e:
            raise ValueError(
                f"QuantRule path={self.path!r} is not a regular expression: {e}"
            ) from None
        object.__setattr__(self, "weight", _as_spec(self.weight, self.path, "weight"))
        object.__setattr__(self, "act", _as_spec(self.act, self.path, "act"))
        if self.act is not None and not self.act.activations:
            raise ValueError(
                f"QuantRule({self.path!r}) act={self.act.name}: vector quantizers quantize "
                "weights, not activations."
            )
        if self.train is not None:
            object.__setattr__(self, "train", get_training_recipe(self.train))
            if self.weight is not None or self.act is not None:
                raise ValueError(
                    f"QuantRule({self.path!r}) train={self.train.name!r} quantizes the weight and "
                    "the input in all three products itself: drop weight= and act=."
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

    def match_index(self, path: str, role: str = "linear") -> int | None:
        """The index of the first rule that matches ``path`` and ``role``, or None."""
        for i, rule in enumerate(self.rules):
            if rule.matches(path, role):
                return i
        return None

    def match(self, path: str, role: str = "linear") -> QuantRule | None:
        """The first rule that matches ``path`` and ``role``, or None."""
        i = self.match_index(path, role)
        return None if i is None else self.rules[i]

    def with_mode(self, mode: str) -> QuantConfig:
        return dataclasses.replace(self, mode=mode)


def layer_path(module) -> str:
    """The ``/``-joined scope path of a bound Flax module."""
    return "/".join(str(p) for p in module.scope.path)
