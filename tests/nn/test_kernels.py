"""Serve mode through pallas_kernels.quantized_matmul: logits equal dequantize-then-matmul."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxquant.numerics as jn
from jaxquant.nn import QDense, QEinsum, QuantConfig, QuantRule, freeze, serving_params
from jaxquant.numerics import kernel_options
from jaxquant.numerics import qarray as qarray_lib

E4M3_CHANNEL = jn.ScalarQuantizer(jn.E4M3, jn.Scaling(axis=0))
KERNEL_PRESETS = {
    "INT8": jn.INT8,
    "INT4_G32": jn.INT4_G128.with_group_size(32),
    "INT4_G32_ASYM": jn.INT4_G128_ASYM.with_group_size(32),
    "INT2_G32": jn.INT2_G128.with_group_size(32),
    "MXFP4": jn.MXFP4,
    "NVFP4": jn.NVFP4,
    "NF4": jn.NF4,
    "FP8_E4M3": jn.FP8_E4M3,  # one scale per tensor
    "E4M3_CHANNEL": E4M3_CHANNEL,
}
FALLBACK_PRESETS = {
    "INT3_G32": jn.INT3_G128.with_group_size(32),
    "FP4_AFPQ_G32": jn.FP4_AFPQ_G128.with_group_size(32),
    "FP8_E5M2": jn.FP8_E5M2,
}


def _dequantized(params, quant):
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, q in traverse_util.flatten_dict(
        quant, sep="/", is_leaf=lambda _, x: isinstance(x, jn.QArray)
    ).items():
        flat[path] = q.dequantize(jnp.float32).reshape(flat[path].shape)
    return traverse_util.unflatten_dict(flat, sep="/")


def _serve(model, params, tokens, preset, monkeypatch, **options):
    """(served logits, dequantized-float logits, number of kernel calls while tracing)."""
    rules = (QuantRule(".*", weight=preset),)
    quant, _ = freeze(model, params, tokens, rules=rules)
    calls = []
    real = qarray_lib.quantized_matmul

    def spy(*args, **kwargs):
        calls.append(kwargs["fmt"])
        return real(*args, **kwargs)

    monkeypatch.setattr(qarray_lib, "quantized_matmul", spy)
    served = model.clone(quant=QuantConfig(mode="serve", rules=rules))
    with kernel_options(**options):
        got = served.apply({"params": serving_params(params, quant), "quant": quant}, tokens)
    want = model.apply({"params": _dequantized(params, quant)}, tokens)
    return got, want, calls


# The kernel's arithmetic for every preset is tests/pallas_kernels' (interpret mode); here the
# wiring (7 calls through the kernel, served logits equal) on an int, an asymmetric-int, a
# microscaling and a lookup format, the rest in the slow run.
_DEFAULT_KERNEL_PRESETS = ("INT8", "INT4_G32_ASYM", "MXFP4", "NF4")


@pytest.mark.parametrize(
    "name",
    [
        n if n in _DEFAULT_KERNEL_PRESETS else pytest.param(n, marks=pytest.mark.slow)
        for n in KERNEL_PRESETS
    ],
)
def test_served_logits_through_the_kernel_in_interpret_mode_equal_dequantized(
    llama, name, monkeypatch
):
    model, params, tokens = llama
    got, want, calls = _serve(
        model, params, tokens, KERNEL_PRESETS[name], monkeypatch, interpret=True
    )
    assert len(calls) == 7  # query, key, value, out (merged view), gate, up, down
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", list(FALLBACK_PRESETS))
def test_formats_the_kernel_cannot_read_dequantize_then_matmul(llama, name, monkeypatch):
    model, params, tokens = llama
    got, want, calls = _serve(model, params, tokens, FALLBACK_PRESETS[name], monkeypatch)
    assert calls == []
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_kernel_options_can_turn_the_kernel_off(llama, monkeypatch):
    model, params, tokens = llama
    got, want, calls = _serve(model, params, tokens, jn.INT8, monkeypatch, enabled=False)
    assert calls == []
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "preset,reason",
    [
        (jn.INT3_G128, "3-bit codes"),
        (jn.FP4_AFPQ_G128, "split-sign"),
        (jn.FP8_E5M2, "format e5m2"),
        (jn.INT8.on_axis(1), "not the contracted axis 0"),
    ],
)
def test_unsupported_reason_names_the_problem(preset, reason):
    q = jn.quantize(jax.random.normal(jax.random.key(0), (128, 32)), preset)
    assert reason in q.kernel_unsupported_reason()
    assert q.kernel_args() is None


def test_a_row_that_does_not_fill_whole_bytes_is_not_read_by_the_kernel():
    q = jn.quantize(jax.random.normal(jax.random.key(0), (32, 3, 3)), jn.INT4)
    assert "whole bytes" in q.kernel_unsupported_reason()
    x = jax.random.normal(jax.random.key(1), (5, 32))
    y = q.dot_general(x, (((1,), (0,)), ((), ())))
    np.testing.assert_allclose(y, jnp.einsum("mk,kab->mab", x, q.dequantize()), rtol=1e-5)


class _Einsums(nn.Module):
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x):  # x [b, t, h, d]
        y = QEinsum((4, 8, 16), "bthd,hdk->btk", quant=self.quant, name="merged")(x)
        z = QEinsum((16, 2, 8), "btk,kne->btne", quant=self.quant, name="plain")(y)
        return QEinsum((2, 8, 8), "btne,nef->btnf", quant=self.quant, name="batched")(z)


def test_einsum_layers_serve_through_the_kernel_when_they_are_matmuls(monkeypatch):
    model = _Einsums()
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
    params = model.init(jax.random.key(1), x)["params"]
    rules = (QuantRule(".*", weight=jn.INT4_G128.with_group_size(8)),)
    quant, _ = freeze(model, params, x, rules=rules)
    calls = []
    real = qarray_lib.quantized_matmul
    monkeypatch.setattr(
        qarray_lib, "quantized_matmul", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    served = model.clone(quant=QuantConfig(mode="serve", rules=rules))
    with kernel_options(interpret=True):
        got = served.apply({"params": serving_params(params, quant), "quant": quant}, x)
    want = model.apply({"params": _dequantized(params, quant)}, x)
    assert len(calls) == 2  # 'merged' and 'plain'; 'batched' shares n with its input
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def _eqns(jaxpr, *, into_kernels: bool):
    """Every equation of a jaxpr and of the jaxprs nested in it (a pallas_call's kernel body
    only with ``into_kernels``: inside the kernel, tiles are decoded in VMEM)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call" and not into_kernels:
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner, into_kernels=into_kernels)


def _float_weight_matmuls(jaxpr, kernel_shape):
    """dot_generals outside the Pallas kernels whose rhs is a float array of the kernel's shape."""
    return [
        e
        for e in _eqns(jaxpr, into_kernels=False)
        if e.primitive.name == "dot_general"
        and tuple(e.invars[1].aval.shape) == tuple(kernel_shape)
        and jnp.issubdtype(e.invars[1].aval.dtype, jnp.floating)
    ]


@pytest.mark.parametrize("preset", [jn.INT8, jn.INT4], ids=lambda q: q.name)
def test_a_served_matmul_hands_the_packed_codes_to_the_kernel(preset):
    """A jaxpr walk: the Pallas call receives the uint8 codes as stored, and no dot_general
    multiplies by a float weight of the kernel's shape (the weight is never dequantized)."""
    x = jax.random.normal(jax.random.key(0), (4, 64))
    layer = QDense(32, use_bias=False)
    params = layer.init(jax.random.key(1), x)["params"]
    rules = (QuantRule(".*", weight=preset),)  # int8 / int4, one scale per output channel
    quant, _ = freeze(layer, params, x, rules=rules)
    codes = quant["kernel"].codes
    assert codes.dtype == jnp.uint8 and codes.shape == (64, 32 * preset.format.bits // 8)
    served = QDense(32, use_bias=False, quant=QuantConfig(mode="serve", rules=rules))
    variables = {"params": {}, "quant": quant}
    with kernel_options(interpret=True):
        jaxpr = jax.make_jaxpr(served.apply)(variables, x).jaxpr
    pallas = [e for e in _eqns(jaxpr, into_kernels=False) if e.primitive.name == "pallas_call"]
    assert len(pallas) == 1, "expected one pallas_call in the served jaxpr"
    operands = [v.aval for v in pallas[0].invars]
    assert any(a.dtype == jnp.uint8 and a.shape == codes.shape for a in operands), operands
    assert not _float_weight_matmuls(jaxpr, (64, 32))
    # The other path, for contrast: dequantize, then multiply by a float [64, 32] weight.
    with kernel_options(enabled=False):
        jaxpr = jax.make_jaxpr(served.apply)(variables, x).jaxpr
    assert not [e for e in _eqns(jaxpr, into_kernels=True) if e.primitive.name == "pallas_call"]
    assert _float_weight_matmuls(jaxpr, (64, 32))
