"""What every quantized layer shares: the weight per mode, input statistics, activation
quantization, and the record of which rule quantizes which weight.

A layer (ours, or a plain Flax one under ``intercept``) describes its matmul as a
``Contraction`` (``layers``); ``quantized_call`` then runs it per the config's mode:

  float:      the layer's own Flax ``__call__``.
  calibrate:  records its input statistics, then the layer's own ``__call__``.
  qat:        fake-quantizes the input (``act``) and the weight (``weight``), then contracts;
              with a training recipe (``QuantRule(train=...)``) the layer's matmul is
              ``numerics.training.train_matmul`` instead: its forward and both backward
              products quantized (``train_call``).
  serve:      fake-quantizes the input (``act``) and contracts with the frozen weight from
              ``'quant'`` through its ``dot_general`` (a Pallas kernel where one applies).

Variables a quantized layer may own (besides Flax's own params):
  'params'/<weight>_<name>  quantizer parameters QAT learns (``Quantizer.init_learned``): LSQ's
                            ``kernel_scale``, DKM's ``kernel_codebook``.
  'params'/input_<name>     the activation quantizer's learned parameters (``input_scale``).
  'qstats'/hessian          f32 [K, K], ``sum x xᵀ`` over calibration rows (K = contracted size).
  'qstats'/count            f32 [], rows seen.
  'qstats'/absmax           f32 [], the largest input magnitude seen.
  'quant'/<weight>          the frozen QuantizedTensor (``freeze`` / ``quantize_model`` make it).
  '_overwrite_with_gradient'/<weight>_amax_history
                            a delayed-scaling recipe's amax histories (``{name: f32 [H]}``);
                            their gradient is their next value (Flax's fp8 convention).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.nn.rules import QuantConfig, layer_path
from jaxquant.numerics import Quantizer, is_quantized
from jaxquant.numerics import training as training_lib

_FLOAT = QuantConfig()


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One quantizable weight as its layer saw it while traced.

    Attributes:
      path: the layer's module path (``layers_0/attn/query``).
      weight: the weight's param name (``kernel``, ``embedding``).
      role: ``'linear'``, ``'head'`` or ``'embedding'``.
      rule: index in the config's rules of the first rule that matches, or None.
      shape: the weight param's shape.
      view_shape: the shape it is quantized in (consecutive contracted axes merged).
      axis: the contracted axes of the view.
      hessian: whether calibrate mode gathers the Hessian of its input (a matmul without batch
        axes; an embedding lookup has none).
    """

    path: str
    weight: str
    role: str
    rule: int | None
    shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    axis: tuple[int, ...]
    hessian: bool

    @property
    def param_path(self) -> str:
        """The weight's path in 'params' and 'quant' (``layers_0/attn/query/kernel``)."""
        return f"{self.path}/{self.weight}" if self.path else self.weight


@dataclasses.dataclass(frozen=True)
class Contraction:
    """A layer's matmul: what it multiplies, along which axes, and how.

    Attributes:
      inputs: the input array.
      weight: the weight's param name.
      shape: the weight's shape.
      weight_axes: the weight's contracted axes.
      input_axes: the input's contracted axes, in the order of ``weight_axes``.
      batched: whether the matmul has batch axes (no single input Hessian then).
      apply: ``(inputs, weight) -> output``: the layer's contraction and bias, for a float
        weight of ``shape`` or a frozen ``QuantizedTensor`` (of ``shape`` or its view).
      rows: ``inputs -> [tokens, K]``: the samples of the contracted input the weight's view
        multiplies, in the order of its merged contracted axes (a convolution's patches); None:
        ``input_axes`` moved last and flattened (``contracted_rows``).
      matmul: ``(inputs, weight, mm) -> output``: the contraction and bias with its product
        computed as ``mm(x2 [M, K], w2 [K, N])`` (training recipes), or None where the layer's
        contraction is not one 2-D matmul (batch axes, a convolution).
    """

    inputs: jax.Array
    weight: str
    shape: tuple[int, ...]
    weight_axes: tuple[int, ...]
    input_axes: tuple[int, ...]
    batched: bool
    apply: Callable[[jax.Array, Any], jax.Array]
    rows: Callable[[jax.Array], jax.Array] | None = None
    matmul: Callable[[jax.Array, jax.Array, Callable], jax.Array] | None = None

    def input_rows(self, x: jax.Array) -> jax.Array:
        """``x``'s contracted samples as ``[tokens, K]`` (what the Hessian sums over)."""
        return contracted_rows(x, self.input_axes) if self.rows is None else self.rows(x)


def contracted_rows(x: jax.Array, axes) -> jax.Array:
    """``x`` with ``axes`` moved last (in that order) and flattened: ``[tokens, K]``."""
    rest = [a for a in range(x.ndim) if a not in axes]
    k = math.prod(x.shape[a] for a in axes)
    return jnp.transpose(x, rest + list(axes)).reshape(-1, k)


_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "jaxquant_layer_recorder", default=None
)


@contextlib.contextmanager
def record_layers():
    """Collects a ``LayerInfo`` for every quantizable weight traced inside the block."""
    infos: list[LayerInfo] = []
    token = _RECORDER.set(infos)
    try:
        yield infos
    finally:
        _RECORDER.reset(token)


@contextlib.contextmanager
def pause_recording():
    """No ``LayerInfo`` is recorded inside the block (a structural probe of the model)."""
    token = _RECORDER.set(None)
    try:
        yield
    finally:
        _RECORDER.reset(token)


@dataclasses.dataclass
class ModelTrace:
    """One application of a whole model under ``intercept`` (``intercept.py`` opens it).

    Attributes:
      head: the path of the plain Flax layer taken as the model's output head (role
        ``'head'``), or None.
      matched: indices of the config's rules that matched a layer in this application.
    """

    head: str | None = None
    matched: set[int] = dataclasses.field(default_factory=set)


_TRACE: contextvars.ContextVar[ModelTrace | None] = contextvars.ContextVar(
    "jaxquant_model_trace", default=None
)


def current_trace() -> ModelTrace | None:
    """The ``ModelTrace`` of the model application being traced, or None."""
    return _TRACE.get()


@contextlib.contextmanager
def model_trace(trace: ModelTrace):
    """Makes ``trace`` the current one inside the block."""
    token = _TRACE.set(trace)
    try:
        yield trace
    finally:
        _TRACE.reset(token)


def weight_view(shape, contracting) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(view_shape, view_axes): consecutive contracted axes merged into one.

    A kernel ``[heads, head_dim, embed]`` contracted over (0, 1) is quantized as
    ``[heads * head_dim, embed]``, the matrix a matmul kernel sees, so groups run across heads
    (a group of 128 fits a head_dim of 64). Non-consecutive contracted axes stay as they are.
    """
    shape, contracting = tuple(shape), tuple(sorted(contracting))
    if len(contracting) < 2 or contracting != tuple(range(contracting[0], contracting[-1] + 1)):
        return shape, contracting
    first, last = contracting[0], contracting[-1]
    merged = math.prod(shape[a] for a in contracting)
    return shape[:first] + (merged,) + shape[last + 1 :], (first,)


def _need_mutable(module, collection: str, mode: str):
    if not module.is_mutable_collection(collection):
        raise ValueError(
            f"mode={mode!r} writes the {collection!r} collection: apply with "
            f"mutable=[{collection!r}] (layer {layer_path(module)})."
        )


def layer_weight(
    module, config: QuantConfig, role: str, name: str, shape, axes, *, hessian: bool, float_weight
):
    """The weight a layer computes with in ``config.mode``: float, fake-quantized (QAT), or
    the frozen ``QuantizedTensor`` (serve); records its ``LayerInfo``.

    Args:
      module: the bound layer.
      config: mode and rules.
      role: the layer's role for rule matching.
      name: the weight's param name.
      shape: the weight's shape.
      axes: its contracted axes.
      hessian: whether calibrate mode gathers an input Hessian for it.
      float_weight: ``() -> the float param``, called only when a rule matches in qat or
        serve mode (and the weight is not frozen).

    Returns:
      ``(weight, rule)``: the matching ``QuantRule`` (or None) and the weight to contract
      with: a QuantizedTensor of ``shape`` or its view (serve), the float or fake-quantized
      array (qat, serve with activations only), or None where the layer's own Flax call runs.
    """
    path = layer_path(module)
    index = config.match_index(path, role)
    rule = None if index is None else config.rules[index]
    view_shape, view_axes = weight_view(shape, axes)
    trace = _TRACE.get()
    if trace is not None and index is not None:
        trace.matched.add(index)
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.append(
            LayerInfo(path, name, role, index, tuple(shape), view_shape, view_axes, hessian)
        )
    if config.mode == "serve" and module.has_variable("quant", name):
        q = module.get_variable("quant", name)
        if tuple(q.shape) not in (tuple(shape), view_shape):
            raise ValueError(
                f"serve: frozen {name!r} of {path} has shape {q.shape}, the layer needs "
                f"{view_shape} (its weight {tuple(shape)} with contracted axes merged)."
            )
        if config.rules:
            axis = view_axes if tuple(q.shape) == view_shape else tuple(axes)
            check_frozen(q, rule, index, f"{path}/{name}", axis)
        return q, rule
    if config.mode == "serve" and rule is not None and rule.weight is not None:
        raise ValueError(
            f"serve: no frozen {name!r} in the 'quant' collection for layer {path!r}, which rule "
            f"{index} (QuantRule({rule.path!r})) quantizes; run freeze or quantize_model first."
        )
    if rule is None or config.mode not in ("qat", "serve"):
        return None, rule  # the layer's own Flax call reads its weight
    w = nn.unbox(float_weight())
    if w is None or tuple(w.shape) != tuple(shape):
        raise ValueError(
            f"{path}: param {name!r} is {None if w is None else tuple(w.shape)}, the layer "
            f"needs shape {tuple(shape)}."
        )
    if rule.weight is None or config.mode != "qat":
        return w, rule
    wv = w.reshape(view_shape)
    learned = _learned(module, rule.weight, name, wv, view_axes)
    return rule.weight.fake_quant(wv, axis=view_axes, learned=learned).reshape(shape), rule


def check_frozen(q, rule, index: int | None, param_path: str, axis) -> None:
    """Raises unless the serving ``rule`` quantizes a weight into ``q``'s layout (the rules
    frozen with and the rules served with agree; serving with no rules takes 'quant' as is)."""
    if rule is None or rule.weight is None:
        why = "no serving rule matches it" if rule is None else f"rule {index} has weight=None"
        raise ValueError(
            f"serve: 'quant' holds a frozen {param_path!r}, but {why}: serve with the rules it "
            "was frozen with (or with rules=() to serve whatever 'quant' holds)."
        )
    expected = jax.eval_shape(lambda: rule.weight.quantize(jnp.zeros(q.shape, q.dtype), axis=axis))
    if jax.tree.structure(expected) != jax.tree.structure(q):
        raise ValueError(
            f"serve: the frozen {param_path!r} is not what rule {index} "
            f"(QuantRule({rule.path!r}), {rule.weight.name}) makes: frozen with other rules? "
            "Serve with the rules it was frozen with (or with rules=() to serve whatever "
            "'quant' holds)."
        )


def _learned(module, quantizer: Quantizer, prefix: str, x, axis) -> dict:
    """The quantizer's learned params of ``x``, as ``'params'/<prefix>_<name>``."""
    out = {}
    for key in quantizer.learned_names:
        init = lambda _, key=key: quantizer.init_learned(lax.stop_gradient(x), axis=axis)[key]  # noqa: E731
        out[key] = module.param(f"{prefix}_{key}", init)
    return out


def record_input_stats(module, c: Contraction) -> None:
    """Accumulates ``sum x xᵀ`` over the contraction's input rows (``Contraction.input_rows``),
    the row count and the input's absmax in 'qstats'."""
    _need_mutable(module, "qstats", "calibrate")
    x = lax.stop_gradient(c.inputs).astype(jnp.float32)
    absmax = module.variable("qstats", "absmax", lambda: jnp.zeros((), jnp.float32))
    absmax.value = jnp.maximum(absmax.value, jnp.max(jnp.abs(x)))
    if c.batched:  # a batched contraction (attention-like): no single input Hessian
        return
    rows = c.input_rows(x)  # [tokens, K]
    k = rows.shape[1]
    hessian = module.variable("qstats", "hessian", lambda: jnp.zeros((k, k), jnp.float32))
    count = module.variable("qstats", "count", lambda: jnp.zeros((), jnp.float32))
    hessian.value = hessian.value + rows.T @ rows
    count.value = count.value + rows.shape[0]


def quantize_input(module, x, axes, quantizer: Quantizer):
    """The activation quantizer's quantize-dequantize of the input along its contracted axes
    (its learned params as ``'params'/input_<name>``)."""
    if quantizer.learned_names:
        # A learned parameter must not depend on the batch: per-token scales are calibrated on
        # each call, only what is shared over the non-contracted axes can be learned.
        shapes = jax.eval_shape(lambda x: quantizer.init_learned(x, axis=axes), x)
        for name, shape in shapes.items():
            batch = [d for a, d in enumerate(shape.shape) if a not in axes and d > 1]
            if len(shape.shape) == x.ndim and batch:
                raise ValueError(
                    f"act {quantizer.name} of {layer_path(module)}: its learned {name!r} of shape "
                    f"{shape.shape} would change with the batch; LSQ learns one static scale, so "
                    "activations need per-tensor scaling (Scaling()): dynamic per-token scales "
                    "are calibrated, not learned."
                )
    learned = _learned(module, quantizer, "input", x, axes)
    return quantizer.fake_quant(x, axis=axes, learned=learned)


def quantized_call(
    module, config: QuantConfig | None, role: str, contraction, flax_call, args, kwargs
):
    """Runs a layer per ``config.mode`` (module docstring).

    Args:
      module: the bound layer.
      config: mode and rules (None: float).
      role: the layer's role.
      contraction: ``(module, args, kwargs) -> Contraction`` for this layer type.
      flax_call: the layer's own Flax ``__call__`` (bound), run in float and calibrate modes
        and at initialization (so params are created exactly as Flax creates them).
      args, kwargs: the call's arguments.
    """
    config = _FLOAT if config is None else config
    c = contraction(module, args, kwargs)
    initial = None
    if config.mode in ("qat", "serve") and module.is_initializing():
        initial = flax_call(*args, **kwargs)  # Flax's own params first; QAT's then join them
    weight, rule = layer_weight(
        module,
        config,
        role,
        c.weight,
        c.shape,
        c.weight_axes,
        hessian=not c.batched,
        float_weight=lambda: module.get_variable("params", c.weight),
    )
    if config.mode in ("float", "calibrate"):
        if config.mode == "calibrate" and (rule is not None or not config.rules):
            record_input_stats(module, c)
        return flax_call(*args, **kwargs)
    if rule is None and not is_quantized(weight):
        # the layer's own call (once: a second call at initialization would create its params
        # again)
        return flax_call(*args, **kwargs) if initial is None else initial
    if config.mode == "qat" and rule is not None and rule.train is not None:
        return train_call(module, rule.train, c, weight)
    x = c.inputs
    if rule is not None and rule.act is not None:
        x = quantize_input(module, x, c.input_axes, rule.act)
    return c.apply(x, weight)


def train_call(module, recipe: training_lib.TrainingRecipe, c: Contraction, weight):
    """The layer's contraction with its matmul quantized per ``recipe`` in all three products
    (``training_lib.train_matmul``). The key comes from the ``'train_recipe'`` rng stream (a
    fresh one per call) when the recipe needs one; delayed scaling keeps its amax histories in
    ``'_overwrite_with_gradient'``."""
    path = layer_path(module)
    if c.matmul is None:
        raise ValueError(
            f"{path} ({type(module).__name__}): training recipe {recipe.name!r} quantizes a 2-D "
            "matmul, and this layer's contraction is not one (batch axes, a convolution, or an "
            "Einsum that is not 'AC,CF->AF'-shaped). Narrow the rule's path to leave it out, "
            "or quantize it with QAT (weight=, act=)."
        )
    key = None
    if recipe.needs_key:
        if not module.has_rng(training_lib.RNG_STREAM):
            if recipe.forward.needs_key:
                raise ValueError(
                    f"{path}: training recipe {recipe.name!r} draws random numbers in its "
                    f"forward pass: apply with rngs={{{training_lib.RNG_STREAM!r}: key}}."
                )
        else:
            key = module.make_rng(training_lib.RNG_STREAM)
    histories = None
    if recipe.history_names():
        var = module.variable(
            training_lib.OVERWRITE_COLLECTION, f"{c.weight}_amax_history", recipe.init_histories
        )
        histories = var.value

    def mm(x2, w2):
        try:
            return training_lib.train_matmul(x2, w2, recipe, key=key, histories=histories)
        except ValueError as e:
            raise ValueError(f"{path or '<root>'} ({type(module).__name__}): {e}") from None

    return c.matmul(c.inputs, weight, mm)
