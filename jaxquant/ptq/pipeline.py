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

import functools
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.errors import ScopeParamShapeError

from jaxquant.nn import (
    QuantConfig,
    QuantReport,
    WeightReport,
    apply_with_config,
    layer_infos,
    quantize_weight,
)
from jaxquant.nn.freeze import learned_params, make_report, rules_of, weight_report
from jaxquant.nn.intercept import probing, reuse_probes
from jaxquant.nn.rules import layer_path
from jaxquant.numerics import layer_error


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _discover(model, params, args, block_regex: str):
    """Block paths in call order, and the first call index of every module path."""
    calls: list[str] = []
    blocks: list[str] = []
    mismatched: list[str] = []

    def recorder(next_fun, a, kw, ctx):
        if ctx.method_name != "__call__" or probing():
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
            return apply_with_config(
                model, QuantConfig(), {"params": params}, *args, check_rules=False
            )

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


def quantize_model(
    model: nn.Module,
    params,
    calibration_batches: Iterable,
    rules=None,
    *,
    blocks: str = r"layers_\d+",
    damp: float = 0.01,
    order: str | None = None,
    progress: Callable[[int, int, WeightReport], None] | None = None,
) -> tuple[dict, QuantReport]:
    """Quantizes every weight that ``rules`` match from the Hessians of its inputs, block by
    block: GPTQ for scalar formats, block LDLQ for vector ones (each quantizer's choice).

    Args:
      model: a Linen model: built from jaxquant layers (with a ``quant`` field) or any model
        whose ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` layers ``intercept`` handles.
      params: its float 'params' collection (boxed or not).
      calibration_batches: model inputs, each an array or a tuple of positional arguments to
        ``model.apply`` (e.g. int32 ``[batch, seq]`` tokens). Read into a list once.
      rules: ``QuantRule``s, as for ``freeze`` (default: the model's ``quant.rules``).
      blocks: regex (full match) of the block paths, e.g. ``r'layers_\\d+'``; without a match
        the whole model is one stage (Hessians from the float model).
      damp: the Hessian's relative damping (``numerics.damp_hessian``).
      order: GPTQ's row order: None (input order), ``'act'`` (act-order: decreasing
        ``diag(H)``) or ``'babai'`` (``numerics.babai_order``); the last two fix group scales
        up front. Vector quantizers take None only.
      progress: called after each weight as ``progress(done, total, weight_report)``.

    Returns:
      ``(quant, report)``: the 'quant' collection (quantized tensors mirroring params, as
      ``freeze`` makes it; serve with ``{'params': serving_params(params, quant), 'quant':
      quant}`` and the model in ``'serve'`` mode) and a ``QuantReport`` whose rows carry each
      weight's output error and its round-to-nearest error on the calibration inputs. A weight
      without an input Hessian (an embedding table, a batched contraction) is rounded to
      nearest, with a warning naming it.
    """
    with reuse_probes():  # every pass traces the same model: its structure is probed once
        return _quantize_model(
            model, params, calibration_batches, rules, blocks, damp, order, progress
        )


def _quantize_model(model, params, calibration_batches, rules, blocks, damp, order, progress):
    start_time = time.perf_counter()
    if order not in (None, "act", "babai"):
        raise ValueError(f"quantize_model order={order!r}: expected None, 'act' or 'babai'.")
    rules = rules_of(model, rules, "quantize_model")
    if not rules:
        raise ValueError("quantize_model rules: expected at least one QuantRule.")
    batches = [_as_args(b) for b in calibration_batches]
    if not batches:
        raise ValueError("quantize_model: calibration_batches is empty.")
    params = nn.unbox(params)
    infos = layer_infos(model, params, *batches[0], rules=rules)
    todo = [i for i in infos if i.rule is not None and rules[i.rule].weight is not None]
    if not todo:
        raise ValueError(f"quantize_model: no rule matched a layer of the model (rules {rules}).")
    config = QuantConfig(mode="calibrate", rules=rules)

    block_paths, first_call = _discover(model, params, batches[0], blocks)
    num_blocks = len(block_paths)
    stage_names = {-1: "prologue", num_blocks: "epilogue"}
    stage_names.update(enumerate(block_paths))
    by_stage: dict[int, list] = {}
    for info in todo:
        by_stage.setdefault(_stage_of(info.path, block_paths, first_call), []).append(info)
    block_index = {b: i for i, b in enumerate(block_paths)}

    def make_pass(stage: int, layers: tuple[str, ...]):
        """(params_q, args, hidden in of block stage−1) -> (hidden in of block stage, stats)."""

        def run(params_q, args, hidden_prev):
            captured = {}

            def interceptor(next_fun, a, kw, ctx):
                if ctx.method_name != "__call__" or probing():
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
                _, state = apply_with_config(
                    model,
                    config,
                    {"params": params_q},
                    *args,
                    check_rules=False,
                    mutable=["qstats"],
                )
            flat = traverse_util.flatten_dict(nn.unbox(state.get("qstats", {})), sep="/")
            keys = {layer: f"{layer}/hessian" if layer else "hessian" for layer in layers}
            stats = {layer: flat[key] for layer, key in keys.items() if key in flat}
            return captured.get("hidden"), stats

        return jax.jit(run)

    flat_params = traverse_util.flatten_dict(params, sep="/")
    params_q = dict(flat_params)  # quantized weights replaced by their dequantized values
    quant_flat: dict = {}
    rows: list[WeightReport] = []
    no_hessian: list[str] = []
    hidden = [None] * len(batches)  # the input of block `stage - 1`, per batch
    for stage in range(-1 if -1 in by_stage else 0, num_blocks + (num_blocks in by_stage)):
        stage_infos = by_stage.get(stage, [])
        layers = tuple(sorted({info.path for info in stage_infos}))
        run = make_pass(stage, layers)
        unflat = traverse_util.unflatten_dict(params_q, sep="/")
        hessians: dict[str, jax.Array] = {}
        next_hidden = []
        for b, (args, h_prev) in enumerate(zip(batches, hidden, strict=True)):
            try:
                h_in, stats = run(unflat, args, h_prev)
            except ScopeParamShapeError as e:
                raise ValueError(
                    f"quantize_model: calibration batch {b} (shapes "
                    f"{jax.tree.map(jnp.shape, args)}) does not fit the params: {e}"
                ) from e
            next_hidden.append(h_in)
            for layer, h in stats.items():
                hessians[layer] = h if layer not in hessians else hessians[layer] + h
        if 0 <= stage < num_blocks:
            hidden = next_hidden
        for info in stage_infos:
            t0 = time.perf_counter()
            quantizer = rules[info.rule].weight
            w = flat_params[info.param_path]
            learned = learned_params(flat_params, info, quantizer)
            q_rtn = quantize_weight(w, info, quantizer, learned=learned)
            h = hessians.get(info.path) if info.hessian else None
            if h is None:
                q, method, err, err_rtn = q_rtn, "rtn", math.nan, math.nan
                no_hessian.append(info.param_path)
            else:
                _check_hessian_size(h, info)
                if not bool(jnp.all(jnp.isfinite(h))):
                    raise ValueError(
                        f"quantize_model: the calibration inputs of {info.path} contain NaN or "
                        "Inf (its input Hessian is not finite): check the calibration batches "
                        "and the float model's activations."
                    )
                q = quantize_weight(w, info, quantizer, hessian=h, damp=damp, order=order)
                method = quantizer.hessian_method
                err, err_rtn = (float(e) for e in _errors(w, q, q_rtn, h, info.axis[0]))
            quant_flat[info.param_path] = q
            params_q[info.param_path] = _dequantize_as(q, tuple(w.shape), w.dtype)
            row = weight_report(
                info,
                rules,
                q,
                method,
                stage=stage_names[stage],
                error=err,
                rtn_error=err_rtn,
                seconds=time.perf_counter() - t0,
            )
            rows.append(row)
            if progress is not None:
                progress(len(rows), len(todo), row)
    if no_hessian:
        warnings.warn(
            f"quantize_model: no input Hessian for {no_hessian} (an embedding lookup or a "
            "batched contraction); rounded to nearest instead.",
            stacklevel=2,
        )
    report = make_report(
        rows, infos, rules, flat_params, quant_flat, seconds=time.perf_counter() - start_time
    )
    return traverse_util.unflatten_dict(quant_flat, sep="/"), report


def _check_hessian_size(h, info) -> None:
    k = math.prod(info.view_shape[a] for a in info.axis)
    if h.shape != (k, k):
        raise ValueError(
            f"quantize_model: the Hessian of {info.path} is {h.shape}, but the weight's "
            f"contracted size is {k} (its view {info.view_shape}, contracted axes {info.axis}); "
            "the layer's input and weight contracted axes do not correspond."
        )


def _matrix(x, axis: int):
    """``[..., K at axis, ...]`` -> ``[K, rest]``."""
    x = jnp.moveaxis(x, axis, 0)
    return x.reshape(x.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("axis",))
def _errors(w, q, q_rtn, hessian, axis: int):
    """(layer error of ``q``, of ``q_rtn``) in the weight's view, contracted ``axis`` first."""
    w2 = _matrix(w.astype(jnp.float32).reshape(q.shape), axis)
    return (
        layer_error(w2, _matrix(q.dequantize(jnp.float32), axis), hessian),
        layer_error(w2, _matrix(q_rtn.dequantize(jnp.float32), axis), hessian),
    )


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _dequantize_as(q, shape, dtype):
    return q.dequantize(jnp.float32).reshape(shape).astype(dtype)
