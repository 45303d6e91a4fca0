"""Quantized convolutions: nn.Conv / QConv in every mode against direct computations, the
Hessian of the unfolded patches against a numpy im2col, and GPTQ on a CNN."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import jaxquant.nn as qn
import jaxquant.numerics as jn
from jaxquant.ptq import quantize_model


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# (kwargs of nn.Conv, input shape): 1-, 2- and 3-D, every padding mode, strides, both
# dilations, feature groups, two batch axes and none
CONVS = [
    (dict(features=5, kernel_size=(3,), padding="CAUSAL"), (2, 9, 3)),
    (dict(features=6, kernel_size=(3, 2), padding="SAME"), (2, 7, 5, 4)),
    (dict(features=6, kernel_size=(3, 3), padding="VALID", strides=2), (2, 9, 7, 4)),
    (dict(features=4, kernel_size=(3, 2), padding="CIRCULAR", kernel_dilation=2), (2, 7, 6, 3)),
    (
        dict(features=4, kernel_size=(2, 3), padding=((1, 0), (2, 1)), input_dilation=2),
        (1, 5, 4, 3),
    ),
    (dict(features=6, kernel_size=(3, 3), padding="REFLECT", feature_group_count=2), (2, 6, 6, 4)),
    (dict(features=3, kernel_size=(2, 2, 2), padding=1), (1, 4, 3, 5, 2)),
    (dict(features=5, kernel_size=(3, 3), use_bias=False), (3, 2, 6, 6, 2)),
    (dict(features=5, kernel_size=(3, 3)), (6, 6, 2)),
]
IDS = [f"{len(s) - 2}d_{k.get('padding', 'SAME')}_{i}" for i, (k, s) in enumerate(CONVS)]


@pytest.mark.parametrize("kwargs,shape", CONVS, ids=IDS)
def test_conv_contraction_and_qconv_are_flax_conv(kwargs, shape):
    x = _x(shape)
    ref = nn.Conv(**kwargs)
    variables = ref.init(jax.random.key(1), x)
    v_ours = qn.QConv(**kwargs).init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, v_ours)
    expected = ref.apply(variables, x)
    # a rule without a weight quantizer: QAT runs jaxquant's own contraction on the float kernel
    cfg = qn.QuantConfig(mode="qat", rules=(qn.QuantRule(".*"),))
    got = qn.QConv(**kwargs, quant=cfg).apply(variables, x)
    # the same lax.conv_general_dilated on the same operands: identical
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def _im2col(x, kernel_size, strides, kernel_dilation, pads, input_dilation):
    """numpy: the input's patches, window-major then channel (the kernel's flattening)."""
    x = np.asarray(x, np.float64)
    n = len(kernel_size)
    for d, r in enumerate(input_dilation):  # insert r - 1 zeros between input elements
        if r > 1:
            shape = list(x.shape)
            shape[1 + d] = (x.shape[1 + d] - 1) * r + 1
            dil = np.zeros(shape)
            idx = [slice(None)] * x.ndim
            idx[1 + d] = slice(None, None, r)
            dil[tuple(idx)] = x
            x = dil
    x = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
    span = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    out = [(x.shape[1 + d] - span[d]) // strides[d] + 1 for d in range(n)]
    rows = []
    for b in range(x.shape[0]):
        for pos in np.ndindex(*out):
            window = x[
                (b,)
                + tuple(
                    slice(p * s, p * s + sp, dd)
                    for p, s, sp, dd in zip(pos, strides, span, kernel_dilation, strict=True)
                )
            ]
            rows.append(window.reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize(
    "kernel_size,strides,kernel_dilation,pads,input_dilation,shape",
    [
        ((3, 3), (1, 1), (1, 1), ((1, 1), (0, 2)), (1, 1), (2, 6, 5, 4)),
        ((2, 3), (2, 1), (1, 2), ((0, 1), (1, 1)), (1, 1), (1, 7, 8, 3)),
        ((3,), (2,), (1,), ((2, 0),), (2,), (2, 5, 3)),
    ],
)
def test_calibrate_gathers_the_hessian_of_the_unfolded_patches(
    kernel_size, strides, kernel_dilation, pads, input_dilation, shape
):
    x = _x(shape, seed=3)
    conv = qn.QConv(
        7,
        kernel_size,
        strides=strides,
        kernel_dilation=kernel_dilation,
        padding=pads,
        input_dilation=input_dilation,
        quant=qn.QuantConfig(mode="calibrate", rules=(qn.QuantRule(".*", weight=jn.INT4),)),
    )
    params = conv.init(jax.random.key(0), x)["params"]
    _, state = conv.apply({"params": params}, x, mutable=["qstats"])
    rows = _im2col(x, kernel_size, strides, kernel_dilation, pads, input_dilation)
    k = rows.shape[1]
    assert k == int(np.prod(kernel_size)) * shape[-1] == params["kernel"].size // 7
    h = np.asarray(state["qstats"]["hessian"], np.float64)
    # f32 sums of rows.shape[0] products of |x| < ~5: relative error ~ n * eps
    tol = rows.shape[0] * np.finfo(np.float32).eps * np.abs(rows).max() ** 2
    np.testing.assert_allclose(h, rows.T @ rows, atol=tol)
    assert float(state["qstats"]["count"]) == rows.shape[0]
    # the patches times the kernel's view are the convolution
    y = rows @ np.asarray(params["kernel"], np.float64).reshape(k, 7) + np.asarray(params["bias"])
    float_conv = conv.clone(quant=None).apply({"params": params}, x)
    np.testing.assert_allclose(y, np.asarray(float_conv).reshape(-1, 7), atol=1e-5)


def test_qat_and_serve_quantize_the_kernel_over_window_and_input_features():
    x = _x((2, 8, 8, 8))
    q = jn.INT4_G128.with_group_size(24)  # groups of 24 along the 3 * 3 * 8 = 72 contracted rows
    rules = (qn.QuantRule(".*", weight=q, act=jn.INT8),)
    layer = qn.QConv(16, (3, 3), quant=qn.QuantConfig(mode="qat", rules=rules))
    params = layer.init(jax.random.key(0), x)["params"]
    kernel = params["kernel"]
    # reference: Flax's conv with the kernel fake-quantized in its [72, 16] view, the input
    # fake-quantized per pixel over its channels
    w_q = jn.fake_quant(kernel.reshape(72, 16), q, axis=0).reshape(kernel.shape)
    x_q = jn.fake_quant(x, jn.INT8, axis=-1)
    expected = nn.Conv(16, (3, 3)).apply({"params": {**params, "kernel": w_q}}, x_q)
    got = layer.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda p: layer.apply({"params": p}, x).sum())(params)
    assert float(jnp.abs(g["kernel"]).sum()) > 0  # straight-through
    quant, report = qn.freeze(layer, params, x)
    assert quant["kernel"].shape == (72, 16) and report.weights[0].method == "rtn"
    served = layer.clone(quant=qn.QuantConfig(mode="serve", rules=rules)).apply(
        {"params": qn.serving_params(params, quant), "quant": quant}, x
    )
    w_frozen = quant["kernel"].dequantize().reshape(kernel.shape)
    expected = nn.Conv(16, (3, 3)).apply({"params": {**params, "kernel": w_frozen}}, x_q)
    np.testing.assert_allclose(np.asarray(served), np.asarray(expected), rtol=1e-5, atol=1e-5)


class CNN(nn.Module):
    """A user's small CNN of plain Flax layers (two convs, a grouped conv, two denses)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv2")(x))
        x = nn.relu(nn.Conv(16, (3, 3), feature_group_count=4, name="depthwise")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32, name="fc")(x))
        return nn.Dense(10, name="logits")(x)


@pytest.mark.filterwarnings("ignore:.*inputs are dead")  # random ReLUs that never fire
def test_quantize_model_runs_gptq_on_convs_and_rounds_grouped_convs_with_a_warning():
    model = CNN()
    x = _x((64, 8, 8, 1), seed=1)
    params = model.init(jax.random.key(0), x)["params"]
    rules = (qn.QuantRule(".*", weight=jn.get_quantizer("int3")),)
    with pytest.warns(UserWarning, match=r"no input Hessian for \['depthwise/kernel'\]"):
        quant, report = quantize_model(model, params, [x[:32], x[32:]], rules)
    rows = {r.path: r for r in report.weights}
    assert set(rows) == {"conv1/kernel", "conv2/kernel", "depthwise/kernel", "fc/kernel"}
    assert rows["depthwise/kernel"].method == "rtn"
    for path in ("conv1/kernel", "conv2/kernel", "fc/kernel"):
        assert rows[path].method == "gptq" and rows[path].error <= rows[path].rtn_error
    # the head stays float, and the report says so
    assert report.float_heads == ("logits/kernel",)
    assert "head kept in float: logits/kernel" in str(report)
    assert quant["conv2"]["kernel"].shape == (3 * 3 * 8, 16)
    serve = qn.QuantConfig(mode="serve", rules=rules)
    served = {"params": qn.serving_params(params, quant), "quant": quant}
    y = jq.apply_with_config(model, serve, served, x)
    # serving computes the float model with the dequantized kernels
    deq = {
        k: {
            **params[k],
            "kernel": quant[k]["kernel"].dequantize().reshape(params[k]["kernel"].shape),
        }
        if k in quant
        else params[k]
        for k in params
    }
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(model.apply({"params": deq}, x)), rtol=1e-4, atol=1e-4
    )


class Decoder(nn.Module):
    """A conv net with a transposed conv, which jaxquant does not quantize."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="enc")(x))
        return nn.ConvTranspose(2, (2, 2), strides=(2, 2), name="up")(x)


def test_a_layer_a_rule_reaches_but_jaxquant_cannot_quantize_is_named():
    model = Decoder()
    x = _x((2, 4, 4, 2))
    params = model.init(jax.random.key(0), x)["params"]
    rules = (qn.QuantRule(".*", weight=jn.INT8),)
    with pytest.warns(UserWarning, match=r"reaches up \(ConvTranspose.*cannot quantize"):
        quant, _ = qn.freeze(model, params, x, rules=rules)
    assert set(quant) == {"enc"}
    # a rule narrowed to the conv: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qn.freeze(model, params, x, rules=(qn.QuantRule("enc", weight=jn.INT8),))


def test_a_conv_takes_a_vector_quantizer_through_hessian_aware_vq():
    x = _x((32, 8, 8, 8), seed=2)
    layer = qn.QConv(16, (3, 3), name="conv")
    params = layer.init(jax.random.key(0), x)["params"]
    rules = (qn.QuantRule(".*", weight="e8p2"),)  # 8-dim vectors along the 72 contracted rows
    quant, report = quantize_model(layer, params, [x], rules)
    (row,) = report.weights
    assert row.method == "havq" and row.shape == (72, 16) and row.error < row.rtn_error
    served = layer.clone(quant=qn.QuantConfig(mode="serve", rules=rules)).apply(
        {"params": qn.serving_params(params, quant), "quant": quant}, x
    )
    w = quant["kernel"].dequantize().reshape(params["kernel"].shape)
    expected = nn.Conv(16, (3, 3)).apply({"params": {**params, "kernel": w}}, x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_a_masked_conv_is_left_alone_unless_a_rule_reaches_it():
    class Masked(nn.Module):
        @nn.compact
        def __call__(self, x):
            mask = jnp.ones((3, 3, 2, 4)).at[1, 1].set(0.0)
            x = nn.Conv(4, (3, 3), mask=mask, name="masked")(x)
            return nn.Conv(4, (3, 3), name="plain")(x)

    x = _x((1, 5, 5, 2))
    model = Masked()
    params = model.init(jax.random.key(0), x)["params"]
    quant, _ = qn.freeze(model, params, x, rules=(qn.QuantRule("plain", weight=jn.INT8),))
    assert set(quant) == {"plain"}
    with pytest.warns(UserWarning, match=r"reaches masked \(Conv.*cannot quantize"):
        qn.freeze(model, params, x, rules=(qn.QuantRule(".*", weight=jn.INT8),))
    with pytest.raises(ValueError, match="does not quantize a convolution with a mask"):
        qn.QConv(4, (3, 3), mask=jnp.ones((3, 3, 2, 4))).init(jax.random.key(0), x)
