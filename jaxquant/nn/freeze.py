"""freeze: float params to a 'quant' collection of QArrays; intercept: quantize foreign models.

``freeze`` runs the model once in ``'freeze'`` mode (on any sample input: weights do not
depend on it), so every layer quantizes its own weight along its own contracting axes, exactly
as QAT fake-quantized it. Models built from jaxquant layers take the mode through their
``quant`` field; any other Linen model is frozen through ``intercept``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jaxquant.nn import layers
from jaxquant.nn.rules import QuantConfig, QuantRule
from jaxquant.numerics.qarray import is_qarray

_Q_LAYERS = (layers.QDense, layers.QDenseGeneral, layers.QEinsum, layers.QEmbed)


@contextlib.contextmanager
def intercept(config: QuantConfig):
    """Quantizes plain ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` layers of any Linen model.

    Inside the context, their ``__call__`` runs jaxquant's implementation with ``config`` (the
    same params, names and shapes; plus 'qstats'/'quant' per mode). Enter it inside the function
    you jit, so that the traced computation is the quantized one.

    Example:
      >>> with intercept(QuantConfig(mode="qat", rules=(QuantRule(".*", weight=INT8),))):
      ...     y = model.apply(variables, x)
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or isinstance(module, _Q_LAYERS):
            return next_fun(*args, **kwargs)
        if isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return layers.dense_general(module, *args, config=config, **kwargs)
        if isinstance(module, nn.Einsum):
            einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
            return layers.einsum(module, args[0], einsum_str, config)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _has_quant_field(model) -> bool:
    return any(f.name == "quant" for f in dataclasses.fields(model))


@dataclasses.dataclass(frozen=True)
class LayerRow:
    path: str
    rule: str  # the path regex of the rule that matched
    format: str
    shape: tuple[int, ...]
    bits_per_weight: float
    nbytes: int


@dataclasses.dataclass(frozen=True)
class FreezeReport:
    """What freeze did: one row per quantized weight, the rules that matched nothing, sizes."""

    layers: tuple[LayerRow, ...]
    unmatched_rules: tuple[QuantRule, ...]
    float_params: int  # parameters left in float
    float_bytes: int
    quant_params: int  # parameters stored as QArrays
    quant_bytes: int

    @property
    def model_bytes(self) -> int:
        return self.float_bytes + self.quant_bytes

    @property
    def bits_per_weight(self) -> float:
        """Bits per parameter of the whole served model, float leftovers included."""
        return 8 * self.model_bytes / max(1, self.float_params + self.quant_params)

    def __str__(self) -> str:
        lines = [
            f"{'layer':<40} {'rule':<20} {'format':<16} {'shape':<14} {'bits/w':>7} {'bytes':>10}"
        ]
        for r in self.layers:
            lines.append(
                f"{r.path:<40} {r.rule:<20} {r.format:<16} {str(r.shape):<14} "
                f"{r.bits_per_weight:7.3f} {r.nbytes:>10,}"
            )
        lines.append(
            f"quantized: {self.quant_params:,} params in {self.quant_bytes:,} bytes; float: "
            f"{self.float_params:,} params in {self.float_bytes:,} bytes; model: "
            f"{self.model_bytes:,} bytes, {self.bits_per_weight:.3f} bits/param"
        )
        for rule in self.unmatched_rules:
            lines.append(f"rule matched nothing: QuantRule({rule.path!r})")
        return "\n".join(lines)


def serving_params(params, quant):
    """``params`` without the float weights that ``quant`` replaces (what serve mode reads)."""
    frozen = set(traverse_util.flatten_dict(quant, sep="/", is_leaf=_is_qarray))
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in frozen}, sep="/")


def _is_qarray(_, x) -> bool:  # traverse_util's is_leaf signature
    return is_qarray(x)


def _nbytes(x) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def freeze(model: nn.Module, params, *args, rules=None, **kwargs):
    """Quantizes the weights that ``rules`` match (RTN with each rule's calibration).

    Args:
      model: a Linen module; jaxquant layers take the mode from its ``quant`` field (the model
        must have one), plain Flax layers are intercepted.
      params: the float 'params' collection.
      *args, **kwargs: a sample input for ``model.apply`` (any values, the shapes of real use).
      rules: a sequence of ``QuantRule`` (default: the model's ``quant.rules``).

    Returns:
      ``(quant, report)``: the 'quant' collection (a dict of QArrays mirroring params) and a
      ``FreezeReport``. Serve with ``{'params': serving_params(params, quant), 'quant': quant}``
      and the model in ``'serve'`` mode.
    """
    if rules is None:
        if not _has_quant_field(model) or model.quant is None:
            raise ValueError(
                "freeze: pass rules=..., the model has no quant config to take them from."
            )
        rules = model.quant.rules
    config = QuantConfig(mode="freeze", rules=tuple(rules))

    # One compiled pass (the sample input's values do not matter), not eager per-op dispatch.
    @jax.jit
    def frozen(params, args):
        variables = {"params": params}
        if _has_quant_field(model):
            m = model.clone(quant=config)
            _, state = m.apply(variables, *args, mutable=["quant"], **kwargs)
        else:
            with intercept(config):
                _, state = model.apply(variables, *args, mutable=["quant"], **kwargs)
        return state.get("quant", {})

    quant = frozen(params, args)
    return quant, _report(params, quant, config)


def _report(params, quant, config: QuantConfig) -> FreezeReport:
    flat_q = traverse_util.flatten_dict(quant, sep="/", is_leaf=_is_qarray)
    used = set()
    rows = []
    for path, q in flat_q.items():
        layer = path.rsplit("/", 1)[0]
        role = "embedding" if path.endswith("embedding") else None
        for r in ("linear", "head") if role is None else (role,):
            rule = config.match(layer, r)
            if rule is not None:
                used.add(config.rules.index(rule))
                break
        rows.append(
            LayerRow(
                path,
                "" if rule is None else rule.path,
                q.format.name if rule is None else str(rule.weight.format),
                tuple(q.shape),
                q.bits_per_weight,
                q.nbytes,
            )
        )
    flat_p = traverse_util.flatten_dict(params, sep="/")
    float_leaves = [v for k, v in flat_p.items() if k not in flat_q]
    return FreezeReport(
        layers=tuple(rows),
        unmatched_rules=tuple(r for i, r in enumerate(config.rules) if i not in used),
        float_params=sum(math.prod(v.shape) for v in float_leaves),
        float_bytes=sum(_nbytes(v) for v in float_leaves),
        quant_params=sum(q.size for q in flat_q.values()),
        quant_bytes=sum(q.nbytes for q in flat_q.values()),
    )
