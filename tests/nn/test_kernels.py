"""Serve mode through pallas_kernels.quantized_matmul: logits equal dequantize-then-matmul."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxquant.numerics as jn
from jaxquant.nn import QEinsum, QuantConfig, QuantRule, freeze, kernels, serving_params

E4M3_CHANNEL = jn.Preset("E4M3_CHANNEL", jn.E4M3, jn.Scaling(axis=0))
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
    real = kernels.quantized_matmul

    def spy(*args, **kwargs):
        calls.append(kwargs["fmt"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "quantized_matmul", spy)
    served = model.clone(quant=QuantConfig(mode="serve", rules=rules))
    with kernels.kernel_options(**options):
        got = served.apply({"params": serving_params(params, quant), "quant": quant}, tokens)
    want = model.apply({"params": _dequantized(params, quant)}, tokens)
    return got, want, calls


@pytest.mark.parametrize("name", list(KERNEL_PRESETS))
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
    assert reason in kernels.unsupported_reason(q)
    assert kernels.kernel_args(q) is None


def test_a_row_that_does_not_fill_whole_bytes_is_not_read_by_the_kernel():
    q = jn.quantize(jax.random.normal(jax.random.key(0), (32, 3, 3)), jn.INT4)
    assert "whole bytes" in kernels.unsupported_reason(q)
    x = jax.random.normal(jax.random.key(1), (5, 32))
    y = kernels.qarray_dot_general(x, q, (((1,), (0,)), ((), ())))
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
    real = kernels.quantized_matmul
    monkeypatch.setattr(
        kernels, "quantized_matmul", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    served = model.clone(quant=QuantConfig(mode="serve", rules=rules))
    with kernels.kernel_options(interpret=True):
        got = served.apply({"params": serving_params(params, quant), "quant": quant}, x)
    want = model.apply({"params": _dequantized(params, quant)}, x)
    assert len(calls) == 2  # 'merged' and 'plain'; 'batched' shares n with its input
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
