"""An independent float64 numpy forward of a llama-architecture GGUF, as llama.cpp computes it.

It reads the tensors in GGUF's own layout and names (``blk.{i}.attn_q.weight`` ``[out, in]``
after ``gguf.quants.dequantize``) and applies RoPE the way llama.cpp's llama architecture does
(rotating interleaved pairs ``(2i, 2i + 1)``), so it shares nothing with
``jaxquant.models.pretrained`` (no name map, no row permutation) or with ``jaxquant.models.Llama``.
"""

import gguf
import numpy as np


def read_gguf(path):
    """(metadata dict, {name: float64 array in numpy's [out, in] order})."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    tensors = {
        t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(
            [int(n) for n in reversed(t.shape)]
        )
        for t in reader.tensors
    }
    return meta, tensors


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_interleaved(x, theta):
    """x: [seq, heads, d]; rotates (x[2i], x[2i+1]) by pos * theta^(-2i/d)."""
    seq, _, d = x.shape
    angle = np.arange(seq)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]  # [seq, d/2]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angle)[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def forward(meta, w, tokens):
    """Logits float64 [seq, vocab] of one sequence of token ids."""
    a = meta["general.architecture"]
    n_layers, heads = meta[f"{a}.block_count"], meta[f"{a}.attention.head_count"]
    kv_heads = meta[f"{a}.attention.head_count_kv"]
    eps, theta = meta[f"{a}.attention.layer_norm_rms_epsilon"], meta[f"{a}.rope.freq_base"]
    x = w["token_embd.weight"][np.asarray(tokens)]
    seq = x.shape[0]
    mask = np.tril(np.ones((seq, seq), bool))
    for i in range(n_layers):
        b = f"blk.{i}."
        h = _rms_norm(x, w[b + "attn_norm.weight"], eps)
        q = (h @ w[b + "attn_q.weight"].T).reshape(seq, heads, -1)
        k = (h @ w[b + "attn_k.weight"].T).reshape(seq, kv_heads, -1)
        v = (h @ w[b + "attn_v.weight"].T).reshape(seq, kv_heads, -1)
        q, k = _rope_interleaved(q, theta), _rope_interleaved(k, theta)
        rep = heads // kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # head j uses kv head j//rep
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", p, v).reshape(seq, -1)
        x = x + o @ w[b + "attn_output.weight"].T
        h = _rms_norm(x, w[b + "ffn_norm.weight"], eps)
        g, u = h @ w[b + "ffn_gate.weight"].T, h @ w[b + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[b + "ffn_down.weight"].T
    x = _rms_norm(x, w["output_norm.weight"], eps)
    head = w.get("output.weight", w["token_embd.weight"])
    return x @ head.T
