"""A Llama-style decoder built from jaxquant.nn layers, with logical sharding axes.

RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP, grouped-query attention, tied or untied
output embeddings. Every param carries logical axis names (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``norm``) that the trainer maps to mesh axes; every linear
layer takes the model's ``QuantConfig``, so one set of rules quantizes the whole model.

Layer paths (what rules match): ``embed``, ``layers_{i}/attn/{query,key,value,out}``,
``layers_{i}/mlp/{gate,up,down}``, ``head`` (role ``'head'``, untied only).

References: Touvron et al., "LLaMA", arXiv:2302.13971, Sec. 2.2; Su et al., "RoFormer",
arXiv:2104.09864; Ainslie et al., "GQA", arXiv:2305.13245.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.nn import QDense, QDenseGeneral, QEmbed, QuantConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Model hyper-parameters (frozen, hashable). ``head_dim`` defaults to embed / heads."""

    vocab_size: int = 256
    embed_dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; params are always f32

    def __post_init__(self):
        for f in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LlamaConfig {f}={v!r}: expected a positive int.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)."
            )
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"LlamaConfig embed_dim={self.embed_dim} is not divisible by "
                f"num_heads={self.num_heads}; set head_dim."
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"LlamaConfig dtype={self.dtype!r}: expected one of {list(_DTYPES)}.")
        hd = self.head_dim or self.embed_dim // self.num_heads
        if hd % 2:
            raise ValueError(f"LlamaConfig head_dim={hd}: RoPE needs an even head dimension.")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]


_LECUN = nn.initializers.lecun_normal()


def _init(names, init=_LECUN):
    return nn.with_logical_partitioning(init, names)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (x[..., i], x[..., i + d/2]) by ``positions * theta**(-2i/d)``.

    x: [batch, seq, heads, head_dim]; positions: [seq]. Computed in f32.
    """
    d = x.shape[-1]
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)  # [d/2]
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [seq, d/2]
    sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", _init(("norm",), nn.initializers.ones), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class Attention(nn.Module):
    config: LlamaConfig
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        hd, dt = c.resolved_head_dim, c.compute_dtype
        proj = lambda heads, name, axes: QDenseGeneral(  # noqa: E731
            (heads, hd),
            use_bias=False,
            dtype=dt,
            kernel_init=_init(axes),
            quant=self.quant,
            name=name,
        )
        q = proj(c.num_heads, "query", ("embed", "heads", "head_dim"))(x)
        k = proj(c.num_kv_heads, "key", ("embed", "kv_heads", "head_dim"))(x)
        v = proj(c.num_kv_heads, "value", ("embed", "kv_heads", "head_dim"))(x)
        positions = jnp.arange(x.shape[1])
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        b, t = x.shape[:2]
        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, c.num_heads, hd)
        return QDenseGeneral(
            c.embed_dim,
            axis=(-2, -1),
            use_bias=False,
            dtype=dt,
            kernel_init=_init(("heads", "head_dim", "embed")),
            quant=self.quant,
            name="out",
        )(out)


class MLP(nn.Module):
    config: LlamaConfig
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda features, name, axes: QDense(  # noqa: E731
            features,
            use_bias=False,
            dtype=c.compute_dtype,
            kernel_init=_init(axes),
            quant=self.quant,
            name=name,
        )
        gate = dense(c.mlp_dim, "gate", ("embed", "mlp"))(x)
        up = dense(c.mlp_dim, "up", ("embed", "mlp"))(x)
        return dense(c.embed_dim, "down", ("mlp", "embed"))(nn.silu(gate) * up)


class Block(nn.Module):
    config: LlamaConfig
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        norm = lambda name: RMSNorm(c.norm_eps, c.compute_dtype, name=name)  # noqa: E731
        x = x + Attention(c, self.quant, name="attn")(norm("attn_norm")(x))
        return x + MLP(c, self.quant, name="mlp")(norm("mlp_norm")(x))


class Llama(nn.Module):
    """The decoder: tokens int32 [batch, seq] to logits f32 [batch, seq, vocab]."""

    config: LlamaConfig
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"Llama tokens: expected integer token ids, got {tokens.dtype}.")
        embed = QEmbed(
            c.vocab_size,
            c.embed_dim,
            dtype=c.compute_dtype,
            # std 1/sqrt(d): tied logits start with unit variance
            embedding_init=_init(("vocab", "embed"), nn.initializers.normal(c.embed_dim**-0.5)),
            quant=self.quant,
            name="embed",
        )
        x = embed(tokens)
        for i in range(c.num_layers):
            x = Block(c, self.quant, name=f"layers_{i}")(x)
        x = RMSNorm(c.norm_eps, c.compute_dtype, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = QDense(
                c.vocab_size,
                use_bias=False,
                dtype=c.compute_dtype,
                kernel_init=_init(("embed", "vocab")),
                quant=self.quant,
                role="head",
                name="head",
            )(x)
        return logits.astype(jnp.float32)
