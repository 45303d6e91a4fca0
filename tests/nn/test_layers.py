"""jaxquant.nn: drop-in layers, every mode against a direct computation, freeze, intercept."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.nn as qn
import jaxquant.numerics as jn
from jaxquant.numerics import Scaling

W8A8 = (qn.QuantRule("Dense", weight=jn.INT8, act=jn.INT8.on_axis(-1)),)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


DROP_INS = [
    ("dense", lambda q: qn.QDense(24, quant=q), lambda: nn.Dense(24), (5, 16)),
    (
        "dense_general_features",
        lambda q: qn.QDenseGeneral((3, 8), quant=q),
        lambda: nn.DenseGeneral((3, 8)),
        (2, 5, 16),
    ),
    (
        "dense_general_axes",
        lambda q: qn.QDenseGeneral(12, axis=(-2, -1), quant=q),
        lambda: nn.DenseGeneral(12, axis=(-2, -1)),
        (2, 3, 8),
    ),
    (
        "einsum",
        lambda q: qn.QEinsum((16, 4, 6), "btd,dhk->bthk", quant=q),
        lambda: nn.Einsum((16, 4, 6), "btd,dhk->bthk"),
        (2, 5, 16),
    ),
]


@pytest.mark.parametrize("name,make_q,make_flax,shape", DROP_INS, ids=[d[0] for d in DROP_INS])
def test_layers_are_drop_in_for_flax(name, make_q, make_flax, shape):
    x = _x(shape)
    ref = make_flax()
    ours = make_q(None)
    v_ref = ref.init(jax.random.key(1), x)
    v_ours = ours.init(jax.random.key(1), x)
    assert jax.tree.structure(v_ref) == jax.tree.structure(v_ours)
    for a, b in zip(jax.tree.leaves(v_ref), jax.tree.leaves(v_ours), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same initializers
    np.testing.assert_array_equal(ref.apply(v_ref, x), ours.apply(v_ref, x))


def test_embed_is_drop_in_and_attends():
    ids = jnp.array([[1, 5, 9]])
    ref, ours = nn.Embed(11, 8), qn.QEmbed(11, 8)
    v = ref.init(jax.random.key(0), ids)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, ours.init(jax.random.key(0), ids))
    np.testing.assert_array_equal(ref.apply(v, ids), ours.apply(v, ids))
    q = _x((2, 8))
    np.testing.assert_allclose(
        ref.apply(v, q, method="attend"), ours.apply(v, q, method="attend"), rtol=1e-6
    )


@pytest.mark.parametrize("name,make_q,make_flax,shape", DROP_INS, ids=[d[0] for d in DROP_INS])
def test_qat_equals_fake_quant_of_weight_and_input(name, make_q, make_flax, shape):
    x = _x(shape)
    rules = (qn.QuantRule(".*", weight=jn.INT4_G128.with_group_size(4), act=jn.INT8),)
    variables = make_flax().init(jax.random.key(1), x)
    kernel = variables["params"]["kernel"]
    contracting = {
        "dense": (0,),
        "dense_general_features": (0,),
        "dense_general_axes": (0, 1),
        "einsum": (0,),
    }[name]
    # reference: the float layer run on fake-quantized kernel and input (numerics directly)
    w_axis = contracting[-1]
    w_q = jn.fake_quant(
        kernel, jn.ScalarQuantizer(jn.IntFormat(4), Scaling(axis=w_axis, group_size=4))
    )
    x_axes = tuple(range(x.ndim - len(contracting), x.ndim))
    x_scaling = Scaling(axis=x_axes if len(x_axes) > 1 else x_axes[0])
    x_q = jn.fake_quant(x, jn.ScalarQuantizer(jn.IntFormat(8), x_scaling))
    ref_vars = {"params": {**variables["params"], "kernel": w_q}}
    expected = make_flax().apply(ref_vars, x_q)
    got = make_q(qn.QuantConfig(mode="qat", rules=rules)).apply(variables, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(make_flax().apply(variables, x)))
    # straight-through: the kernel still gets a gradient
    g = jax.grad(
        lambda p: make_q(qn.QuantConfig(mode="qat", rules=rules)).apply({"params": p}, x).sum()
    )(variables["params"])
    assert float(jnp.abs(g["kernel"]).sum()) > 0


class _Tiny(nn.Module):
    """A two-layer MLP with an embedding and a head, built from jaxquant layers."""

    quant: qn.QuantConfig | None = None

    @nn.compact
    def __call__(self, ids):
        emb = qn.QEmbed(32, 16, quant=self.quant, name="embed")
        h = emb(ids)
        h = nn.relu(qn.QDense(64, quant=self.quant, name="up")(h))
        h = qn.QDenseGeneral(16, quant=self.quant, name="down")(h)
        return qn.QDense(32, quant=self.quant, role="head", name="head")(h)


def _tiny(ids):
    model = _Tiny()
    return model, model.init(jax.random.key(0), ids)["params"]


def test_freeze_then_serve_equals_qat_and_the_quant_tree_is_exact():
    ids = jnp.arange(12).reshape(3, 4) % 32
    model, params = _tiny(ids)
    rules = (
        qn.QuantRule("up", weight=jn.INT4_G128.with_group_size(8)),
        qn.QuantRule("down", weight=jn.MXFP4.with_group_size(32), act=jn.INT8.on_axis(-1)),
        qn.QuantRule("nothing_here", weight=jn.INT8),
    )
    quant, report = qn.freeze(model, params, ids, rules=rules)
    assert jax.tree.map(
        lambda q: (q.shape, q.format.name), quant, is_leaf=lambda x: isinstance(x, jn.QArray)
    ) == {
        "up": {"kernel": ((16, 64), "int4")},
        "down": {"kernel": ((64, 16), "e2m1")},
    }
    assert quant["up"]["kernel"].scale.shape == (2, 64)
    served = {"params": qn.serving_params(params, quant), "quant": quant}
    assert "kernel" not in served["params"]["up"] and "bias" in served["params"]["up"]
    assert "kernel" in served["params"]["head"]  # the head stays float
    with jn.kernel_options(implementation="xla"):  # the reference matmul sums as QAT does
        serve = _Tiny(qn.QuantConfig(mode="serve", rules=rules)).apply(served, ids)
    qat = _Tiny(qn.QuantConfig(mode="qat", rules=rules)).apply({"params": params}, ids)
    np.testing.assert_array_equal(np.asarray(serve), np.asarray(qat))
    # report: rows (in call order), the rule that matched nothing, honest sizes
    assert [(r.path, r.rule, r.quantizer, r.method) for r in report.weights] == [
        ("up/kernel", "up", "int4_g8", "rtn"),
        ("down/kernel", "down", "mxfp4", "rtn"),
    ]
    assert report.unmatched_rules == (rules[2],)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert report.float_params + report.quant_params == n_params
    q_bytes = sum(
        q.nbytes for q in jax.tree.leaves(quant, is_leaf=lambda x: isinstance(x, jn.QArray))
    )
    assert report.quant_bytes == q_bytes
    assert report.bits_per_weight == pytest.approx(8 * (q_bytes + report.float_bytes) / n_params)
    assert "rule matched nothing: QuantRule('nothing_here')" in str(report)


def test_embeddings_and_head_stay_float_unless_a_rule_names_their_role():
    ids = jnp.arange(8).reshape(2, 4)
    model, params = _tiny(ids)
    everything = (qn.QuantRule(".*", weight=jn.INT8),)
    quant, _ = qn.freeze(model, params, ids, rules=everything)
    assert set(quant) == {"up", "down"}
    named = (qn.QuantRule(".*", weight=jn.INT8, roles=("linear", "embedding", "head")),)
    quant, _ = qn.freeze(model, params, ids, rules=named)
    assert set(quant) == {"embed", "up", "down", "head"}
    assert quant["embed"]["embedding"].scale.shape == (32, 1)  # one scale per row
    served = {"params": qn.serving_params(params, quant), "quant": quant}
    out = _Tiny(qn.QuantConfig(mode="serve", rules=named)).apply(served, ids)
    assert out.shape == (2, 4, 32)


def test_calibrate_accumulates_the_input_hessian():
    ids = jnp.arange(12).reshape(3, 4) % 32
    model, params = _tiny(ids)
    cal = _Tiny(qn.QuantConfig(mode="calibrate", rules=(qn.QuantRule("up|down", weight=jn.INT4),)))
    stats = {}
    hidden = []
    for batch in (ids, (ids * 7 + 3) % 32):
        _, state = cal.apply({"params": params, **stats}, batch, mutable=["qstats"])
        stats = {"qstats": state["qstats"]}
        hidden.append(np.asarray(params["embed"]["embedding"])[np.asarray(batch)].reshape(-1, 16))
    assert jax.tree.map(jnp.shape, stats["qstats"]) == {
        "up": {"absmax": (), "count": (), "hessian": (16, 16)},
        "down": {"absmax": (), "count": (), "hessian": (64, 64)},
    }
    x = np.concatenate(hidden).astype(np.float64)
    np.testing.assert_allclose(stats["qstats"]["up"]["hessian"], x.T @ x, rtol=1e-5, atol=1e-5)
    assert float(stats["qstats"]["up"]["count"]) == 24
    assert float(stats["qstats"]["up"]["absmax"]) == pytest.approx(np.abs(x).max())


def test_lsq_scales_are_params_and_freeze_uses_them():
    x = _x((8, 32))
    spec = dataclasses.replace(jn.INT4, qat="lsq")
    act = jn.ScalarQuantizer(jn.IntFormat(8), qat="lsq")
    config = qn.QuantConfig(mode="qat", rules=(qn.QuantRule(".*", weight=spec, act=act),))
    layer = qn.QDense(16, quant=config)
    params = layer.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "kernel": (32, 16),
        "kernel_scale": (1, 16),
        "bias": (16,),
        "input_scale": (1, 1),
    }
    g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(params)
    assert (
        float(jnp.abs(g["kernel_scale"]).sum()) > 0 and float(jnp.abs(g["input_scale"]).sum()) > 0
    )
    params = {**params, "kernel_scale": params["kernel_scale"] * 1.3}
    quant, _ = qn.freeze(qn.QDense(16, quant=config), params, x)
    np.testing.assert_array_equal(quant["kernel"].scale, params["kernel_scale"])
    served = {"params": qn.serving_params(params, quant), "quant": quant}
    serve = qn.QDense(16, quant=config.with_mode("serve")).apply(served, x)
    np.testing.assert_allclose(serve, layer.apply({"params": params}, x), rtol=1e-6, atol=1e-6)


class _Foreign(nn.Module):
    """A model written with plain Flax layers only."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, name="fc1")(x)
        x = nn.DenseGeneral((2, 8), name="split")(nn.gelu(x))
        return nn.Einsum((2, 8, 4), "bhk,hkd->bd", name="merge")(x)


def test_intercept_quantizes_a_model_written_with_plain_flax_layers():
    x = _x((4, 12))
    model = _Foreign()
    params = model.init(jax.random.key(0), x)["params"]
    # merge, the last layer, is the model's head: the rule names that role to quantize it
    rules = (
        qn.QuantRule("fc1|merge", weight=jn.INT4, roles=("linear", "head")),
        qn.QuantRule("split", weight=jn.INT8),
    )
    qat_cfg = qn.QuantConfig(mode="qat", rules=rules)

    @jax.jit
    def qat(params, x):
        with qn.intercept(qat_cfg):
            return model.apply({"params": params}, x)

    # reference: the same plain model with its kernels fake-quantized along contracting axes
    p = params
    ref_params = {
        "fc1": {**p["fc1"], "kernel": jn.fake_quant(p["fc1"]["kernel"], jn.INT4)},
        "split": {**p["split"], "kernel": jn.fake_quant(p["split"]["kernel"], jn.INT8)},
        "merge": {
            **p["merge"],
            "kernel": jn.fake_quant(
                p["merge"]["kernel"], jn.ScalarQuantizer(jn.IntFormat(4), Scaling(axis=(0, 1)))
            ),
        },
    }
    np.testing.assert_allclose(qat(params, x), model.apply({"params": ref_params}, x), rtol=1e-5)
    float_out = model.apply({"params": params}, x)
    assert not np.allclose(qat(params, x), float_out)
    quant, report = qn.freeze(model, params, x, rules=rules)
    assert set(quant) == {"fc1", "split", "merge"} and not report.unmatched_rules
    with qn.intercept(qat_cfg.with_mode("serve")):
        served = model.apply({"params": qn.serving_params(params, quant), "quant": quant}, x)
    np.testing.assert_allclose(served, qat(params, x), rtol=1e-6, atol=1e-6)


def test_qat_under_jit_does_not_recompile_and_keeps_dtypes():
    x = _x((4, 16)).astype(jnp.bfloat16)
    layer = qn.QDense(8, dtype=jnp.bfloat16, quant=qn.QuantConfig(mode="qat", rules=W8A8))
    params = layer.init(jax.random.key(0), x)["params"]
    f = jax.jit(layer.apply)
    y = f({"params": params}, x)
    assert y.dtype == jnp.bfloat16 and params["kernel"].dtype == jnp.float32
    f({"params": params}, x + 1)
    assert f._cache_size() == 1


BAD = [
    (lambda: qn.QuantConfig(mode="train"), ValueError, "mode='train'"),
    (lambda: qn.QuantRule("(", weight=jn.INT8), ValueError, "not a regular expression"),
    (lambda: qn.QuantRule(".*", weight=8), TypeError, "expected a Quantizer"),
    (lambda: qn.QuantRule(".*", weight="int8_bogus"), ValueError, "bogus"),
    (lambda: qn.QuantRule(".*", weight=jn.INT8, roles=("conv",)), ValueError, "roles"),
    (lambda: qn.QuantRule(".*", weight="int8_sr"), ValueError, "stochastic"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[b[2] for b in BAD])
def test_bad_config_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_mode_errors_name_the_problem():
    x = _x((2, 8))
    rules = (qn.QuantRule(".*", weight=jn.INT8),)
    params = qn.QDense(4).init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="run freeze or quantize_model first"):
        qn.QDense(4, quant=qn.QuantConfig(mode="serve", rules=rules)).apply(
            {"params": {"bias": params["bias"]}}, x
        )
    with pytest.raises(ValueError, match=r"mutable=\['qstats'\]"):
        qn.QDense(4, quant=qn.QuantConfig(mode="calibrate")).apply({"params": params}, x)
    with pytest.raises(ValueError, match="mode='freeze'"):  # freeze is a function, not a mode
        qn.QuantConfig(mode="freeze", rules=rules)
    lsq_token = dataclasses.replace(jn.INT8, qat="lsq")  # INT8 is per-channel: not learnable
    cfg = qn.QuantConfig(mode="qat", rules=(qn.QuantRule(".*", act=lsq_token),))
    with pytest.raises(ValueError, match="per-tensor"):
        qn.QDense(4, quant=cfg).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="pass rules"):
        qn.freeze(nn.Dense(4), params, x)


def test_multi_axis_contractions_are_quantized_as_one_merged_axis():
    # out-projection-like kernel [heads=3, head_dim=4, 12]: a group of 6 spans heads
    x = _x((2, 5, 3, 4))
    rules = (qn.QuantRule(".*", weight=jn.INT4_G128.with_group_size(6)),)
    layer = qn.QDenseGeneral(12, axis=(-2, -1), quant=qn.QuantConfig(mode="qat", rules=rules))
    params = layer.init(jax.random.key(0), x)["params"]
    w = params["kernel"]
    expected_w = jn.fake_quant(w.reshape(12, 12), jn.INT4_G128.with_group_size(6)).reshape(w.shape)
    expected = nn.DenseGeneral(12, axis=(-2, -1)).apply(
        {"params": {**params, "kernel": expected_w}}, x
    )
    np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=1e-6)
    quant, _ = qn.freeze(layer, params, x)
    assert quant["kernel"].shape == (12, 12) and quant["kernel"].scale.shape == (2, 12)
    served = {"params": qn.serving_params(params, quant), "quant": quant}
    served_layer = qn.QDenseGeneral(12, axis=(-2, -1), quant=layer.quant.with_mode("serve"))
    qat = layer.apply({"params": params}, x)
    with jn.kernel_options(implementation="xla"):  # QAT's summation order: bit for bit
        np.testing.assert_array_equal(served_layer.apply(served, x), qat)
    # the default path (the CPU kernel here) sums in its own order: f32 rounding over K = 12
    np.testing.assert_allclose(
        served_layer.apply(served, x), qat, rtol=0, atol=1e-6 * np.abs(qat).max()
    )


class _Zoo(nn.Module):
    """One of each layer, each contracting a different way."""

    quant: qn.QuantConfig | None = None

    @nn.compact
    def __call__(self, ids):
        h = qn.QEmbed(32, 16, quant=self.quant, name="embed")(ids)  # [b, t, 16]
        h = qn.QDense(24, quant=self.quant, name="fc")(h)  # [b, t, 24]
        h = h.reshape(h.shape[:2] + (3, 8))
        h = qn.QDenseGeneral(12, axis=(-2, -1), quant=self.quant, name="merge")(h)  # [b, t, 12]
        h = qn.QEinsum((2, 12, 4), "btd,hdk->bthk", quant=self.quant, name="heads")(h)
        h = qn.QEinsum((2, 4, 4), "bthk,hkf->bthf", quant=self.quant, name="batched")(h)
        h = h.reshape(h.shape[:2] + (8,))
        return qn.QDense(32, quant=self.quant, role="head", name="head")(h)


def test_layer_infos_report_rule_view_and_contracted_axes_of_every_layer():
    ids = jnp.zeros((2, 5), jnp.int32)
    model = _Zoo()
    params = model.init(jax.random.key(0), ids)["params"]
    rules = (
        qn.QuantRule("nothing_here", weight=jn.INT8),
        qn.QuantRule("fc|heads", weight=jn.INT8),
        qn.QuantRule("merge|batched", weight=jn.INT4),
        qn.QuantRule("embed", weight=jn.INT8, roles=("embedding",)),
    )
    infos = qn.layer_infos(model, params, ids, rules=rules)
    LI = qn.LayerInfo
    assert infos == (
        # a lookup table: scales along the features, no input Hessian
        LI("embed", "embedding", "embedding", 3, (32, 16), (32, 16), (1,), False),
        LI("fc", "kernel", "linear", 1, (16, 24), (16, 24), (0,), True),
        # heads x head_dim contracted: merged into one axis of 24
        LI("merge", "kernel", "linear", 2, (3, 8, 12), (24, 12), (0,), True),
        # the contracted letter 'd' is the kernel's axis 1
        LI("heads", "kernel", "linear", 1, (2, 12, 4), (2, 12, 4), (1,), True),
        # 'h' is a batch axis: no single input Hessian
        LI("batched", "kernel", "linear", 2, (2, 4, 4), (2, 4, 4), (1,), False),
        LI("head", "kernel", "head", None, (8, 32), (8, 32), (0,), True),  # no rule names heads
    )
    assert [i.param_path for i in infos][:2] == ["embed/embedding", "fc/kernel"]
    # a model of plain Flax layers: seen through intercept, the same description
    x = _x((4, 12))
    foreign = _Foreign()
    p = foreign.init(jax.random.key(0), x)["params"]
    rules = (qn.QuantRule("split", weight=jn.INT8), qn.QuantRule("fc1|merge", weight=jn.INT4))
    assert qn.layer_infos(foreign, p, x, rules=rules) == (
        LI("fc1", "kernel", "linear", 1, (12, 32), (12, 32), (0,), True),
        LI("split", "kernel", "linear", 0, (32, 2, 8), (32, 2, 8), (0,), True),
        # the last layer of a plain model is its head: rules skip it unless they name it
        LI("merge", "kernel", "head", None, (2, 8, 4), (16, 4), (0,), True),
    )


def _doubled_dot_general(*args, **kwargs):
    """A dot_general only Flax's own ``__call__`` knows about (the layers' ``dot_general``
    field): a layer computing its matmul another way would not double it."""
    return 2.0 * jax.lax.dot_general(*args, **kwargs)


FLAX_CALLS = [
    ("dense", lambda q: qn.QDense(24, quant=q), lambda: nn.Dense(24), (5, 16)),
    (
        "dense_own_dot_general",
        lambda q: qn.QDense(24, dot_general=_doubled_dot_general, quant=q),
        lambda: nn.Dense(24, dot_general=_doubled_dot_general),
        (5, 16),
    ),
    (
        "dense_bf16",
        lambda q: qn.QDense(24, dtype=jnp.bfloat16, quant=q),
        lambda: nn.Dense(24, dtype=jnp.bfloat16),
        (5, 16),
    ),
    (
        "dense_general_batch_dims",
        lambda q: qn.QDenseGeneral(
            (2, 4), batch_dims=(0,), dot_general=_doubled_dot_general, quant=q
        ),
        lambda: nn.DenseGeneral((2, 4), batch_dims=(0,), dot_general=_doubled_dot_general),
        (3, 5, 16),
    ),
    (
        "einsum_bias",
        lambda q: qn.QEinsum(
            (16, 2, 4),
            "btd,dhk->bthk",
            use_bias=True,
            bias_init=nn.initializers.normal(1.0),
            quant=q,
        ),
        lambda: nn.Einsum(
            (16, 2, 4), "btd,dhk->bthk", use_bias=True, bias_init=nn.initializers.normal(1.0)
        ),
        (2, 5, 16),
    ),
]


@pytest.mark.parametrize("name,make_q,make_flax,shape", FLAX_CALLS, ids=[f[0] for f in FLAX_CALLS])
def test_float_and_calibrate_modes_run_flax_own_call_bit_for_bit(name, make_q, make_flax, shape):
    x = _x(shape) * 3.0
    variables = make_flax().init(jax.random.key(1), x)
    want = np.asarray(make_flax().apply(variables, x))
    rules = (qn.QuantRule(".*", weight=jn.INT4_G128.with_group_size(4), act=jn.INT8),)
    np.testing.assert_array_equal(np.asarray(make_q(None).apply(variables, x)), want)
    for config in (qn.QuantConfig(mode="float", rules=rules), qn.QuantConfig(mode="calibrate")):
        got, state = make_q(config).apply(variables, x, mutable=["qstats"])
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=config.mode)
        assert ("qstats" in state) == (config.mode == "calibrate")
    got, state = make_q(qn.QuantConfig(mode="calibrate", rules=rules)).apply(
        variables, x, mutable=["qstats"]
    )
    np.testing.assert_array_equal(np.asarray(got), want)
    assert "absmax" in state["qstats"]


def test_a_rule_given_by_registry_name_freezes_like_the_quantizer(llama):
    model, params, ids = llama  # every contracted size (64, 128) holds whole groups of 64
    by_name = (qn.QuantRule(".*", weight="int4_g64"),)
    by_object = (qn.QuantRule(".*", weight=jn.INT4_G128.with_group_size(64)),)
    assert by_name[0].weight == by_object[0].weight
    q_name, r_name = qn.freeze(model, params, ids, rules=by_name)
    q_obj, r_obj = qn.freeze(model, params, ids, rules=by_object)
    assert r_name.weights == r_obj.weights  # paths, quantizer names, shapes, sizes
    assert [r.quantizer for r in r_name.weights] == ["int4_g64"] * 7
    leaves_name = jax.tree.leaves_with_path(q_name, is_leaf=jn.is_quantized)
    leaves_obj = jax.tree.leaves_with_path(q_obj, is_leaf=jn.is_quantized)
    assert [p for p, _ in leaves_name] == [p for p, _ in leaves_obj]
    for (path, a), (_, b) in zip(leaves_name, leaves_obj, strict=True):
        assert (a.format, a.scaling, a.shape) == (b.format, b.scaling, b.shape), path
        assert a.scaling.group_size == 64
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)
