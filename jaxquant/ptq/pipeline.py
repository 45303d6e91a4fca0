"""``quantize_model``: post-training quantization of a whole Linen model, block by block.

Terminology:
  block:     a module called once per forward pass that maps its first argument (the residual
             stream, the "hidden state") to an output of the same shape: a transformer layer.
             Blocks are found by a regex on module paths (``layers_\\d+`` by default).
  stage:     the unit GPTQ quantizes at once: the layers before the first block (prologue),
             each block, and the layers after the last block (epilogue).
  hidden:    the input of a block for each calibration batch, cached between stages.
  Hessian:   ``H = Σ x xᵀ`` of a layer's contracted input over the calibration tokens, gathered
             by the layer's ``'calibrate'`` mode (``jaxquant.nn``).

The pipeline (GPTQ's, arXiv:2210.17323 Sec. 5): the hidden states entering block ``i`` are
computed once, by block ``i − 1`` *already quantized* from its own cached input, and the
Hessians of block ``i``'s layers are gathered on them in the same pass; then block ``i``'s
layers are quantized from those Hessians. Each pass runs the model with an interceptor that
feeds the cached hidden state into block ``i − 1`` and skips every other block, so no block
is recomputed from the embedding, and XLA drops whatever the pass does not return.
Layers already quantized compute with their dequantized weights, exactly what serve mode
computes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxquant.nn import QuantConfig, QuantRule, freeze, intercept
from jaxquant.nn.freeze import FreezeReport
from jaxquant.nn.rules import layer_path
from jaxquant.numerics import Preset, QArray
from jaxquant.numerics.qarray import is_qarray
from jaxquant.ptq.gptq import gptq, layer_error
from jaxquant.ptq.havq import havq
from jaxquant.vq import VQArray
from pallas_kernels import packing

METHODS = ("gptq", "vq", "rtn")


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """One quantized weight: how, and its relative output error on the calibration inputs.

    ``error`` and ``rtn_error`` are ``tr(ΔᵀHΔ) / tr(WᵀHW)`` with the Hessian gathered on the
    inputs the layer sees in the quantized model (NaN where no Hessian exists, e.g. an
    embedding table, or with ``method='rtn'``).
    """

    path: str  # the weight's path in params, e.g. 'layers_0/attn/query/kernel'
    stage: str  # 'prologue', a block path, or 'epilogue'
    method: str  # 'gptq', 'havq' (VQ recipes), or 'rtn' (with the reason when GPTQ was asked for)
    format: str
    shape: tuple[int, ...]
    error: float
    rtn_error: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class PTQReport:
    """What ``quantize_model`` did: a row per weight and the sizes of the served model."""

    method: str
    layers: tuple[LayerResult, ...]
    freeze: FreezeReport  # sizes, bits per weight, unmatched rules (the same for every method)
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return self.freeze.bits_per_weight

    @property
    def model_bytes(self) -> int:
        return self.freeze.model_bytes

    def __str__(self) -> str:
        lines = [f"{'weight':<36} {'method':<6} {'format':<14} {'error':>9} {'rtn error':>10}"]
        for r in self.layers:
            lines.append(
                f"{r.path:<36} {r.method[:6]:<6} {r.format:<14} {r.error:9.5f} {r.rtn_error:10.5f}"
            )
        lines.append(
            f"{len(self.layers)} weights, {self.method}, {self.seconds:.1f} s; model "
            f"{self.model_bytes:,} bytes, {self.bits_per_weight:.3f} bits/param"
        )
        return "\n".join(lines)


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _has_quant_field(model) -> bool:
    return any(f.name == "quant" for f in dataclasses.fields(model))


def _apply(model, config: QuantConfig, variables, args, mutable):
    """``model.apply`` with ``config``: through its ``quant`` field, else ``intercept``."""
    if _has_quant_field(model):
        return model.clone(quant=config).apply(variables, *args, mutable=mutable)
    with intercept(config):
        return model.apply(variables, *args, mutable=mutable)


def _discover(model, params, args, block_regex: str):
    """Block paths in call order, and the first call index of every module path."""
    calls: list[str] = []
    blocks: list[str] = []
    mismatched: list[str] = []

    def recorder(next_fun, a, kw, ctx):
        if ctx.method_name != "__call__":
            return next_fun(*a, **kw)
        path = layer_path(ctx.module)
        calls.append(path)
        out = next_fun(*a, **kw)
        if path and re.fullmatch(block_regex, path):
            blocks.append(path)
            if (
                not a
                or jax.tree.structure(out) != jax.tree.structure(a[0])
                or any(
                    jnp.shape(o) != jnp.shape(i)
                    for o, i in zip(jax.tree.leaves(out), jax.tree.leaves(a[0]), strict=True)
                )
            ):
                mismatched.append(path)
        return out

    def run(params, args):
        with nn.intercept_methods(recorder):
            return _apply(model, QuantConfig(), {"params": params}, args, False)

    jax.eval_shape(run, params, args)
    repeated = sorted({b for b in blocks if blocks.count(b) > 1})
    if repeated:
        raise ValueError(
            f"quantize_model blocks={block_regex!r}: {repeated} are called more than once per "
            "pass; layer-sequential PTQ needs each block called once (not scanned or shared)."
        )
    if mismatched:
        raise ValueError(
            f"quantize_model blocks={block_regex!r}: {mismatched} do not return an output shaped "
            "like their first argument, so they cannot be skipped or fed a cached hidden state; "
            "pick the residual blocks with blocks=..."
        )
    first_call: dict[str, int] = {}
    for i, p in enumerate(calls):
        first_call.setdefault(p, i)
    return blocks, first_call


def _stage_of(layer: str, blocks: list[str], first_call: dict[str, int]) -> int:
    """-1 (prologue), a block index, or len(blocks) (epilogue)."""
    for i, b in enumerate(blocks):
        if layer == b or layer.startswith(b + "/"):
            return i
    if not blocks:
        return -1
    return -1 if first_call.get(layer, math.inf) < first_call[blocks[0]] else len(blocks)


def _to_matrix(w, axis: int):
    """``[..., K at axis, ...]`` -> ``[K, rest]``."""
    w = jnp.moveaxis(w, axis, 0)
    return w.reshape(w.shape[0], -1)


def _from_matrix(q: QArray, shape: tuple[int, ...], axis: int, scaling) -> QArray:
    """A ``[K, rest]`` QArray with scales along axis 0 back in ``shape`` with scales along
    ``axis`` (the layout ``quantize`` gives the weight's view): codes and scales moved alike."""
    rest = shape[:axis] + shape[axis + 1 :]

    def move(x):
        return jnp.moveaxis(x.reshape((x.shape[0],) + rest), 0, axis)

    codes = move(packing.unpack(q.codes, q.format.bits, q.shape[-1]))
    return QArray(
        codes=packing.pack(codes, q.format.bits),
        scale=move(q.scale),
        shape=tuple(shape),
        dtype=q.dtype,
        format=q.format,
        scaling=scaling,
        zero=None if q.zero is None else move(q.zero),
        tensor_scale=q.tensor_scale,
    )


def _gptq_unsupported(q: QArray) -> str | None:
    s = q.scaling
    if s.axis is None:
        return "per-tensor scale"
    if not isinstance(s.axis, int) and len(s.axis) != 1:
        return "scales over several axes"
    if s.split_sign:
        return "split-sign scales"
    return None


def quantize_model(
    model: nn.Module,
    params,
    calibration_batches: Iterable,
    rules,
    method: str = "gptq",
    *,
    blocks: str = r"layers_\d+",
    block_size: int = 128,
    damp: float = 0.01,
    order: str | None = None,
    progress: Callable[[int, int, LayerResult], None] | None = None,
    return_report: bool = False,
):
    """Quantizes every weight that ``rules`` match, with GPTQ layer-sequentially, or RTN.

    Args:
      model: a Linen model: built from jaxquant layers (with a ``quant`` field) or any model
        whose ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` layers ``intercept`` handles.
      params: its float 'params' collection (boxed or not).
      calibration_batches: model inputs, each an array or a tuple of positional arguments to
        ``model.apply`` (e.g. int32 ``[batch, seq]`` tokens). Read into a list once.
      rules: ``QuantRule``s, as for ``freeze`` (the first match wins).
      method: ``'gptq'`` or ``'vq'`` (the same layer-sequential pass: weights whose rule is a
        ``jaxquant.vq.VQ`` recipe get Hessian-aware VQ, ``havq``, the others GPTQ), or
        ``'rtn'`` (round to nearest: ``freeze``, no calibration needed; VQ recipes encode each
        vector to its nearest codeword).
      blocks: regex (full match) of the block paths, e.g. ``r'layers_\\d+'``; without a match
        the whole model is one stage (Hessians from the float model).
      block_size, damp: passed to ``gptq``.
      order: GPTQ's row order: None (input order), ``'act'`` (act-order: decreasing
        ``diag(H)``) or ``'babai'`` (``babai_order``); the last two fix group scales up front
        (``static_groups=True``).
      progress: called after each weight as ``progress(done, total, layer_result)``.
      return_report: also return a ``PTQReport``.

    Returns:
      The 'quant' collection (QArrays mirroring params, as ``freeze`` makes it; serve with
      ``{'params': serving_params(params, quant), 'quant': quant}`` and the model in
      ``'serve'`` mode), or ``(quant, report)`` with ``return_report``.
    """
    start_time = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"quantize_model method={method!r}: expected one of {METHODS}.")
    if order not in (None, "act", "babai"):
        raise ValueError(f"quantize_model order={order!r}: expected None, 'act' or 'babai'.")
    rules = tuple(rules)
    if not rules or not all(isinstance(r, QuantRule) for r in rules):
        raise ValueError(f"quantize_model rules={rules!r}: expected a non-empty list of QuantRule.")
    batches = [_as_args(b) for b in calibration_batches]
    if not batches:
        raise ValueError("quantize_model: calibration_batches is empty.")
    params = nn.unbox(params)
    quant_rtn, freeze_report = freeze(model, params, *batches[0], rules=rules)
    flat_rtn = traverse_util.flatten_dict(quant_rtn, sep="/", is_leaf=lambda _, x: is_qarray(x))
    if not flat_rtn:
        raise ValueError(f"quantize_model: no rule matched a layer of the model (rules {rules}).")
    config = QuantConfig(mode="calibrate", rules=rules)

    if method == "rtn":
        results = [
            LayerResult(
                p,
                "",
                "rtn",
                str(_rule_for(config, p).weight.format),
                tuple(q.shape),
                math.nan,
                math.nan,
                0.0,
            )
            for p, q in flat_rtn.items()
        ]
        for i, r in enumerate(results):
            if progress is not None:
                progress(i + 1, len(results), r)
        report = PTQReport("rtn", tuple(results), freeze_report, time.perf_counter() - start_time)
        return (quant_rtn, report) if return_report else quant_rtn

    block_paths, first_call = _discover(model, params, batches[0], blocks)
    num_blocks = len(block_paths)
    stage_names = {-1: "prologue", num_blocks: "epilogue"}
    stage_names.update(enumerate(block_paths))
    by_stage: dict[int, list[str]] = {}
    for path in flat_rtn:
        by_stage.setdefault(_stage_of(path.rsplit("/", 1)[0], block_paths, first_call), []).append(
            path
        )
    block_index = {b: i for i, b in enumerate(block_paths)}

    def make_pass(stage: int, layers: tuple[str, ...]):
        """(params_q, args, hidden in of block stage−1) -> (hidden in of block stage, stats)."""

        def run(params_q, args, hidden_prev):
            captured = {}

            def interceptor(next_fun, a, kw, ctx):
                if ctx.method_name != "__call__":
                    return next_fun(*a, **kw)
                j = block_index.get(layer_path(ctx.module))
                if j is None:
                    return next_fun(*a, **kw)
                if j == stage:
                    captured["hidden"] = a[0]
                if j < stage - 1 or j > stage:
                    return a[0]  # skipped: this pass needs neither its input nor its output
                if j == stage - 1:
                    a = (hidden_prev,) + tuple(a[1:])
                return next_fun(*a, **kw)

            with nn.intercept_methods(interceptor):
                _, state = _apply(model, config, {"params": params_q}, args, ["qstats"])
            flat = traverse_util.flatten_dict(nn.unbox(state.get("qstats", {})), sep="/")
            stats = {
                layer: flat[f"{layer}/hessian"] for layer in layers if f"{layer}/hessian" in flat
            }
            return captured.get("hidden"), stats

        return jax.jit(run)

    flat_params = traverse_util.flatten_dict(params, sep="/")
    params_q = dict(flat_params)  # quantized weights replaced by their dequantized values
    quant_flat = dict(flat_rtn)
    results: list[LayerResult] = []
    total = len(flat_rtn)
    hidden = [None] * len(batches)  # the input of block `stage - 1`, per batch
    for stage in range(-1 if -1 in by_stage else 0, num_blocks + (num_blocks in by_stage)):
        weights = by_stage.get(stage, [])
        layers = tuple(sorted({w.rsplit("/", 1)[0] for w in weights}))
        run = make_pass(stage, layers)
        unflat = traverse_util.unflatten_dict(params_q, sep="/")
        hessians: dict[str, jax.Array] = {}
        next_hidden = []
        for args, h_prev in zip(batches, hidden, strict=True):
            h_in, stats = run(unflat, args, h_prev)
            next_hidden.append(h_in)
            for layer, h in stats.items():
                hessians[layer] = h if layer not in hessians else hessians[layer] + h
        if 0 <= stage < num_blocks:
            hidden = next_hidden
        for path in weights:
            t0 = time.perf_counter()
            q_rtn = flat_rtn[path]
            layer = path.rsplit("/", 1)[0]
            rule = _rule_for(config, path)
            result_method, q, err, err_rtn = _quantize_weight(
                flat_params[path],
                q_rtn,
                hessians.get(layer),
                rule,
                path,
                block_size=block_size,
                damp=damp,
                order=order,
            )
            quant_flat[path] = q
            w = flat_params[path]
            params_q[path] = _dequantize_as(q, w.shape, w.dtype)
            result = LayerResult(
                path,
                stage_names[stage],
                result_method,
                str(rule.weight.format),
                tuple(q.shape),
                err,
                err_rtn,
                time.perf_counter() - t0,
            )
            results.append(result)
            if progress is not None:
                progress(len(results), total, result)
    quant = traverse_util.unflatten_dict(quant_flat, sep="/")
    report = PTQReport(method, tuple(results), freeze_report, time.perf_counter() - start_time)
    return (quant, report) if return_report else quant


def _havq_weight(w, q_rtn: VQArray, hessian, path: str, damp: float):
    """(method, VQArray, error, rtn error) by Hessian-aware VQ of the weight's matrix view."""
    k, n = q_rtn.matrix_shape
    if hessian.shape != (k, k):
        raise ValueError(
            f"quantize_model: the Hessian of {path} is {hessian.shape}, but the weight's "
            f"contracted size is {k} (its view {q_rtn.shape})."
        )
    w2 = w.astype(jnp.float32).reshape(k, n)
    q2 = havq(w2, hessian, q_rtn.recipe, damp=damp)
    q = q2.replace(shape=tuple(q_rtn.shape), dtype=q_rtn.dtype)
    err, err_rtn = _vq_errors(w2, q2, q_rtn, hessian)
    return "havq", q, float(err), float(err_rtn)


@jax.jit
def _vq_errors(w2, q2, q_rtn, hessian):
    rtn = q_rtn.dequantize(jnp.float32).reshape(w2.shape)
    return layer_error(w2, q2, hessian), layer_error(w2, rtn, hessian)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _dequantize_as(q: QArray, shape, dtype):
    return q.dequantize(jnp.float32).reshape(shape).astype(dtype)


def _rule_for(config: QuantConfig, path: str) -> QuantRule:
    layer = path.rsplit("/", 1)[0]
    for role in ("linear", "head", "embedding"):
        rule = config.match(layer, role)
        if rule is not None:
            return rule
    raise AssertionError(f"no rule matches {layer}, which freeze quantized")


@functools.partial(jax.jit, static_argnames=("axis",))
def _matrix_and_rtn_error(w, q_rtn: QArray, hessian, axis: int):
    wv = w.astype(jnp.float32).reshape(q_rtn.shape)
    w2 = _to_matrix(wv, axis)
    return w2, layer_error(w2, _to_matrix(q_rtn.dequantize(jnp.float32), axis), hessian)


@functools.partial(jax.jit, static_argnames=("shape", "axis", "scaling", "dtype"))
def _finish(q2: QArray, w2, hessian, shape, axis, scaling, dtype):
    """(the QArray in the weight's view layout, its layer error)."""
    q = _from_matrix(q2, shape, axis, scaling).replace(dtype=dtype)
    return q, layer_error(w2, q2, hessian)


def _quantize_weight(w, q_rtn: QArray, hessian, rule: QuantRule, path: str, **gptq_kwargs):
    """(method, QArray, error, rtn error) of one weight given its stage's Hessian."""
    if hessian is None:
        return "rtn (no Hessian)", q_rtn, math.nan, math.nan
    if isinstance(q_rtn, VQArray):
        return _havq_weight(w, q_rtn, hessian, path, gptq_kwargs["damp"])
    reason = _gptq_unsupported(q_rtn)
    scaling = q_rtn.scaling
    axis = scaling.axis if isinstance(scaling.axis, int) else (scaling.axis or (0,))[0]
    k = q_rtn.shape[axis]
    if hessian.shape != (k, k):
        raise ValueError(
            f"quantize_model: the Hessian of {path} is {hessian.shape}, but the weight's "
            f"contracted size is {k} (its view {q_rtn.shape}, scales along axis {axis}); the "
            "layer's input and weight contracting axes do not correspond."
        )
    w2, err_rtn = _matrix_and_rtn_error(w, q_rtn, hessian, axis)
    if reason is not None:
        return f"rtn ({reason})", q_rtn, float(err_rtn), float(err_rtn)
    preset = Preset(str(rule.weight.format), q_rtn.format, dataclasses.replace(scaling, axis=0))
    order = gptq_kwargs.pop("order")
    q2 = gptq(
        w2,
        hessian,
        preset,
        calibration=rule.weight.calibration,
        act_order=order == "act",
        order="babai" if order == "babai" else None,
        static_groups=order is not None,
        **gptq_kwargs,
    )
    q, err = _finish(q2, w2, hessian, tuple(q_rtn.shape), axis, scaling, q_rtn.dtype)
    return "gptq", q, float(err), float(err_rtn)
