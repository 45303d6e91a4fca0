"""Training recipes selected by rules: every quantizable layer type runs train_matmul on its
2-D view, delayed-scaling state lives in '_overwrite_with_gradient', bad use gets clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.nn import QDense, QuantConfig, QuantRule, intercept
from jaxquant.numerics import INT8
from jaxquant.numerics import training as T
from jaxquant.train import trainer

FLOAT = T.TrainingRecipe(name="float")  # every product in float: the layer's own math


def _qat(recipe):
    return QuantConfig(mode="qat", rules=(QuantRule(".*", train=recipe),))


def _apply(model, variables, x, config, **kw):
    with intercept(config, check_rules=False):
        return model.apply(variables, x, **kw)


def test_dense_runs_train_matmul_on_its_2d_view_forward_and_backward():
    model = nn.Dense(48)
    x = jax.random.normal(jax.random.key(0), (2, 16, 64))
    params = model.init(jax.random.key(1), x)["params"]
    recipe = T.FP8_ROWWISE_TRAIN

    def layer(p, x):
        return _apply(model, {"params": p}, x, _qat(recipe))

    def direct(p, x):
        y = T.train_matmul(x.reshape(-1, 64), p["kernel"], recipe)
        return y.reshape(2, 16, 48) + p["bias"]

    g = jax.random.normal(jax.random.key(2), (2, 16, 48))

    @jax.jit
    def run(p, x):
        out = {}
        for name, f in (("layer", layer), ("direct", direct)):
            y, vjp = jax.vjp(f, p, x)
            out[name] = (y, vjp(g))
        return out

    out = run(params, x)
    for a, b in zip(jax.tree.leaves(out["layer"]), jax.tree.leaves(out["direct"]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.DenseGeneral((4, 8), axis=(-2, -1)), (3, 5, 4, 16)),
        (lambda: nn.Einsum((32, 24), "btk,kf->btf"), (3, 5, 32)),
        (lambda: nn.Conv(16, (3, 3), padding="SAME"), (2, 6, 6, 4)),
        (lambda: nn.Conv(8, (2,), strides=2, padding="VALID"), (3, 10, 5)),
    ],
    ids=["dense_general", "einsum", "conv2d", "conv1d_strided"],
)
def test_float_recipe_reproduces_each_layer_type_and_its_gradients(make, shape):
    """With every product in float, the recipe path (the layer as one 2-D matmul: for a
    convolution its patches times the kernel's view) is the layer's own math."""
    model = make()
    x = jax.random.normal(jax.random.key(3), shape)
    params = model.init(jax.random.key(4), x)["params"]

    def loss(p, x, config):
        return jnp.sum(jnp.sin(_apply(model, {"params": p}, x, config)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    want = grad(params, x, QuantConfig())
    got = grad(params, x, _qat(FLOAT))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_delayed_scaling_state_lives_in_overwrite_with_gradient():
    model = nn.Dense(32)
    x = jax.random.normal(jax.random.key(5), (16, 64))
    config = _qat(T.FP8_DELAYED_TRAIN)
    with intercept(config):
        variables = model.init(jax.random.key(6), x)
    hist = variables[T.OVERWRITE_COLLECTION]["kernel_amax_history"]
    assert set(hist) == set(T.FP8_DELAYED_TRAIN.history_names())

    def loss(p, o):
        return jnp.sum(_apply(model, {"params": p, T.OVERWRITE_COLLECTION: o}, x, config) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    _, new = grad(variables["params"], variables[T.OVERWRITE_COLLECTION])
    new = new["kernel_amax_history"]
    assert float(new["forward_lhs"][0]) == float(jnp.max(jnp.abs(x)))
    assert float(new["forward_rhs"][0]) == float(jnp.max(jnp.abs(variables["params"]["kernel"])))


def test_random_recipes_draw_from_the_train_recipe_rng_stream():
    model = nn.Dense(32)
    x = jax.random.normal(jax.random.key(7), (16, 64))
    params = model.init(jax.random.key(8), x)["params"]
    config = _qat(T.NVFP4_TRAIN)

    def loss(p, rngs):
        return jnp.sum(_apply(model, {"params": p}, x, config, **rngs) ** 2)

    with pytest.raises(ValueError, match="train_recipe"):
        jax.eval_shape(jax.grad(loss), params, {})
    grad = jax.jit(lambda p, key: jax.grad(loss)(p, {"rngs": {T.RNG_STREAM: key}}))
    a = grad(params, jax.random.key(0))
    b = grad(params, jax.random.key(1))
    assert not np.array_equal(a["kernel"], b["kernel"])
    # the forward alone draws nothing: evaluation needs no rng
    assert _apply(model, {"params": params}, x, config).shape == (16, 32)


def test_layers_a_recipe_cannot_run_get_errors_that_name_them():
    with pytest.raises(ValueError, match="drop weight= and act="):
        QuantRule(".*", weight=INT8, train="fp8")
    with pytest.raises(ValueError, match="training recipe 'fp9'"):
        QuantRule(".*", train="fp9")
    batched = nn.DenseGeneral(8, axis=-1, batch_dims=0)
    x = jnp.ones((4, 3, 16))
    params = batched.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="DenseGeneral.*not one"):
        _apply(batched, {"params": params}, x, _qat("fp8"))
    conv = nn.Conv(8, (3, 3))
    x = jnp.ones((2, 8, 8, 3))  # K = 27: no blocks of 32
    params = conv.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="<root> \\(Conv\\).*not divide"):
        _apply(conv, {"params": params}, x, _qat("mxfp4_quartet"))


def test_jaxquant_layers_take_the_rule_through_their_quant_field():
    layer = QDense(32, quant=_qat(T.FP8_TRAIN))
    x = jax.random.normal(jax.random.key(9), (8, 64))
    params = layer.init(jax.random.key(10), x)["params"]
    y = layer.apply({"params": params}, x)
    want = T.train_matmul(x, params["kernel"], T.FP8_TRAIN) + params["bias"]
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("num_layers, kept", [(1, ()), (4, (3,)), (16, (14, 15))])
def test_nvfp4_rules_keep_the_last_blocks_in_high_precision(num_layers, kept):
    config = QuantConfig(mode="qat", rules=trainer.train_rules("nvfp4", num_layers))
    for i in range(num_layers):
        rule = config.match(f"layers_{i}/mlp/up")
        assert (rule.train is None) == (i in kept), i
    rules = trainer.train_rules("fp8_delayed", 4)
    assert [r.train.name for r in rules] == ["fp8_delayed"]
