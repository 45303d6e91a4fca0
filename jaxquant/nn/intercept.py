"""intercept: quantize a model written with plain Flax layers; apply any model with a config.

Inside ``intercept(config)``, every plain ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum``
call runs as jaxquant's quantized layers do (``ops.quantized_call``, with the layer's own Flax
``__call__`` in float and calibrate modes and at initialization): the same params, names and
shapes, plus 'qstats'/'quant' per mode. ``apply_with_config`` applies any model with a config:
through its ``quant`` field when it has one (models built from jaxquant layers), else under
``intercept``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn

from jaxquant.nn import layers, ops
from jaxquant.nn.rules import QuantConfig


@contextlib.contextmanager
def intercept(config: QuantConfig):
    """Quantizes plain ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` layers of any Linen model.

    Enter it inside the function you jit: it acts while the model is traced, and a
    compilation cached before (or outside) the block keeps the float computation.

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
        module = context.module
        if context.method_name != "__call__" or isinstance(module, layers.QuantizedLayer):
            return next_fun(*args, **kwargs)
        contraction = layers.contraction_of(module)
        if contraction is None:
            return next_fun(*args, **kwargs)
        return ops.quantized_call(module, config, "linear", contraction, next_fun, args, kwargs)

    with nn.intercept_methods(interceptor):
        yield


def has_quant_field(model: nn.Module) -> bool:
    """Whether ``model`` takes a ``QuantConfig`` through a ``quant`` field (jaxquant layers
    and models built from them)."""
    return any(f.name == "quant" for f in dataclasses.fields(model))


def apply_with_config(model: nn.Module, config: QuantConfig, variables, *args, **kwargs):
    """``model.apply(variables, *args, **kwargs)`` with ``config``: through the model's
    ``quant`` field when it has one, else under ``intercept``."""
    if has_quant_field(model):
        return model.clone(quant=config).apply(variables, *args, **kwargs)
    with intercept(config):
        return model.apply(variables, *args, **kwargs)
