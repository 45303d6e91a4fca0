"""Meshes, logical-axis rules, and the shardings of Llama params and frozen QArrays."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant.nn as jqnn
from jaxquant import numerics
from jaxquant.models import Llama, LlamaConfig
from jaxquant.train import (
    DEFAULT_RULES,
    MeshConfig,
    logical_to_shardings,
    make_mesh,
    state_shardings,
)

CFG = LlamaConfig(
    vocab_size=64, embed_dim=64, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=128
)
QUANT_RULES = (
    jqnn.QuantRule("mlp", weight=numerics.INT4_G128.with_group_size(16)),
    jqnn.QuantRule("attn", weight=numerics.NVFP4),
)


def _tokens(batch=4, seq=8):
    return jax.random.randint(jax.random.key(1), (batch, seq), 0, CFG.vocab_size, jnp.int32)


def _is_qarray(x):
    return isinstance(x, numerics.QArray)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: _is_qarray(x))


@jax.jit
def _dequantize_all(quant):
    return jax.tree.map(lambda q: q.dequantize(), quant, is_leaf=_is_qarray)


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (MeshConfig(), (8, 1, 1)),
        (MeshConfig(data=2, fsdp=2, tensor=2), (2, 2, 2)),
        (MeshConfig(data=4, tensor=2), (4, 1, 2)),
        (MeshConfig(data=1, fsdp=-1), (1, 8, 1)),
    ],
)
def test_make_mesh_has_the_configured_shape(cfg, shape):
    mesh = make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.devices.size == 8


@pytest.mark.parametrize(
    "cfg, match",
    [
        (MeshConfig(data=2, fsdp=2, tensor=1), "data=2, fsdp=2, tensor=1.*4.*8 devices"),
        (MeshConfig(data=-1, fsdp=3), "fsdp=3.*3.*8 devices"),
    ],
)
def test_make_mesh_rejects_sizes_that_do_not_fit_the_devices(cfg, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": 0}, "data=0"),
        ({"tensor": 2.0}, "tensor=2.0"),
        ({"data": -1, "fsdp": -1}, "data=-1, fsdp=-1"),
    ],
)
def test_mesh_config_validates_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeshConfig(**kwargs)


def test_make_mesh_on_a_device_subset():
    mesh = make_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
    assert mesh.devices.size == 4


def _sharded_llama(mesh, cfg=CFG):
    model = Llama(cfg)
    tokens = _tokens()
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    shardings = state_shardings(abstract, mesh)
    init = jax.jit(lambda k, t: nn.unbox(model.init(k, t)), out_shardings=shardings)
    return model, tokens, shardings, init(jax.random.key(0), tokens)


def test_llama_params_are_sharded_by_the_rules_and_logits_match():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model, tokens, shardings, variables = _sharded_llama(mesh)
    flat = _flat(variables["params"])
    expected = {
        "embed/embedding": P("tensor", "fsdp"),
        "layers_0/attn/query/kernel": P("fsdp", "tensor", None),
        "layers_0/attn/key/kernel": P("fsdp", "tensor", None),
        "layers_0/attn/out/kernel": P("tensor", None, "fsdp"),
        "layers_0/mlp/gate/kernel": P("fsdp", "tensor"),
        "layers_0/mlp/down/kernel": P("tensor", "fsdp"),
    }
    for path, spec in expected.items():
        assert flat[path].sharding.spec == spec, path
        assert not flat[path].sharding.is_fully_replicated, path
    for path in ("final_norm/scale", "layers_0/attn_norm/scale", "layers_0/mlp_norm/scale"):
        assert flat[path].sharding.is_fully_replicated, path

    reference = jax.jit(model.init)(jax.random.key(0), tokens)  # one device, same key
    ref_logits = np.asarray(jax.jit(model.apply)(nn.unbox(reference), tokens))
    batch = NamedSharding(mesh, P(("data", "fsdp"), None))
    apply = jax.jit(model.apply, in_shardings=(shardings, batch))
    logits = apply(variables, jax.device_put(tokens, batch))
    # Same math, other summation order: tensor-parallel contractions add per-device partial
    # sums. Reordering a sum of n f32 terms moves it by up to ~n·eps·Σ|terms|, ~√n·eps·Σ|terms|
    # for rounding errors of random sign. The longest contraction here is mlp_dim = 128 terms,
    # their scale that of the logits; 4x for the chain of reductions (norms, attention, MLP,
    # head). An error in a logit is not proportional to that logit (a logit near 0 gets the
    # same absolute error), so: an absolute tolerance from the logits' scale, no rtol.
    # Measured over 24 init keys and token draws: at most 0.14 of it.
    eps = np.finfo(np.float32).eps
    atol = 4 * eps * np.sqrt(CFG.mlp_dim) * np.abs(ref_logits).max()
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=atol)


def test_non_divisible_dimension_is_replicated_with_a_warning():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    specs = {"w": P("mlp", "embed"), "b": P(None, "batch")}
    shapes = {
        "w": jax.ShapeDtypeStruct((3, 8), jnp.float32),
        "b": jax.ShapeDtypeStruct((5, 6), jnp.float32),
    }
    with pytest.warns(UserWarning) as record:
        out = logical_to_shardings(specs, mesh, DEFAULT_RULES, shapes=shapes)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert messages[0].startswith("b: shape (5, 6): dim 1 (size 6")
    assert messages[1].startswith("w: shape (3, 8): dim 0 (size 3")
    assert out["w"].spec == P(None, "fsdp")
    # batch -> ('data', 'fsdp') = 4 devices does not divide 6; its prefix 'data' = 2 does.
    assert out["b"].spec == P(None, "data")
    x = jax.device_put(jnp.ones((3, 8)), out["w"])
    assert x.sharding.spec == P(None, "fsdp")


def test_llama_with_an_odd_vocab_initializes_on_the_mesh():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = LlamaConfig(
        vocab_size=63, embed_dim=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64
    )
    with pytest.warns(UserWarning, match="embed/embedding"):
        _, _, _, variables = _sharded_llama(mesh, cfg)
    assert variables["params"]["embed"]["embedding"].sharding.spec == P(None, "fsdp")


@functools.cache
def _frozen_llama():
    model = Llama(CFG, jqnn.QuantConfig(rules=QUANT_RULES))
    tokens = _tokens()
    boxed = model.init(jax.random.key(0), tokens)
    # jit: freeze traces once instead of dispatching every quantize op eagerly
    quant = jax.jit(lambda p: jqnn.freeze(model, p, tokens)[0])(nn.unbox(boxed)["params"])
    abstract = {
        "params": jax.eval_shape(lambda: boxed["params"]),
        "quant": jax.eval_shape(lambda: quant),
    }
    return quant, abstract


# (codes, scale) specs; NVFP4's tensor_scale is always replicated.
_QUANT_SPECS_222 = {
    # [64, 128], group 16 on axis 0: 4 groups split over fsdp=2, whole groups per shard.
    "layers_0/mlp/gate/kernel": (P("fsdp", "tensor"), P("fsdp", "tensor")),
    # [128, 64]: codes [128, 32], scale [8, 64].
    "layers_0/mlp/down/kernel": (P("tensor", "fsdp"), P("tensor", "fsdp")),
    # [64, 4, 16]: codes [64, 4, 8], scale [4, 4, 16].
    "layers_0/attn/query/kernel": (P("fsdp", "tensor", None), P("fsdp", "tensor", None)),
    # [4, 16, 64] stored as its view [64, 64] (contracting heads x head_dim merged): groups of
    # 16 run along the merged axis, which keeps the heads' mesh axis: scale [4, 64].
    "layers_0/attn/out/kernel": (P("tensor", "fsdp"), P("tensor", "fsdp")),
}
_QUANT_SPECS_18 = {
    # tensor has size 1 here. 4 groups do not split over fsdp=8: replicated on the group axis.
    "layers_0/mlp/gate/kernel": (P("fsdp", "tensor"), P(None, "tensor")),
    # codes [128, 32]: 64 codes / 8 devices = 8 codes = 4 whole bytes per shard.
    "layers_0/mlp/down/kernel": (P("tensor", "fsdp"), P("tensor", "fsdp")),
    "layers_0/attn/query/kernel": (P("fsdp", "tensor", None), P(None, "tensor", None)),
    "layers_0/attn/out/kernel": (P("tensor", "fsdp"), P("tensor", "fsdp")),
}


@pytest.mark.parametrize(
    "mesh_cfg, expected",
    [
        (MeshConfig(data=2, fsdp=2, tensor=2), _QUANT_SPECS_222),
        (MeshConfig(data=1, fsdp=8, tensor=1), _QUANT_SPECS_18),
    ],
)
def test_frozen_qarrays_are_sharded_like_their_weights(mesh_cfg, expected):
    mesh = make_mesh(mesh_cfg)
    quant, abstract = _frozen_llama()
    shardings = state_shardings(abstract, mesh)["quant"]
    placed = jax.device_put(quant, shardings)
    flat_q, flat_s, flat_placed = _flat(quant), _flat(shardings), _flat(placed)
    assert set(flat_placed) == set(flat_q)
    for path, (codes_spec, scale_spec) in expected.items():
        q = flat_placed[path]
        assert q.codes.sharding.spec == codes_spec, path
        assert q.scale.sharding.spec == scale_spec, path
    for path, q in flat_placed.items():
        for field in ("codes", "scale", "zero", "tensor_scale"):
            leaf, want = getattr(q, field), getattr(flat_s[path], field)
            if leaf is not None:
                assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (path, field)
        if q.tensor_scale is not None:
            assert q.tensor_scale.sharding.is_fully_replicated, path
    want, got = _flat(_dequantize_all(quant)), _flat(_dequantize_all(placed))
    for path in flat_q:
        assert got[path].sharding.mesh.size == 8
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    # and the same layout from jit's out_shardings
    again = jax.jit(lambda q: q, out_shardings=shardings)(quant)
    leaf = _flat(again)["layers_0/mlp/gate/kernel"].codes
    assert leaf.sharding.spec == expected["layers_0/mlp/gate/kernel"][0]


def test_quant_without_its_param_is_replicated():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    quant, abstract = _frozen_llama()
    abstract = {**abstract, "params": jqnn.serving_params(abstract["params"], quant)}
    q = _flat(state_shardings(abstract, mesh)["quant"])["layers_0/mlp/up/kernel"]
    assert q.codes.is_fully_replicated and q.scale.is_fully_replicated


@pytest.mark.parametrize(
    "fmt, n, tensor, sharded",
    [
        (numerics.IntFormat(4), 16, 2, True),  # 8 codes = 4 bytes per shard
        (numerics.IntFormat(4), 2, 2, False),  # 1 code = half a byte per shard
        (numerics.IntFormat(3), 16, 2, True),  # 8 codes = 3 bytes per shard
        (numerics.IntFormat(3), 12, 2, False),  # 6 codes = 18 bits: shard ends mid-byte
        (numerics.IntFormat(8), 6, 2, True),
    ],
)
def test_packed_axis_is_sharded_only_on_whole_bytes(fmt, n, tensor, sharded):
    mesh = make_mesh(MeshConfig(data=-1, tensor=tensor))
    x = jax.random.normal(jax.random.key(2), (8, n))
    quantizer = numerics.ScalarQuantizer(fmt, numerics.Scaling(axis=0, group_size=4))
    q = jax.jit(lambda x: numerics.quantize(x, quantizer))(x)
    s = q.shardings(NamedSharding(mesh, P("data", "tensor")))
    assert s.codes.spec == P("data", "tensor" if sharded else None)
    assert s.scale.spec == P(None, "tensor")  # [2, n]: 2 groups do not split over data=4
    placed = jax.device_put(q, s)
    np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(placed), q.dequantize())
