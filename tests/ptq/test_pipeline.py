"""quantize_model: layer-sequential GPTQ over a model, checked against an independent pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxquant.numerics as jn
from jaxquant.models import Llama, LlamaConfig
from jaxquant.nn import QuantConfig, QuantRule, freeze, intercept, serving_params
from jaxquant.ptq import quantize_model
from jaxquant.vq import KMeans, VectorQuantizer

RULES = (QuantRule(".*", weight=jn.INT4_G128.with_group_size(16)),)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: jn.is_quantized(x))


def _dequantized_params(params, quant):
    """params with every quantized kernel replaced by its dequantized value."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, q in _flat(quant).items():
        flat[path] = q.dequantize(jnp.float32).reshape(flat[path].shape)
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig(
        vocab_size=48, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64
    )
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(0), (6, 16), 0, 48)
    params = model.init(jax.random.key(1), tokens)["params"]
    params = nn.unbox(params)
    batches = [tokens[:3], tokens[3:]]
    quant, report = quantize_model(model, params, batches, RULES)
    return model, params, batches, quant, report


def test_every_matched_layer_is_quantized_and_served_logits_equal_dequantized(llama):
    model, params, batches, quant, report = llama
    rtn_quant, _ = freeze(model, params, batches[0], rules=RULES)
    assert set(_flat(quant)) == set(_flat(rtn_quant))  # every rule-matched weight
    assert all(r.method == "gptq" for r in report.weights) and len(report.weights) == 14
    served = model.clone(quant=QuantConfig(mode="serve", rules=RULES))
    tokens = jnp.concatenate(batches)
    got = served.apply({"params": serving_params(params, quant), "quant": quant}, tokens)
    want = model.apply({"params": _dequantized_params(params, quant)}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _independent_hessians(model, params, batches, quant, block: int):
    """Block ``block``'s input Hessians from an independent pass: the whole float model in
    calibrate mode, with the blocks before it (only those) dequantized."""
    before = {p: q for p, q in _flat(quant).items() if int(p.split("/")[0][-1]) < block}
    p_i = _dequantized_params(params, traverse_util.unflatten_dict(before, sep="/"))
    calibrate = model.clone(quant=QuantConfig(mode="calibrate", rules=RULES))
    hess = None
    for b in batches:
        _, st = calibrate.apply({"params": p_i}, b, mutable=["qstats"])
        st = traverse_util.flatten_dict(st["qstats"], sep="/")
        hess = st if hess is None else {k: hess[k] + st[k] for k in st}
    return hess


def test_each_block_is_quantized_from_the_outputs_of_the_quantized_blocks_before_it(llama):
    """An independent pass: the whole float model in calibrate mode, with the blocks before
    block i (only those) dequantized, gives block i's Hessians; GPTQ on them gives the same
    codes as the pipeline."""
    model, params, batches, quant, _ = llama
    flat_q = _flat(quant)
    for i in range(2):
        hess = _independent_hessians(model, params, batches, quant, i)
        for layer in ("attn/query", "attn/out", "mlp/down"):
            path = f"layers_{i}/{layer}"
            q = flat_q[f"{path}/kernel"]
            w = traverse_util.flatten_dict(params, sep="/")[f"{path}/kernel"]
            w2 = np.asarray(w).reshape(q.shape[0], -1)  # contracting axes first in these views
            want = jn.gptq(w2, hess[f"{path}/hessian"], RULES[0].weight)
            got = q.dequantize(jnp.float32).reshape(w2.shape)
            np.testing.assert_allclose(got, want.dequantize(jnp.float32), atol=1e-6, err_msg=path)


def test_gptq_beats_rtn_on_every_layer_of_the_report(llama):
    *_, report = llama
    for r in report.weights:
        assert r.error < r.rtn_error, r


@pytest.mark.parametrize("order", ["act", "babai"])
def test_row_orders_run_through_the_pipeline_with_static_groups(llama, order):
    model, params, batches, _, _ = llama
    rules = (QuantRule("layers_1/mlp", weight=jn.INT3_G128.with_group_size(16)),)
    _, report = quantize_model(model, params, batches, rules, order=order)
    assert [r.path for r in report.weights] == [  # in call order
        f"layers_1/mlp/{n}/kernel" for n in ("gate", "up", "down")
    ]
    for r in report.weights:
        assert r.method == "gptq" and r.error < r.rtn_error, r


def test_the_rtn_baseline_of_the_report_is_freeze(llama):
    """Round to nearest of a model is ``freeze``; quantize_model's ``rtn_error`` of each weight
    is the layer error of freeze's weight on the Hessian the pipeline gathered for it."""
    model, params, batches, quant, report = llama
    rtn_quant, rtn_report = freeze(model, params, batches[0], rules=RULES)
    assert all(r.method == "rtn" for r in rtn_report.weights)
    layout = lambda r: (r.path, r.rule, r.quantizer, r.shape, r.bits_per_weight, r.nbytes)  # noqa: E731
    assert [layout(r) for r in rtn_report.weights] == [layout(r) for r in report.weights]
    flat_params = traverse_util.flatten_dict(params, sep="/")
    flat_rtn = _flat(rtn_quant)
    rows = {r.path: r for r in report.weights}
    checked = 0
    for i in range(2):
        hess = _independent_hessians(model, params, batches, quant, i)
        for path, r in rows.items():
            if not path.startswith(f"layers_{i}/"):
                continue
            q = flat_rtn[path]
            w2 = np.asarray(flat_params[path]).reshape(q.shape[0], -1)  # contracted axes first
            h = hess[path.rsplit("/", 1)[0] + "/hessian"]
            err = float(jn.layer_error(w2, q.dequantize(jnp.float32).reshape(w2.shape), h))
            assert r.rtn_error == pytest.approx(err, rel=1e-5), path
            checked += 1
    assert checked == 14


class _Foreign(nn.Module):
    """Plain Flax layers only: a prologue projection, two residual blocks, an output layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, name="proj_in")(x)
        for i in range(2):
            x = _ForeignBlock(name=f"block{i}")(x)
        return nn.Dense(8, name="proj_out")(nn.relu(x))


class _ForeignBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(32, name="down")(nn.gelu(nn.Dense(64, name="up")(x)))


def test_foreign_model_with_prologue_and_epilogue_layers():
    model = _Foreign()
    x = jax.random.normal(jax.random.key(0), (64, 16))
    params = model.init(jax.random.key(1), x)["params"]
    # proj_out, the last layer, is the model's head: the rule names that role too
    rules = (QuantRule(".*", weight=jn.INT3_G128.with_group_size(16), roles=("linear", "head")),)
    quant, report = quantize_model(model, params, [x[:32], x[32:]], rules, blocks=r"block\d")
    stages = {r.path: r.stage for r in report.weights}
    assert stages["proj_in/kernel"] == "prologue" and stages["proj_out/kernel"] == "epilogue"
    assert stages["block1/up/kernel"] == "block1"
    # The epilogue's Hessian is gathered after every block is quantized.
    p_q = _dequantized_params(params, quant)
    with intercept(QuantConfig(mode="calibrate", rules=rules)):
        hess = sum(
            model.apply({"params": p_q}, xb, mutable=["qstats"])[1]["qstats"]["proj_out"]["hessian"]
            for xb in (x[:32], x[32:])
        )
    want = jn.gptq(params["proj_out"]["kernel"], hess, rules[0].weight)
    np.testing.assert_allclose(
        quant["proj_out"]["kernel"].dequantize(), want.dequantize(), atol=1e-6
    )
    with intercept(QuantConfig(mode="serve", rules=rules)):
        got = model.apply({"params": serving_params(params, quant), "quant": quant}, x)
    np.testing.assert_allclose(got, model.apply({"params": p_q}, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis,group", [((4, 32, 6), 1, 16), ((32, 3, 5), 0, None)])
def test_matrix_layout_round_trip_equals_quantize_in_the_view(shape, axis, group):
    """A weight quantized with a Hessian runs GPTQ on its ``[K, rest]`` matrix and moves the
    codes and scales back to its own layout. With a diagonal Hessian GPTQ propagates no error,
    so the result must be round to nearest in the weight's own layout, bit for bit."""
    w = jax.random.normal(jax.random.key(2), shape)
    quantizer = jn.INT4.with_group_size(group)
    want = jn.quantize(w, quantizer, axis=axis)
    assert want.scaling == jn.Scaling(axis=axis, group_size=group)
    got = jn.quantize(w, quantizer, axis=axis, hessian=jnp.eye(shape[axis]))
    assert (got.shape, got.scaling, got.format) == (want.shape, want.scaling, want.format)
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.scale, want.scale)
    np.testing.assert_array_equal(got.dequantize(), want.dequantize())


class _TupleBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x), x


class _TupleModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _TupleBlock(name="layers_0")(x)[0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rules=()), "rules"),
        (dict(rules=(QuantRule("nothing_here", weight=jn.INT4),)), "no rule matched"),
        (dict(batches=[]), "empty"),
        (dict(order="random"), "order"),
    ],
)
def test_bad_input_raises(llama, kwargs, match):
    model, params, batches, _, _ = llama
    with pytest.raises(ValueError, match=match):
        quantize_model(
            model,
            params,
            kwargs.pop("batches", batches),
            kwargs.pop("rules", RULES),
            **kwargs,
        )


def test_removed_options_are_rejected(llama):
    """``method`` is gone (round to nearest is ``freeze``): passing it is an error."""
    model, params, batches, _, _ = llama
    with pytest.raises(TypeError, match="method"):
        quantize_model(model, params, batches, RULES, method="awq")


def test_a_vector_quantizer_rejects_a_gptq_row_order(llama):
    model, params, batches, _, _ = llama
    rules = (QuantRule("layers_1/mlp", weight=VectorQuantizer(KMeans(2, 4))),)
    with pytest.raises(ValueError, match=r"order='act' is a GPTQ option"):
        quantize_model(model, params, batches, rules, order="act")


def test_a_block_that_does_not_return_its_input_shape_is_rejected():
    model = _TupleModel()
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="first argument"):
        quantize_model(model, params, [x], (QuantRule(".*", weight=jn.INT8),))
