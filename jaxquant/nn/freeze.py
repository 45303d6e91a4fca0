"""freeze: float params to a 'quant' collection of quantized tensors, and the report of it.

``freeze`` traces the model once (shapes only) to learn, from each layer itself, which weights
its rules quantize, in which view and along which contracted axes (``layer_infos``), then
quantizes each weight with its rule's quantizer (``quantize_weight``: round to nearest, with
the scale or codebook QAT learned). The 'quant' collection mirrors 'params'; serve with
``{'params': serving_params(params, quant), 'quant': quant}`` and the model in ``'serve'`` mode.
``jaxquant.ptq.quantize_model`` does the same with the Hessians of calibration inputs.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.errors import ScopeParamShapeError

from jaxquant.nn import ops
from jaxquant.nn.intercept import apply_with_config, find_stacklevel, has_quant_field
from jaxquant.nn.rules import QuantConfig, QuantRule
from jaxquant.numerics import Quantizer, is_quantized


def layer_infos(model: nn.Module, params, *args, rules=(), **kwargs) -> tuple[ops.LayerInfo, ...]:
    """Every quantizable weight of ``model`` as its layer sees it, in call order (shapes only:
    the model is traced, not run).

    Args:
      model: any Linen model (jaxquant layers, or plain Flax layers through ``intercept``).
      params: its 'params' (arrays or ``jax.ShapeDtypeStruct``s, boxed or not).
      *args, **kwargs: a sample input for ``model.apply``.
      rules: ``QuantRule``s, for each ``LayerInfo.rule``.

    Returns:
      One ``LayerInfo`` per weight (a layer called several times appears once).
    """
    config = QuantConfig(rules=tuple(rules))

    def run(params):
        apply_with_config(model, config, {"params": params}, *args, check_rules=False, **kwargs)

    with ops.record_layers() as recorded:
        try:
            jax.eval_shape(run, nn.unbox(params))
        except ScopeParamShapeError as e:
            shapes = jax.tree.map(jnp.shape, (args, kwargs))
            raise ValueError(
                f"the sample/calibration input (shapes {shapes}) does not fit the params: "
                f"{e}. Pass inputs shaped as in training."
            ) from e
    infos: dict[str, ops.LayerInfo] = {}
    for info in recorded:
        seen = infos.setdefault(info.param_path, info)
        if seen != info:
            raise ValueError(
                f"layer {info.path} is called with different shapes ({seen.shape} and "
                f"{info.shape}); a weight has one quantized layout."
            )
    return tuple(infos.values())


def quantize_weight(
    w,
    info: ops.LayerInfo,
    quantizer: Quantizer,
    *,
    learned=None,
    hessian=None,
    damp: float = 0.01,
    order=None,
):
    """One weight quantized in its layer's view, along the axes its matmul contracts.

    Args:
      w: the float param, of ``info.shape``.
      info: its ``LayerInfo``.
      quantizer: the rule's weight quantizer.
      learned: the quantizer's parameters from QAT (``{'scale': ...}``, ``{'codebook': ...}``).
      hessian: the Hessian of the layer's inputs over the contracted axes (Hessian-aware).
      damp, order: passed to ``quantizer.quantize``.

    Returns:
      A ``QuantizedTensor`` of ``info.view_shape``.
    """
    w = jnp.asarray(w)
    if tuple(w.shape) != info.shape:
        raise ValueError(
            f"{info.param_path}: the param has shape {tuple(w.shape)} but its layer computes "
            f"with {info.shape} (a layer under nn.scan/nn.vmap holds stacked weights, which "
            "freeze does not quantize yet)."
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = quantizer.quantize(
                w.reshape(info.view_shape),
                axis=info.axis,
                hessian=hessian,
                learned=learned,
                damp=damp,
                order=order,
            )
    except ValueError as e:
        raise ValueError(f"{info.param_path} ({quantizer.name}): {e}") from e
    for warning in caught:  # said again, naming the weight
        warnings.warn(
            f"{info.param_path} ({quantizer.name}): {warning.message}",
            warning.category,
            stacklevel=find_stacklevel(),
        )
    return q


@dataclasses.dataclass(frozen=True)
class WeightReport:
    """How one weight was quantized.

    ``error`` and ``rtn_error`` are ``tr(ΔᵀHΔ) / tr(WᵀHW)`` with the Hessian gathered on the
    inputs the layer sees in the quantized model (``quantize_model``), NaN without one.
    """

    path: str  # the weight's path in params, e.g. 'layers_0/attn/query/kernel'
    rule: str  # the path regex of the rule that matched
    quantizer: str  # the rule's quantizer, by name
    shape: tuple[int, ...]  # as stored (the layer's view)
    bits_per_weight: float
    nbytes: int
    method: str  # 'rtn', or the quantizer's Hessian-aware method ('gptq', 'havq')
    stage: str = ""  # quantize_model's stage: 'prologue', a block path, or 'epilogue'
    error: float = math.nan
    rtn_error: float = math.nan
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """What ``freeze`` or ``quantize_model`` did: a row per quantized weight, the rules that
    matched nothing, and the sizes of the served model."""

    weights: tuple[WeightReport, ...]
    unmatched_rules: tuple[QuantRule, ...]
    float_heads: tuple[str, ...]  # head weights a rule would match but for their role
    float_params: int  # parameters left in float
    float_bytes: int
    quant_params: int  # parameters stored quantized
    quant_bytes: int
    seconds: float = 0.0

    @property
    def model_bytes(self) -> int:
        return self.float_bytes + self.quant_bytes

    @property
    def bits_per_weight(self) -> float:
        """Bits per parameter of the whole served model, float leftovers included."""
        return 8 * self.model_bytes / max(1, self.float_params + self.quant_params)

    def __str__(self) -> str:
        path_w = max([36] + [len(r.path) for r in self.weights])
        q_w = max([16] + [len(r.quantizer) for r in self.weights])
        lines = [
            f"{'weight':<{path_w}} {'quantizer':<{q_w}} {'shape':<14} {'bits/w':>7} "
            f"{'bytes':>10} {'method':<6} {'error':>9} {'rtn error':>10}"
        ]
        for r in self.weights:
            lines.append(
                f"{r.path:<{path_w}} {r.quantizer:<{q_w}} {str(r.shape):<14} "
                f"{r.bits_per_weight:7.3f} {r.nbytes:>10,} {r.method:<6} {r.error:9.5f} "
                f"{r.rtn_error:10.5f}"
            )
        lines.append(
            f"quantized: {self.quant_params:,} params in {self.quant_bytes:,} bytes; float: "
            f"{self.float_params:,} params in {self.float_bytes:,} bytes; model: "
            f"{self.model_bytes:,} bytes, {self.bits_per_weight:.3f} bits/param; "
            f"{self.seconds:.1f} s"
        )
        for path in self.float_heads:
            lines.append(f"head kept in float: {path} (a rule with roles=('head',) quantizes it)")
        for rule in self.unmatched_rules:
            lines.append(f"rule matched nothing: QuantRule({rule.path!r})")
        return "\n".join(lines)


def serving_params(params, quant):
    """``params`` without the float weights that ``quant`` replaces (what serve mode reads)."""
    frozen = set(traverse_util.flatten_dict(quant, sep="/", is_leaf=_is_quantized))
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in frozen}, sep="/")


def _is_quantized(_, x) -> bool:  # traverse_util's is_leaf signature
    return is_quantized(x)


def rules_of(model: nn.Module, rules, fn: str) -> tuple[QuantRule, ...]:
    """``rules`` as a tuple, or the model's own (``model.quant.rules``) when None."""
    if rules is None:
        if not has_quant_field(model) or model.quant is None:
            raise ValueError(
                f"{fn}: pass rules=..., the model has no quant config to take them from."
            )
        rules = model.quant.rules
    rules = tuple(rules)
    if not all(isinstance(r, QuantRule) for r in rules):
        raise TypeError(f"{fn} rules={rules!r}: expected QuantRule items.")
    return rules


def learned_params(flat_params, info: ops.LayerInfo, quantizer: Quantizer) -> dict | None:
    """The quantizer's parameters QAT learned for this weight (``<weight>_<name>`` in params)."""
    out = {}
    for key in quantizer.learned_names:
        path = f"{info.param_path}_{key}"
        if path not in flat_params:
            raise ValueError(
                f"{info.param_path}: its quantizer {quantizer.name} learns {key!r} in QAT, but "
                f"params has no {path!r}: train with the rule in QAT mode first."
            )
        out[key] = flat_params[path]
    return out or None


def freeze(model: nn.Module, params, *args, rules=None, **kwargs):
    """Quantizes the weights that ``rules`` match, rounding to nearest (with the scales or
    codebooks QAT learned, where the quantizer learns them).

    Args:
      model: a Linen model; jaxquant layers take the rules from its ``quant`` field, plain
        Flax layers are intercepted.
      params: the float 'params' collection (boxed or not).
      *args, **kwargs: a sample input for ``model.apply`` (any values, the shapes of real use).
      rules: a sequence of ``QuantRule`` (default: the model's ``quant.rules``).

    Returns:
      ``(quant, report)``: the 'quant' collection (quantized tensors mirroring params, each in
      its layer's view) and a ``QuantReport``.
    """
    start = time.perf_counter()
    rules = rules_of(model, rules, "freeze")
    params = nn.unbox(params)
    infos = layer_infos(model, params, *args, rules=rules, **kwargs)
    flat = traverse_util.flatten_dict(params, sep="/")
    quant, rows = {}, []
    for info in infos:
        quantizer = None if info.rule is None else rules[info.rule].weight
        if quantizer is None:
            continue
        if info.param_path not in flat:
            raise ValueError(f"freeze: params has no {info.param_path!r}, which a rule matches.")
        learned = learned_params(flat, info, quantizer)
        q = quantize_weight(flat[info.param_path], info, quantizer, learned=learned)
        quant[info.param_path] = q
        rows.append(weight_report(info, rules, q, "rtn"))
    report = make_report(rows, infos, rules, flat, quant, seconds=time.perf_counter() - start)
    return traverse_util.unflatten_dict(quant, sep="/"), report


def weight_report(info: ops.LayerInfo, rules, q, method: str, **kw) -> WeightReport:
    rule = rules[info.rule]
    return WeightReport(
        path=info.param_path,
        rule=rule.path,
        quantizer=rule.weight.name,
        shape=tuple(q.shape),
        bits_per_weight=q.bits_per_weight,
        nbytes=q.nbytes,
        method=method,
        **kw,
    )


def _nbytes(x) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def make_report(rows, infos, rules, flat_params, flat_quant, *, seconds: float) -> QuantReport:
    """The ``QuantReport`` of ``flat_quant`` (path -> quantized tensor) replacing params."""
    used = {info.rule for info in infos if info.rule is not None}
    float_leaves = [v for k, v in flat_params.items() if k not in flat_quant]
    heads = tuple(
        info.param_path
        for info in infos
        if info.role == "head"
        and info.param_path not in flat_quant
        and any(r.weight is not None and r.matches(info.path, "linear") for r in rules)
    )
    return QuantReport(
        weights=tuple(rows),
        unmatched_rules=tuple(r for i, r in enumerate(rules) if i not in used),
        float_heads=heads,
        float_params=sum(math.prod(v.shape) for v in float_leaves),
        float_bytes=sum(_nbytes(v) for v in float_leaves),
        quant_params=sum(q.size for q in flat_quant.values()),
        quant_bytes=sum(q.nbytes for q in flat_quant.values()),
        seconds=seconds,
    )
