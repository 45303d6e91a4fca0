"""intercept: quantize a model written with plain Flax layers; apply any model with a config.

Inside ``intercept(config)``, every plain ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` and
``nn.Conv`` call runs as jaxquant's quantized layers do (``ops.quantized_call``, with the
layer's own Flax ``__call__`` in float and calibrate modes and at initialization): the same
params, names and shapes, plus 'qstats'/'quant' per mode. ``apply_with_config`` applies any
model with a config: through its ``quant`` field when it has one (models built from jaxquant
layers), else under ``intercept``.

Each application of a whole model under ``intercept`` (its root module's call) is first traced
once for its structure (shapes only, ``jax.eval_shape``), which gives:

* the head: the last quantizable layer called, when it is a plain ``Dense``/``DenseGeneral``/
  ``Einsum`` whose output the model returns as is (logits), in a model with more than one
  quantizable layer, has role ``'head'``, so rules leave it in float unless they name that
  role (as for jaxquant's own layers); ``QuantReport`` lists it. A head followed by other
  operations (a softmax, a cast) is a linear layer: name it in a rule's path to keep it out;
* a warning naming every layer a rule reaches that jaxquant cannot quantize (a layer with a
  matrix-shaped param but no known contraction: ``nn.ConvTranspose``, ``nn.ConvLocal``, a
  custom layer), and, after the call, every rule that matched no layer.

The config is part of what ``jax.jit`` caches on (``jax.make_user_context``), so a function
jitted before the block is traced again inside it rather than replaying its float compilation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import sys
import warnings
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np

from jaxquant.nn import layers, ops
from jaxquant.nn.rules import QuantConfig, layer_path

# What jit caches on: the innermost intercept's config (None outside any).
_JIT_CONTEXT = jax.make_user_context(None)
_PROBING: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxquant_probing", default=False)
_HEAD_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)
# (root type, method, input shapes) -> probe result, inside ``reuse_probes()`` only.
_PROBE_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "jaxquant_probe_cache", default=None
)


@contextlib.contextmanager
def reuse_probes():
    """Inside the block, a model applied again with inputs of the same shapes reuses its first
    ``probe`` (for callers such as ``quantize_model`` that trace one model many times)."""
    token = _PROBE_CACHE.set({})
    try:
        yield
    finally:
        _PROBE_CACHE.reset(token)


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One module call seen by ``probe``: its path, type and whether jaxquant quantizes it."""

    path: str
    type: str
    quantizable: bool
    plain: bool  # a plain Flax layer (not one of jaxquant's)
    head_type: bool  # Dense / DenseGeneral / Einsum
    role: str  # the role a rule needs to reach it
    matrix_params: tuple[str, ...]  # its own params of two or more dimensions
    is_output: bool = False  # its output is (a leaf of) the model's output, as is


def probing() -> bool:
    """Whether the model is being traced by ``probe`` (structure only); interceptors that feed
    or capture values should pass calls through then."""
    return _PROBING.get()


def _role_of(module) -> str:
    if isinstance(module, layers.QuantizedLayer):
        return module.role
    if isinstance(module, nn.Embed):
        return "embedding"
    return "linear"


def probe(module, method: str, args, kwargs) -> list[LayerCall]:
    """Every module call of one application of bound root ``module`` (shapes only).

    The root is re-applied to its own variables under ``jax.eval_shape`` (initialized, if it
    is initializing), with every rng stream it was given and every collection mutable, with
    each layer's own Flax call: nothing is computed or written.
    """
    root = module.clone(parent=None)
    initializing = module.is_initializing()
    variables = {} if initializing else dict(module.variables)
    # 'params' too: a weight served from 'quant' is absent from 'params', and the probe (which
    # runs every layer's own Flax call) creates it, abstractly.
    rng_names = tuple({"params", *module.scope.rngs})
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]
    calls: list[LayerCall] = []
    outputs: list[list] = []  # each call's output leaves (held, so identity is meaningful)

    def recorder(next_fun, a, kw, ctx):
        if ctx.method_name != "__call__":
            return next_fun(*a, **kw)
        index = len(calls)
        calls.append(None)
        outputs.append([])
        out = next_fun(*a, **kw)
        outputs[index] = jax.tree.leaves(out)
        m = ctx.module
        own = nn.unbox(m.variables.get("params", {}))
        calls[index] = LayerCall(
            path=layer_path(m),
            type=type(m).__name__,
            quantizable=layers.contraction_of(m) is not None or isinstance(m, nn.Embed),
            plain=not isinstance(m, layers.QuantizedLayer) and not isinstance(m, layers.QEmbed),
            head_type=isinstance(m, _HEAD_TYPES),
            role=_role_of(m),
            matrix_params=tuple(
                k for k, v in own.items() if not isinstance(v, Mapping) and np.ndim(v) >= 2
            ),
        )
        return out

    def run(variables, values):
        full = list(leaves)
        for i, v in zip(dynamic, values, strict=True):
            full[i] = v
        a, kw = jax.tree.unflatten(treedef, full)
        rngs = {name: jax.random.key(0) for name in rng_names}
        with nn.intercept_methods(recorder):
            if initializing:
                out, _ = root.init_with_output(rngs, *a, method=method, **kw)
            else:
                out, _ = root.apply(variables, *a, method=method, rngs=rngs, mutable=True, **kw)
        model_out = jax.tree.leaves(out)
        for i, c in enumerate(calls):
            if c is not None and c.path and any(o is m for o in outputs[i] for m in model_out):
                calls[i] = dataclasses.replace(c, is_output=True)

    token = _PROBING.set(True)
    try:
        with ops.pause_recording():
            jax.eval_shape(run, variables, [leaves[i] for i in dynamic])
    finally:
        _PROBING.reset(token)
    return [c for c in calls if c is not None]


def find_head(calls: list[LayerCall]) -> str | None:
    """The path of the model's head: the last quantizable layer called, when it is a plain
    Dense/DenseGeneral/Einsum whose output the model returns as is, and not the model's only
    quantizable layer."""
    quantizable = [c for c in calls if c.quantizable and c.path]
    if len({c.path for c in quantizable}) < 2:
        return None
    last = quantizable[-1]
    return last.path if last.plain and last.head_type and last.is_output else None


def unsupported(calls: list[LayerCall], config: QuantConfig) -> list[str]:
    """Messages for the layers a rule reaches that jaxquant cannot quantize."""
    out, seen = [], set()
    for c in calls:
        if c.quantizable or not c.matrix_params or c.path in seen:
            continue
        index = config.match_index(c.path, c.role)
        if index is None:
            continue
        seen.add(c.path)
        out.append(
            f"QuantRule({config.rules[index].path!r}) reaches {c.path or '<root>'} "
            f"({c.type}, params {list(c.matrix_params)}), which jaxquant cannot quantize (it "
            "quantizes nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv and jaxquant's layers): "
            "it stays in float. Narrow the rule's path to silence this."
        )
    return out


@contextlib.contextmanager
def intercept(config: QuantConfig, *, check_rules: bool = True):
    """Quantizes plain ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum``/``nn.Conv`` layers of any
    Linen model.

    Enter it around ``model.apply`` (inside or outside ``jax.jit``): the config is part of
    jit's cache key, so a function compiled outside the block is traced again inside it.

    Args:
      config: the mode and rules.
      check_rules: warn after each application of a model about rules that matched no layer
        (and always about layers a rule reaches but jaxquant cannot quantize).

    Example:
      >>> rules = (QuantRule(".*", weight=INT8),)
      >>> @jax.jit
      ... def qat_apply(variables, x):
      ...     with intercept(QuantConfig(mode="qat", rules=rules)):
      ...         return model.apply(variables, x)
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"intercept config={config!r}: expected a QuantConfig.")

    def interceptor(next_fun, args, kwargs, context):
        if _PROBING.get():
            return next_fun(*args, **kwargs)
        module = context.module
        if (
            ops.current_trace() is None
            and module.scope.parent is None
            and context.method_name != "setup"
        ):
            return _apply_root(config, check_rules, interceptor, next_fun, args, kwargs, context)
        if context.method_name != "__call__" or isinstance(module, layers.QuantizedLayer):
            return next_fun(*args, **kwargs)
        contraction = layers.contraction_of(module)
        if contraction is None:
            return next_fun(*args, **kwargs)
        trace = ops.current_trace()
        head = trace is not None and trace.head is not None and trace.head == layer_path(module)
        role = "head" if head else "linear"
        return ops.quantized_call(module, config, role, contraction, next_fun, args, kwargs)

    with _JIT_CONTEXT(config), nn.intercept_methods(interceptor):
        yield


def _apply_root(config, check_rules, interceptor, next_fun, args, kwargs, context):
    """One application of a whole model: probe it, apply it, then check the rules."""
    cache = _PROBE_CACHE.get()
    key = None
    if cache is not None:
        shapes = jax.tree.map(lambda a: (np.shape(a), np.result_type(a)), (args, kwargs))
        key = (type(context.module), context.method_name, str(shapes))
    if key is not None and key in cache:
        calls = cache[key]
    else:
        calls = probe(context.module, context.method_name, args, kwargs)
        if key is not None:
            cache[key] = calls
    trace = ops.ModelTrace(head=find_head(calls))
    for message in unsupported(calls, config):
        warnings.warn(message, stacklevel=find_stacklevel())
    with ops.model_trace(trace):
        out = interceptor(next_fun, args, kwargs, context)
    if check_rules and config.mode != "float":
        layers_seen = sorted({c.path for c in calls if c.quantizable and c.path})
        for i, rule in enumerate(config.rules):
            if i not in trace.matched:
                warnings.warn(
                    f"intercept (mode={config.mode!r}): QuantRule({rule.path!r}, roles="
                    f"{rule.roles}) matched no layer of {type(context.module).__name__}, so it "
                    f"quantizes nothing. Quantizable layers: {layers_seen}"
                    + (f"; the head {trace.head!r} needs roles=('head',)" if trace.head else ""),
                    stacklevel=find_stacklevel(),
                )
    return out


def find_stacklevel() -> int:
    """The stack level of the first frame outside jaxquant, flax and jax (for warnings)."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("jaxquant", "flax", "jax", "contextlib")):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def has_quant_field(model: nn.Module) -> bool:
    """Whether ``model`` takes a ``QuantConfig`` through a ``quant`` field (jaxquant layers
    and models built from them)."""
    return any(f.name == "quant" for f in dataclasses.fields(model))


def apply_with_config(
    model: nn.Module, config: QuantConfig, variables, *args, check_rules: bool = True, **kwargs
):
    """``model.apply(variables, *args, **kwargs)`` with ``config``: through the model's
    ``quant`` field when it has one, else under ``intercept`` (``check_rules`` as there)."""
    if has_quant_field(model):
        return model.clone(quant=config).apply(variables, *args, **kwargs)
    with intercept(config, check_rules=check_rules):
        return model.apply(variables, *args, **kwargs)
