"""Every fallback says what happened: one test per case a user once met silently (issue 14)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
import jaxquant.nn as qn
import jaxquant.numerics as jn
from jaxquant.ptq import quantize_model


class MLP(nn.Module):
    """A user's plain Flax model: two hidden layers and an output head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        x = nn.relu(nn.Dense(16, name="fc2")(x))
        return nn.Dense(4, name="out")(x)


@pytest.fixture(scope="module")
def mlp():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 8)), jnp.float32)
    model = MLP()
    return model, model.init(jax.random.key(0), x)["params"], x


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def test_the_last_dense_of_any_model_is_its_head_and_stays_float(mlp):
    model, params, x = mlp
    quant, report = qn.freeze(model, params, x, rules=(qn.QuantRule(".*", weight=jn.INT4),))
    assert set(quant) == {"fc1", "fc2"}
    assert "head kept in float: out/kernel (a rule with roles=('head',) quantizes it)" in str(
        report
    )
    rules = (qn.QuantRule(".*", weight=jn.INT4, roles=("linear", "head")),)
    quant, report = qn.freeze(model, params, x, rules=rules)
    assert set(quant) == {"fc1", "fc2", "out"} and not report.float_heads


class Residual(nn.Module):
    """The last Dense feeds a residual sum: not a head."""

    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(8, name="down")(nn.relu(nn.Dense(16, name="up")(x)))


def test_a_last_dense_whose_output_is_not_the_models_is_no_head():
    x = jnp.ones((2, 8))
    params = Residual().init(jax.random.key(0), x)["params"]
    quant, _ = qn.freeze(Residual(), params, x, rules=(qn.QuantRule(".*", weight=jn.INT8),))
    assert set(quant) == {"up", "down"}


def test_intercept_around_an_already_compiled_apply_quantizes(mlp):
    model, params, x = mlp
    apply = jax.jit(model.apply)
    float_out = apply({"params": params}, x)  # compiled outside any intercept
    rules = (qn.QuantRule("fc", weight=jn.INT2),)
    with qn.intercept(qn.QuantConfig(mode="qat", rules=rules)):
        qat_out = apply({"params": params}, x)  # the config is part of jit's cache key
    assert not np.allclose(qat_out, float_out)
    fq = {
        **params,
        **{
            k: {**params[k], "kernel": jn.fake_quant(params[k]["kernel"], jn.INT2)}
            for k in ("fc1", "fc2")
        },
    }
    np.testing.assert_allclose(qat_out, model.apply({"params": fq}, x), rtol=1e-5, atol=1e-5)
    # and leaving the block, the float compilation again
    np.testing.assert_array_equal(apply({"params": params}, x), float_out)


def test_a_qat_rule_that_matches_nothing_warns(mlp):
    model, params, x = mlp
    config = qn.QuantConfig(mode="qat", rules=(qn.QuantRule("conv", weight=jn.INT4),))
    with pytest.warns(UserWarning, match=r"QuantRule\('conv'.*matched no layer of MLP.*'fc1'"):
        jq.apply_with_config(model, config, {"params": params}, x)
    config = qn.QuantConfig(mode="qat", rules=(qn.QuantRule("out", weight=jn.INT4),))
    with pytest.warns(UserWarning, match=r"the head 'out' needs roles=\('head',\)"):
        jq.apply_with_config(model, config, {"params": params}, x)
    _no_warnings(
        jq.apply_with_config,
        model,
        qn.QuantConfig(mode="qat", rules=(qn.QuantRule("fc", weight=jn.INT4),)),
        {"params": params},
        x,
    )


def test_serving_with_rules_other_than_the_frozen_ones_is_an_error(mlp):
    model, params, x = mlp
    rules = (qn.QuantRule("fc", weight=jn.INT4),)
    quant, _ = qn.freeze(model, params, x, rules=rules)
    served = {"params": qn.serving_params(params, quant), "quant": quant}
    serve = qn.QuantConfig(mode="serve", rules=(qn.QuantRule("fc", weight=jn.INT8),))
    with pytest.raises(ValueError, match=r"frozen 'fc1/kernel' is not what rule 0 .*int8"):
        jq.apply_with_config(model, serve, served, x)
    serve = qn.QuantConfig(mode="serve", rules=(qn.QuantRule("fc1", weight=jn.INT4),))
    with pytest.raises(ValueError, match=r"frozen 'fc2/kernel', but no serving rule matches"):
        jq.apply_with_config(model, serve, served, x)
    # the frozen rules, or no rules at all: served as frozen
    a = jq.apply_with_config(model, qn.QuantConfig(mode="serve", rules=rules), served, x)
    b = jq.apply_with_config(model, qn.QuantConfig(mode="serve"), served, x)
    np.testing.assert_array_equal(a, b)


def test_nan_weights_are_an_error_naming_the_parameter(mlp):
    model, params, x = mlp
    bad = {
        **params,
        "fc2": {**params["fc2"], "kernel": params["fc2"]["kernel"].at[:, 3].set(jnp.nan)},
    }
    rules = (qn.QuantRule(".*", weight=jn.INT4),)
    with pytest.raises(ValueError, match=r"fc2/kernel \(int4\): .*16 NaN/Inf value"):
        qn.freeze(model, bad, x, rules=rules)
    with pytest.raises(ValueError, match=r"fc2/kernel \(int4\): .*NaN/Inf"):
        quantize_model(model, bad, [x], rules)
    with pytest.raises(ValueError, match=r"x: 1 NaN/Inf value"):
        jq.quantize(jnp.ones((8, 4)).at[1, 1].set(jnp.inf), jn.INT4, hessian=jnp.eye(8))
    with pytest.raises(ValueError, match=r"calibration inputs of fc1 contain NaN or Inf"):
        quantize_model(model, params, [x.at[0, 0].set(jnp.nan)], rules)


def test_dead_inputs_are_kept_and_an_all_zero_hessian_warns_naming_the_layer(mlp):
    model, params, x = mlp
    rules = (qn.QuantRule("fc1", weight=jn.INT4),)
    dead = x.at[:, :3].set(0.0)  # three input features never seen in calibration
    with pytest.warns(UserWarning, match=r"fc1/kernel \(int4\): hessian: 3 of 8 inputs are dead"):
        quant, _ = quantize_model(model, params, [dead], rules)
    # kept, rounded to nearest (GPTQ's reference would zero them)
    rtn = jq.quantize(params["fc1"]["kernel"], jn.INT4).dequantize()
    np.testing.assert_array_equal(quant["fc1"]["kernel"].dequantize()[:3], rtn[:3])
    with pytest.warns(UserWarning, match=r"fc1/kernel .*8 of 8 inputs are dead.*all zero"):
        quant, report = quantize_model(model, params, [jnp.zeros_like(x)], rules)
    np.testing.assert_array_equal(quant["fc1"]["kernel"].dequantize(), rtn)


def test_a_calibration_batch_of_the_wrong_shape_is_named(mlp):
    model, params, x = mlp
    rules = (qn.QuantRule("fc", weight=jn.INT4),)
    with pytest.raises(ValueError, match=r"input \(shapes .*\(64, 5\).*does not fit the params"):
        quantize_model(model, params, [x[:, :5]], rules)
    with pytest.raises(
        ValueError, match=r"calibration batch 1 \(shapes .*\(64, 6\).* does not fit"
    ):
        quantize_model(model, params, [x, x[:, :6]], rules)
    with pytest.raises(ValueError, match=r"does not fit the params"):
        qn.freeze(model, params, x[:, :5], rules=rules)


def test_gptq_with_one_scale_per_tensor_is_gptq_and_every_width_has_a_per_channel_preset(mlp):
    model, params, x = mlp
    rules = (qn.QuantRule("fc", weight=jn.IntFormat(3)),)  # a bare format: one scale per tensor
    _, report = quantize_model(model, params, [x], rules)
    assert {r.method for r in report.weights} == {"gptq"}
    assert all(r.error < r.rtn_error for r in report.weights)
    for bits in range(2, 9):
        preset = getattr(jq, f"INT{bits}")
        assert preset.name == f"int{bits}" and jq.get_quantizer(f"int{bits}") == preset
        assert preset.scaling.axis == 0 and preset.scaling.group_size is None
        grouped = jq.get_quantizer(f"int{bits}_g64")
        assert grouped.scaling.group_size == 64 and grouped.format == preset.format


# NVFP4's scalar tensor scale; per-channel scales with a size-1 axis where the weight is split
# (VQArray's shardings: tests/vq/test_vq.py)
@pytest.mark.parametrize("name", ["nvfp4", "int8", "int3", "int4_g128"])
def test_a_quantized_tensor_is_sharded_like_its_float_weight(name):
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=auto, devices=jax.devices()[:8])
    w = jax.random.normal(jax.random.key(0), (256, 64))
    weight_sharding = NamedSharding(mesh, P("a", "b"))
    q = jq.quantize(w, jq.get_quantizer(name))
    shardings = q.shardings(weight_sharding)  # scalar and size-1 scale axes replicate
    placed = jax.device_put(q, shardings)
    np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(placed), q.dequantize())
    assert placed.codes.sharding.spec[0] == "a"  # the codes keep the weight's row split


class SetupStyle(nn.Module):
    """Submodules made in setup; a second method that calls one layer."""

    def setup(self):
        self.hidden = nn.Dense(8)
        self.out = nn.Dense(4)

    def __call__(self, x):
        return self.out(nn.relu(self.hidden(x)))

    def features(self, x):
        return self.hidden(x)


def test_init_and_other_methods_under_intercept_with_a_head_left_float():
    model, x = SetupStyle(), jnp.ones((2, 3))
    rules = (qn.QuantRule(".*", weight=jn.INT4),)
    with qn.intercept(qn.QuantConfig(mode="qat", rules=rules)):
        variables = _no_warnings(model.init, jax.random.key(0), x)  # the float head: once
        y = model.apply(variables, x)
        f = model.apply(variables, x, method=model.features)
    assert jax.tree.map(jnp.shape, variables["params"]) == {
        "hidden": {"kernel": (3, 8), "bias": (8,)},
        "out": {"kernel": (8, 4), "bias": (4,)},
    }
    p = variables["params"]
    fq = {**p, "hidden": {**p["hidden"], "kernel": jn.fake_quant(p["hidden"]["kernel"], jn.INT4)}}
    np.testing.assert_allclose(y, model.apply({"params": fq}, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        f, model.apply({"params": fq}, x, method=model.features), rtol=1e-6, atol=1e-6
    )
