"""The quantized operations every layer shares: weights per mode, and a quantized dot_general.

A layer (ours, or a plain Flax one under ``intercept``) gets its weight with ``layer_weight``
and contracts through ``quant_dot_general``, which has the exact ``lax.dot_general`` signature
(so it plugs into ``jnp.einsum(_dot_general=...)`` and Flax's ``Dense(dot_general=...)``).

Variables a quantized layer may own (besides Flax's own params):
  'params'/<weight>_scale    LSQ's learned weight scale (QAT with ``lsq=True``).
  'params'/input_scale       LSQ's learned activation scale.
  'qstats'/hessian           f32 [K, K], ``sum x xᵀ`` over calibration rows (K = contracted size).
  'qstats'/count             f32 [], rows seen.
  'qstats'/absmax            f32 [], the largest input magnitude seen.
  'params'/<weight>_codebook DKM's learned codebook (QAT with ``VQ(qat='dkm')``).
  'quant'/<weight>           the frozen QArray or VQArray (freeze writes it, serve reads it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.nn import kernels
from jaxquant.nn.rules import QuantConfig, QuantRule, TensorQuant
from jaxquant.numerics import QuantizedTensor, fake_quant, lsq_init_scale, quantize
from jaxquant.vq import fake_quant_vq, quantize_vq
from jaxquant.vq import vqarray as vqa


def _need_mutable(module, collection: str, mode: str):
    if not module.is_mutable_collection(collection):
        raise ValueError(
            f"mode={mode!r} writes the {collection!r} collection: apply with "
            f"mutable=[{collection!r}] (layer {'/'.join(map(str, module.scope.path))})."
        )


def weight_view(shape, contracting) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(view_shape, view_contracting): consecutive contracting axes merged into one.

    A kernel ``[heads, head_dim, embed]`` contracted over (0, 1) is quantized as
    ``[heads * head_dim, embed]``, the matrix a matmul kernel sees, so groups run across heads
    (a group of 128 fits a head_dim of 64). Non-consecutive contracting axes stay as they are.
    """
    shape, contracting = tuple(shape), tuple(sorted(contracting))
    if len(contracting) < 2 or contracting != tuple(range(contracting[0], contracting[-1] + 1)):
        return shape, contracting
    first, last = contracting[0], contracting[-1]
    merged = 1
    for a in contracting:
        merged *= shape[a]
    return shape[:first] + (merged,) + shape[last + 1 :], (first,)


def as_kernel(weight, shape):
    """A weight in the kernel's own shape: arrays and same-shape QArrays pass through, a QArray
    stored in its merged view is dequantized and reshaped."""
    if isinstance(weight, QuantizedTensor) and tuple(weight.shape) != tuple(shape):
        return weight.dequantize().reshape(shape)
    return weight


def layer_weight(
    module,
    name: str,
    init_fn,
    shape: tuple[int, ...],
    param_dtype,
    contracting: tuple[int, ...],
    config: QuantConfig,
    rule: QuantRule | None,
) -> jax.Array | QuantizedTensor:
    """The weight a layer computes with: float, fake-quantized, frozen, or the served QArray.

    ``contracting`` are the weight's axes that the layer's matmul sums over; the weight is
    quantized in its ``weight_view`` (a frozen QArray has that shape; see ``as_kernel``).
    """
    spec = rule.weight if rule is not None else None
    view_shape, view_contracting = weight_view(shape, contracting)
    path = "/".join(map(str, module.scope.path))
    if config.mode == "serve" and module.has_variable("quant", name):
        q = module.get_variable("quant", name)
        if tuple(q.shape) != view_shape:
            raise ValueError(
                f"serve: frozen {name!r} of {path} has shape {q.shape}, the layer needs "
                f"{view_shape} (its kernel {tuple(shape)} with contracting axes merged)."
            )
        return q
    if config.mode == "serve" and spec is not None:
        raise ValueError(
            f"serve: no frozen {name!r} in the 'quant' collection for layer {path}, which a rule "
            "quantizes; run freeze first."
        )
    w = module.param(name, init_fn, shape, param_dtype)
    if spec is None or config.mode in ("float", "calibrate"):
        return w
    wv = w.reshape(view_shape)
    if spec.is_vq:
        return _vq_weight(module, name, w, wv, view_contracting, config, spec.format, path)
    fmt, scaling = spec.resolve(view_contracting, wv.ndim)
    if config.mode == "qat":
        if spec.lsq:
            scale = module.param(f"{name}_scale", lambda _: lsq_init_scale(wv, fmt, scaling))
            return fake_quant(wv, fmt, scaling, scale=scale).reshape(shape)
        return fake_quant(wv, fmt, scaling, calibration=spec.calibration).reshape(shape)
    # freeze: with the learned scale when LSQ trained one
    _need_mutable(module, "quant", "freeze")
    scale = None
    if spec.lsq:
        if not module.has_variable("params", f"{name}_scale"):
            raise ValueError(
                f"freeze: the rule for {path} has lsq=True but params has no {name}_scale: "
                "train with it in QAT mode first."
            )
        scale = module.get_variable("params", f"{name}_scale")
    q = quantize(wv, fmt, scaling, calibration=spec.calibration, scale=scale)
    module.put_variable("quant", name, q)
    return q


def _vq_weight(module, name, w, wv, view_contracting, config, recipe, path):
    """QAT (straight-through or DKM) and freeze for a ``VQ`` recipe; the view must contract
    over its axis 0 (a ``[K, *rest]`` matrix view)."""
    if tuple(view_contracting) != (0,):
        raise ValueError(
            f"{recipe.name} on {name!r} of {path}: vector quantization needs the weight's "
            f"contracted axes leading (view contracted over axis 0), got axes {view_contracting}."
        )
    if recipe.qat == "dkm":
        # DKM: unit-space weights (scales from the current weights, no gradient through them)
        # softly assigned to a learned codebook param, initialized by k-means.
        w2 = vqa.as_matrix(wv)
        g = recipe.group_size or w2.shape[0]
        full = lax.stop_gradient(
            vqa.expand_scale(vqa.group_rms_scale(w2, recipe), *w2.shape[:1], g)
        )
        x2 = w2 / full
        codebook = module.param(
            f"{name}_codebook",
            lambda key: vqa.fit_codebook(
                lax.stop_gradient(x2), recipe, jax.random.key(recipe.seed)
            ),
        )
        if config.mode == "qat":
            return (vqa.dkm_fake_quant_matrix(x2, codebook, recipe) * full).reshape(w.shape)
        codebook = vqa.dkm_final_codebook(x2, codebook, recipe)
    else:
        if config.mode == "qat":
            return fake_quant_vq(wv, recipe).reshape(w.shape)
        codebook = None
    _need_mutable(module, "quant", "freeze")
    q = quantize_vq(wv, recipe, codebook=codebook)
    module.put_variable("quant", name, q)
    return q


def _record_input_stats(module, lhs, contracting, batch):
    """Accumulates sum x xᵀ, the row count and absmax of the contracted input in 'qstats'."""
    _need_mutable(module, "qstats", "calibrate")
    x = lax.stop_gradient(lhs).astype(jnp.float32)
    absmax = module.variable("qstats", "absmax", lambda: jnp.zeros((), jnp.float32))
    absmax.value = jnp.maximum(absmax.value, jnp.max(jnp.abs(x)))
    if batch:  # a batched contraction (attention-like): no single input Hessian
        return
    rest = [a for a in range(x.ndim) if a not in contracting]
    k = 1
    for a in contracting:
        k *= x.shape[a]
    rows = jnp.transpose(x, rest + list(contracting)).reshape(-1, k)  # [tokens, K]
    hessian = module.variable("qstats", "hessian", lambda: jnp.zeros((k, k), jnp.float32))
    count = module.variable("qstats", "count", lambda: jnp.zeros((), jnp.float32))
    hessian.value = hessian.value + rows.T @ rows
    count.value = count.value + rows.shape[0]


def _quant_input(module, lhs, contracting, spec: TensorQuant):
    fmt, scaling = spec.resolve(contracting, lhs.ndim)
    if spec.lsq:
        if scaling.axis is not None:
            raise ValueError(
                f"act {spec.name}: LSQ learns one static scale, so activations need per-tensor "
                "scaling (Scaling()); dynamic per-token scales are calibrated, not learned."
            )
        scale = module.param(
            "input_scale", lambda _: lsq_init_scale(lax.stop_gradient(lhs), fmt, scaling)
        )
        return fake_quant(lhs, fmt, scaling, scale=scale)
    return fake_quant(lhs, fmt, scaling, calibration=spec.calibration)


def quant_dot_general(module, config: QuantConfig, rule: QuantRule | None, base=None):
    """A ``lax.dot_general`` that quantizes for ``module`` per ``config.mode``.

    * calibrate: records the input statistics (if a rule matches, or the config has no rules);
    * qat, freeze, serve: fake-quantizes the input (lhs) when the rule has ``act``;
    * a QArray rhs (serve) goes to ``kernels.qarray_dot_general``: the Pallas low-bit matmul
      when it reads the QArray, else dequantize to the input's dtype, then ``lax.dot_general``
      (a module's own ``dot_general`` is not used for QArray weights); a VQArray goes to
      ``jaxquant.vq.vq_matmul`` (``codebook_matmul``) the same way.
    """
    base = lax.dot_general if base is None else base
    act = rule.act if rule is not None else None
    record = config.mode == "calibrate" and (rule is not None or not config.rules)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        (lhs_contract, _), (lhs_batch, _) = dimension_numbers
        if record:
            _record_input_stats(module, lhs, tuple(lhs_contract), tuple(lhs_batch))
        if act is not None and config.mode in ("qat", "freeze", "serve"):
            lhs = _quant_input(module, lhs, tuple(lhs_contract), act)
        if isinstance(rhs, QuantizedTensor):  # serve: a kernel, or dequantize then matmul
            return kernels.qarray_dot_general(
                lhs, rhs, dimension_numbers, precision, preferred_element_type
            )
        return base(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )

    return dot_general
