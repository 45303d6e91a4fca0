"""GGUF files with rope_freqs.weight (Llama 3.1+ RoPE scaling as per-frequency divisors).

The golden Llama checkpoint (tests/data/pretrained/llama_gqa: Llama 3 RoPE scaling, factor 8,
original context 48) is converted to a GGUF the way llama.cpp's convert_hf_to_gguf.py converts a
LlamaModel: query/key rows permuted to interleaved-RoPE order, ``rope_freqs.weight`` computed from
rope_scaling in float32, the byte-level vocabulary as a 'gpt2' tokenizer. Loaded with
``load_pretrained``, it must give transformers' golden logits; ``RopeScaling(kind='factors')``
must equal ``'llama3'`` on an independent float64 reference; and a config with divisors is
written to config.json as the llama3 scaling it came from, or refused.
"""

import json
import math
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxquant.models import LlamaConfig, RopeScaling, load_pretrained, save_safetensors
from jaxquant.models.llama import rope_frequencies
from jaxquant.models.pretrained import (
    config_from_gguf,
    config_to_hf,
    hf_rope_scaling_from_factors,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "data", "pretrained", "llama_gqa")


def llama_cpp_rope_factors(head_dim, theta, factor, low, high, original_context):
    """convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors): float32 [head_dim // 2]."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < original_context / high:
            out.append(1.0)
        elif wavelen > original_context / low:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def permute_to_interleaved(w, heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: half-split RoPE rows -> interleaved."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_golden_gguf(path):
    with open(os.path.join(GOLDEN, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg["rope_parameters"]
    with open(os.path.join(GOLDEN, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    hf = {}
    for shard in shards:
        hf.update(load_file(os.path.join(GOLDEN, shard)))
    heads, kv_heads, head_dim = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    )
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    # the byte-level vocabulary, as llama.cpp writes a 'gpt2' tokenizer
    with open(os.path.join(GOLDEN, "tokenizer.json")) as f:
        tj = json.load(f)
    tokens = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    tensors = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
        "rope_freqs.weight": llama_cpp_rope_factors(
            head_dim,
            rope["rope_theta"],
            rope["factor"],
            rope["low_freq_factor"],
            rope["high_freq_factor"],
            rope["original_max_position_embeddings"],
        ),
    }
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg["num_hidden_layers"]):
        for ours, theirs in names.items():
            t = hf[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                t = permute_to_interleaved(t, heads)
            elif theirs == "attn_k":
                t = permute_to_interleaved(t, kv_heads)
            tensors[f"blk.{i}.{theirs}.weight"] = t
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors["rope_freqs.weight"]


@pytest.fixture(scope="module")
def golden_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "llama_gqa.gguf"
    factors = write_golden_gguf(path)
    return path, factors


def test_gguf_with_rope_freqs_gives_golden_logits(golden_gguf):
    path, factors = golden_gguf
    model, params, tok = load_pretrained(path)
    c = model.config
    assert c.rope_scaling == RopeScaling(kind="factors", factors=tuple(factors.tolist()))
    golden = np.load(os.path.join(GOLDEN, "golden.npz"))
    got = np.asarray(model.apply({"params": params}, jnp.asarray(golden["tokens"])))
    want = golden["logits"]
    # the same bound as test_pretrained's golden tests
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    freq = rope_frequencies(c.resolved_head_dim, c.rope_theta, c.rope_scaling)
    np.testing.assert_allclose(freq, golden["inv_freq"], rtol=1e-6)
    assert tok.encode(str(golden["text"])).tolist() == golden["text_ids"].tolist()


def test_gguf_rope_freqs_save_as_the_llama3_config_they_came_from(golden_gguf, tmp_path):
    path, _ = golden_gguf
    model, params, tok = load_pretrained(path)
    save_safetensors(tmp_path, params, model.config, tokenizer=tok)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)["rope_scaling"]
    with open(os.path.join(GOLDEN, "config.json")) as f:
        rope = json.load(f)["rope_parameters"]
    assert written == {
        "rope_type": "llama3",
        "factor": rope["factor"],
        "low_freq_factor": rope["low_freq_factor"],
        "high_freq_factor": rope["high_freq_factor"],
        "original_max_position_embeddings": rope["original_max_position_embeddings"],
    }
    model2, params2, _ = load_pretrained(tmp_path)
    tokens = jnp.asarray(np.load(os.path.join(GOLDEN, "golden.npz"))["tokens"])
    np.testing.assert_allclose(
        model2.apply({"params": params2}, tokens),
        model.apply({"params": params}, tokens),
        rtol=0,
        atol=1e-5,
    )


LLAMA3_CASES = [
    # head_dim, theta, factor, low_freq_factor, high_freq_factor, original_context
    (16, 500000.0, 8.0, 1.0, 4.0, 48),  # the golden model: one interpolated frequency
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
    (64, 10000.0, 4.0, 2.0, 3.0, 200),
]


def numpy_llama3_reference(head_dim, theta, factor, low, high, original_context):
    """Llama 3 frequencies in float64, written from the formula (arXiv:2407.21783 code)."""
    out = []
    for i in range(head_dim // 2):
        freq = theta ** (-2 * i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original_context / high:
            out.append(freq)
        elif wavelen > original_context / low:
            out.append(freq / factor)
        else:
            smooth = (original_context / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.asarray(out)


@pytest.mark.parametrize("case", LLAMA3_CASES)
def test_factors_kind_equals_llama3_kind(case):
    head_dim, theta, factor, low, high, context = case
    llama3 = RopeScaling(
        kind="llama3",
        factor=factor,
        low_freq_factor=low,
        high_freq_factor=high,
        original_context=context,
    )
    factors = llama_cpp_rope_factors(*case)
    by_factors = rope_frequencies(head_dim, theta, RopeScaling(kind="factors", factors=factors))
    want = numpy_llama3_reference(*case)
    # float32 divisors: a few float32 ulps apart
    np.testing.assert_allclose(by_factors, want, rtol=1e-6)
    np.testing.assert_allclose(rope_frequencies(head_dim, theta, llama3), want, rtol=1e-6)
    # written back to Hugging Face parameters that give the same frequencies
    back = hf_rope_scaling_from_factors(factors, head_dim, theta)
    assert back.kind == "llama3" and back.factor == factor
    np.testing.assert_allclose(rope_frequencies(head_dim, theta, back), want, rtol=1e-6)
    if case[3:5] == (1.0, 4.0):  # the Llama 3.x parameters come back exactly
        assert back == llama3


def test_constant_and_unit_factors_map_to_linear_and_none():
    assert hf_rope_scaling_from_factors([2.5] * 8, 16, 1e4) == RopeScaling(
        kind="linear", factor=2.5
    )
    assert hf_rope_scaling_from_factors([1.0] * 8, 16, 1e4) is None


def test_bad_factors_are_named():
    with pytest.raises(ValueError, match="needs one divisor per frequency"):
        RopeScaling(kind="factors")
    with pytest.raises(ValueError, match="not finite and positive"):
        RopeScaling(kind="factors", factors=(1.0, float("nan")))
    with pytest.raises(ValueError, match="not finite and positive"):
        RopeScaling(kind="factors", factors=(1.0, -2.0))
    with pytest.raises(ValueError, match="leave factor=None"):
        RopeScaling(kind="factors", factor=8.0, factors=(1.0, 2.0))
    with pytest.raises(ValueError, match="only kind='factors' takes them"):
        RopeScaling(kind="llama3", factor=8.0, factors=(1.0, 2.0))
    with pytest.raises(ValueError, match="factor=None: expected > 0"):
        RopeScaling(kind="linear")
    with pytest.raises(ValueError, match="3 divisors for head_dim=16"):
        rope_frequencies(16, 1e4, RopeScaling(kind="factors", factors=(1.0, 2.0, 3.0)))
    # a list (a config read back from JSON) becomes a hashable tuple
    assert hash(RopeScaling(kind="factors", factors=[1, 2])) == hash(
        RopeScaling(kind="factors", factors=(1.0, 2.0))
    )
    fields = {
        "general.architecture": "llama",
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.block_count": 1,
        "llama.feed_forward_length": 128,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": 32,
    }
    with pytest.raises(ValueError, match="rope_freqs.weight has 3 values; head dimension 16"):
        config_from_gguf(fields, rope_factors=np.ones(3))
    with pytest.raises(ValueError, match="rope_freqs.weight holds values that are not finite"):
        config_from_gguf(fields, rope_factors=np.array([1, 1, 1, 1, 1, 1, 1, 0.0]))
    # a linear scaling type and divisors multiply, as llama.cpp applies both
    linear = {**fields, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    c = config_from_gguf(linear, rope_factors=np.arange(1, 9))
    assert c.rope_scaling.factors == tuple(2.0 * np.arange(1, 9))
    # divisors that no Hugging Face rope_scaling states are refused by name
    odd = LlamaConfig(
        embed_dim=64,
        num_heads=4,
        rope_scaling=RopeScaling(kind="factors", factors=(1, 2) * 4),
    )
    with pytest.raises(ValueError, match="neither one linear factor nor Llama 3 scaling"):
        config_to_hf(odd)
