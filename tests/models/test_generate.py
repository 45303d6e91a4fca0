"""generate and the KV cache, on a small random Llama: cache vs recomputation, KIVI int8/int4
against a numpy reference, sampling supports, stop tokens, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.models import KVCache, Llama, LlamaConfig, generate, sample_logits

CFG = LlamaConfig(
    vocab_size=97,
    embed_dim=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    qkv_bias=True,
    rope_theta=500.0,
)


@pytest.fixture(scope="module")
def small():
    model = Llama(CFG)
    v = model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))
    # scale the weights up so that logits are far from uniform (clear argmax margins)
    v = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x + 0.5 * (x.ndim == 1), v)
    return model, v


def _prompts(seed=0, lengths=(5, 11, 2)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def _step_by_step(model, v, tokens, kind, group=4):
    """Teacher-forced: prefill the first token, then feed one token at a time through the cache;
    the logits [t, vocab] of one row."""
    t = len(tokens)
    cache = KVCache.create(model.config, 1, 2 * t, kind, group=group)
    apply = jax.jit(model.apply)
    out = []
    for i, tok in enumerate(tokens):
        logits, cache = apply(v, jnp.asarray([[tok]]), jnp.asarray([[i]]), cache)
        out.append(logits[0, 0])
    return jnp.stack(out), cache


def test_cached_logits_equal_full_forward(small):
    model, v = small
    tokens = _prompts(1, (13,))[0]
    full = model.apply(v, jnp.asarray([tokens]))[0]
    cached, _ = _step_by_step(model, v, tokens, "float32")
    # f32 attention over a longer (masked) key axis: sums of <= 26 terms of O(max|logit|)
    tol = 26 * float(jnp.finfo(jnp.float32).eps) * float(jnp.abs(full).max()) * 8
    np.testing.assert_allclose(cached, full, atol=tol, rtol=0)


def test_generate_with_cache_equals_recomputation(small):
    model, v = small
    prompts = _prompts()
    with_cache = generate(model, v, prompts, max_new_tokens=32, kv_cache="float32", pad_to=8)
    recompute = generate(model, v, prompts, max_new_tokens=32, kv_cache="none", pad_to=8)
    assert with_cache.tokens == recompute.tokens
    assert [len(t) for t in with_cache.tokens] == [32, 32, 32]
    assert with_cache.steps == 32 and with_cache.cache_bytes > 0 and recompute.cache_bytes == 0
    # each row decodes as it would alone (padding and batching change nothing)
    alone = generate(model, v, prompts[1:2], max_new_tokens=32, kv_cache="float32", pad_to=8)
    assert alone.tokens[0] == with_cache.tokens[1]


def _kivi_reference(keys, values, length, group, bits):
    """numpy KIVI: values per token (absmax over head_dim); keys rounded to bf16, then quantized
    per channel over each complete group of ``group`` positions (the open group's kept as they
    are). keys/values: [t, kvh, hd]."""
    qmax = 2 ** (bits - 1) - 1
    ties, steps = [], []

    def qdq(x, axis):
        s = np.abs(x).max(axis=axis, keepdims=True) / qmax
        s = np.where(s == 0, 1, s)
        ties.append(np.broadcast_to(np.abs(np.abs(x / s) % 1 - 0.5) < 1e-4, x.shape))
        steps.append(np.broadcast_to(s, x.shape))
        return np.clip(np.round(x / s), -qmax - 1, qmax) * s

    v_ref = qdq(values, -1)
    keys = np.asarray(jnp.asarray(keys).astype(jnp.bfloat16).astype(jnp.float32))
    k_ref = keys.copy()
    done = length // group * group
    for g0 in range(0, done, group):
        k_ref[g0 : g0 + group] = qdq(keys[g0 : g0 + group], 0)
    # where x / scale is a tie (bf16 keys make exact halves likely), either neighbour is right
    v_tie, v_step = ties[0], steps[0]
    k_tie, k_step = np.zeros(keys.shape, bool), np.zeros(keys.shape)
    for i, g0 in enumerate(range(0, done, group)):
        k_tie[g0 : g0 + group], k_step[g0 : g0 + group] = ties[i + 1], steps[i + 1]
    return (k_ref, k_tie, k_step), (v_ref, v_tie, v_step)


def _assert_quantized_equal(got, ref):
    want, tie, step = ref
    bad = ~np.isclose(got, want, rtol=1e-6, atol=1e-6)
    assert not (bad & ~tie).any(), np.argwhere(bad & ~tie)[:5]
    np.testing.assert_allclose(np.abs(got - want)[bad], step[bad], rtol=1e-5)


@pytest.mark.parametrize("kind,bits", [("int8", 8), ("int4", 4)])
def test_integer_cache_matches_kivi_reference(small, kind, bits):
    model, v = small
    c = model.config
    rng = np.random.default_rng(bits)
    t, group = 11, 4
    k = rng.normal(size=(1, t, c.num_kv_heads, c.resolved_head_dim)).astype(np.float32)
    val = rng.normal(size=k.shape).astype(np.float32)
    layer = KVCache.create(c, 1, 16, kind, group=group).layers[0]
    # a prefill of 6 positions (2 pads that write nothing), then one position at a time
    pos = np.array([[0, 1, 2, 3, 4, 5, 99, 99]])
    kk = np.concatenate([k[:, :6], np.zeros_like(k[:, :2])], axis=1)
    vv = np.concatenate([val[:, :6], np.zeros_like(val[:, :2])], axis=1)
    layer, keys, values, slots = layer.update(kk, vv, jnp.asarray(pos))
    for i in range(6, t):
        layer, keys, values, slots = layer.update(
            k[:, i : i + 1], val[:, i : i + 1], jnp.asarray([[i]])
        )
    k_ref, v_ref = _kivi_reference(k[0], val[0], t, group, bits)
    _assert_quantized_equal(np.asarray(keys)[0, :t], k_ref)
    _assert_quantized_equal(np.asarray(values)[0, :t], v_ref)
    assert np.asarray(slots)[0].tolist() == list(range(16))


def test_cache_bytes_follow_the_format(small):
    model, _ = small
    c = model.config
    kvh, hd, layers = c.num_kv_heads, c.resolved_head_dim, c.num_layers
    f32 = KVCache.create(c, 2, 48, "float32").nbytes
    assert f32 == 2 * 48 * kvh * hd * layers * 2 * 4  # keys + values, 4 bytes each
    assert KVCache.create(c, 2, 48, "bfloat16").nbytes == f32 // 2
    for kind, bits in (("int8", 8), ("int4", 4)):
        got = KVCache.create(c, 2, 48, kind, group=8).nbytes
        codes = 2 * 48 * kvh * hd * bits // 8 * 2  # keys + values
        scales = (2 * 48 * kvh + 2 * 48 // 8 * kvh * hd) * 4  # per token; per group x channel
        residual = 2 * 8 * kvh * hd * 2  # bf16
        assert got == (codes + scales + residual) * layers, kind


def test_sampling_supports():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.key(0)
    greedy = sample_logits(logits, keys, temperature=0.0, top_k=0, top_p=1.0)
    assert (greedy == 0).all()
    top1 = sample_logits(logits, keys, temperature=1.0, top_k=1, top_p=1.0)
    assert (top1 == 0).all()
    top2 = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=2, top_p=1.0))
    assert set(top2.tolist()) == {0, 1}
    # top_p=0.7: {0.5, 0.3} reaches it; 0.75 needs the third id too
    p70 = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=0, top_p=0.7))
    assert set(p70.tolist()) == {0, 1}
    p85 = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=0, top_p=0.85))
    assert set(p85.tolist()) == {0, 1, 2}
    every = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=0, top_p=1.0))
    assert set(every.tolist()) == {0, 1, 2, 3}


def test_sampled_generation_is_seeded(small):
    model, v = small
    prompts = _prompts(4, (3, 6))
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.95, pad_to=8)
    a = generate(model, v, prompts, seed=1, **kw)
    b = generate(model, v, prompts, seed=1, **kw)
    c = generate(model, v, prompts, seed=2, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stop_tokens_end_each_row(small):
    model, v = small
    prompts = _prompts(5, (4, 7))
    free = generate(model, v, prompts, max_new_tokens=10, pad_to=8)
    stop = free.tokens[0][3]
    stopped = generate(model, v, prompts, max_new_tokens=10, pad_to=8, stop_tokens=[stop])
    first = free.tokens[0].index(stop)
    assert stopped.tokens[0] == free.tokens[0][:first] and stopped.finished[0]
    if stop in free.tokens[1]:
        assert stopped.tokens[1] == free.tokens[1][: free.tokens[1].index(stop)]
    else:
        assert stopped.tokens[1] == free.tokens[1] and not stopped.finished[1]


def test_bad_input_is_named(small):
    model, v = small
    with pytest.raises(ValueError, match="context of 16 positions"):
        short = Llama(dataclasses.replace(CFG, max_seq_len=16))
        generate(short, v, [[1] * 12], max_new_tokens=8)
    with pytest.raises(ValueError, match="pass tokenizer="):
        generate(model, v, ["hello"], max_new_tokens=2)
    with pytest.raises(ValueError, match="kv_cache='int3'"):
        generate(model, v, [[1, 2]], max_new_tokens=2, kv_cache="int3")
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 97\)"):
        generate(model, v, [[1, 200]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, v, [[1, 2]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="cache holds 1 layers, the model 2"):
        cache = KVCache.create(dataclasses.replace(CFG, num_layers=1), 1, 8)
        model.apply(v, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), cache)


def test_served_quantized_and_vq_models_generate_through_the_cache(small):
    import flax.linen as nn

    from jaxquant.nn import QuantConfig, QuantRule, freeze, serving_params

    model, v = small
    params = nn.unbox(v)["params"]
    rules = (QuantRule("attn/", weight="int4_g16"), QuantRule("mlp/", weight="e8p2_rht"))
    quant, _ = freeze(model, params, jnp.zeros((1, 8), jnp.int32), rules=rules)
    served = model.clone(quant=QuantConfig(mode="serve", rules=rules))
    variables = {"params": serving_params(params, quant), "quant": quant}
    prompts = _prompts(6, (4, 9))
    cached = generate(served, variables, prompts, max_new_tokens=12, kv_cache="float32", pad_to=8)
    again = generate(served, variables, prompts, max_new_tokens=12, kv_cache="none", pad_to=8)
    assert cached.tokens == again.tokens


def test_generation_on_a_mesh_equals_one_device(small):
    import flax.linen as nn

    from jaxquant.nn.partitioning import MeshConfig, make_mesh, state_shardings

    model, v = small
    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    with pytest.warns(UserWarning, match=r"embedding: shape \(97, 48\)"):  # 97 rows: not split
        shardings = state_shardings(jax.eval_shape(lambda: v), mesh)
    sharded = jax.device_put(nn.unbox(v), shardings)
    q = sharded["params"]["layers_0"]["attn"]["query"]["kernel"]
    assert len({s.device for s in q.addressable_shards}) == 8 and q.sharding.spec[1] == "tensor"
    prompts = _prompts(7, (3, 8, 5, 2))
    here = generate(model, v, prompts, max_new_tokens=10, kv_cache="float32", pad_to=8)
    there = generate(model, sharded, prompts, max_new_tokens=10, kv_cache="float32", pad_to=8)
    assert here.tokens == there.tokens
