"""A Llama-style decoder built from jaxquant.nn layers, with logical sharding axes.

RMSNorm, rotary position embeddings (RoPE, with Llama 3 or linear frequency scaling), SwiGLU MLP,
grouped-query attention (optional q/k/v biases as Qwen2, an optional sliding window as Mistral),
tied or untied output embeddings: the configurations of the Llama 2/3, Mistral, Qwen2/2.5 and
SmolLM2 checkpoints that ``jaxquant.models.load_pretrained`` reads.

Every param carries logical axis names (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``norm``) that the trainer maps to mesh axes; every linear
layer takes the model's ``QuantConfig``, so one set of rules quantizes the whole model.

Layer paths (what rules match): ``embed``, ``layers_{i}/attn/{query,key,value,out}``,
``layers_{i}/mlp/{gate,up,down}``, ``head`` (role ``'head'``, untied only).

The model takes optional ``positions`` (int [batch, seq], each row's token positions) and a
``cache`` (``jaxquant.models.KVCache``): with a cache it writes each layer's keys and values at
``positions``, attends over the whole cache and returns ``(logits, cache)``; that is how
``jaxquant.models.generate`` prefills and decodes.

References: Touvron et al., "LLaMA", arXiv:2302.13971, Sec. 2.2; Su et al., "RoFormer",
arXiv:2104.09864; Ainslie et al., "GQA", arXiv:2305.13245; Dubey et al., "The Llama 3 Herd of
Models", arXiv:2407.21783 (RoPE scaling); Jiang et al., "Mistral 7B", arXiv:2310.06825.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.nn import QDense, QDenseGeneral, QEmbed, QuantConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling for long contexts (hashable).

    ``kind='llama3'`` (Llama 3.1+): wavelengths longer than ``original_context /
    low_freq_factor`` are divided by ``factor``, those shorter than ``original_context /
    high_freq_factor`` kept, and those between interpolated. ``kind='linear'``: every frequency
    divided by ``factor`` (position interpolation). ``kind='factors'``: frequency ``i`` divided
    by ``factors[i]`` (one per rotated pair, ``head_dim // 2`` of them), as a GGUF's
    ``rope_freqs.weight`` stores Llama 3.1 scaling; ``factor`` is then unused (None).
    """

    kind: str
    factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192
    factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in ("llama3", "linear", "factors"):
            raise ValueError(
                f"RopeScaling kind={self.kind!r}: supported are 'llama3', 'linear' and 'factors' "
                "(dynamic NTK, YaRN and LongRoPE are not implemented)."
            )
        if self.kind == "factors":
            if self.factor is not None:
                raise ValueError(
                    f"RopeScaling factor={self.factor}: kind='factors' divides each frequency "
                    "by its own entry of factors; leave factor=None."
                )
            if self.factors is None or len(self.factors) == 0:
                raise ValueError(
                    "RopeScaling factors: kind='factors' needs one divisor per frequency."
                )
            # a list (e.g. from JSON) becomes a tuple of floats, so the config stays hashable
            values = tuple(float(f) for f in self.factors)
            bad = [f for f in values if not (math.isfinite(f) and f > 0)]
            if bad:
                raise ValueError(
                    f"RopeScaling factors: {len(bad)} value(s) not finite and positive "
                    f"(e.g. {bad[0]}); every frequency divisor must be > 0."
                )
            object.__setattr__(self, "factors", values)
            return
        if self.factors is not None:
            raise ValueError(
                f"RopeScaling factors: only kind='factors' takes them, not kind={self.kind!r}."
            )
        if self.factor is None or not self.factor > 0:
            raise ValueError(f"RopeScaling factor={self.factor}: expected > 0.")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"RopeScaling: high_freq_factor={self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor}."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Model hyper-parameters (frozen, hashable). ``head_dim`` defaults to embed / heads.

    ``max_seq_len``: the context length (positions the model was trained for; ``generate``
    refuses longer sequences); ``None``: unbounded. ``qkv_bias``: biases on the query, key and
    value projections (Qwen2). ``sliding_window``: each query attends to at most this many
    most recent positions, itself included (Mistral); ``None``: all earlier positions.
    """

    vocab_size: int = 256
    embed_dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int = 512
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False
    sliding_window: int | None = None
    max_seq_len: int | None = None
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
        for f in ("sliding_window", "max_seq_len"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"LlamaConfig {f}={v!r}: expected a positive int or None.")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(
                f"LlamaConfig rope_scaling={self.rope_scaling!r}: expected a RopeScaling or None."
            )
        s = self.rope_scaling
        if s is not None and s.kind == "factors" and len(s.factors) != hd // 2:
            raise ValueError(
                f"LlamaConfig rope_scaling: {len(s.factors)} frequency factors, but head_dim={hd} "
                f"rotates {hd // 2} frequencies."
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]


_LECUN = nn.initializers.lecun_normal()


def _init(names, init=_LECUN):
    return nn.with_logical_partitioning(init, names)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """The rotation frequencies ``theta**(-2i/d)``, i < d/2, after ``scaling``: float32 [d/2].

    Computed in float64 numpy (as constants), then rounded once to float32.
    """
    freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is not None and scaling.kind == "factors":
        if len(scaling.factors) != freq.size:
            raise ValueError(
                f"RopeScaling factors: {len(scaling.factors)} divisors for head_dim={head_dim}, "
                f"which rotates {freq.size} frequencies."
            )
        freq = freq / np.asarray(scaling.factors, np.float64)
    elif scaling is not None and scaling.kind == "linear":
        freq = freq / scaling.factor
    elif scaling is not None:  # llama3
        s = scaling
        wavelen = 2 * math.pi / freq
        smooth = (s.original_context / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        scaled = np.where(wavelen > s.original_context / s.low_freq_factor, freq / s.factor, freq)
        medium = (wavelen >= s.original_context / s.high_freq_factor) & (
            wavelen <= s.original_context / s.low_freq_factor
        )
        freq = np.where(medium, (1 - smooth) * freq / s.factor + smooth * freq, scaled)
    return freq.astype(np.float32)


def rope(
    x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None
) -> jax.Array:
    """Rotates pairs (x[..., i], x[..., i + d/2]) by ``positions * freq_i`` (``rope_frequencies``).

    x: [batch, seq, heads, head_dim]; positions: [seq] or [batch, seq]. Computed in f32.
    """
    freq = jnp.asarray(rope_frequencies(x.shape[-1], theta, scaling))  # [d/2]
    positions = jnp.broadcast_to(positions, x.shape[:2])
    angle = positions.astype(jnp.float32)[..., None] * freq  # [b, seq, d/2]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
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


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """bool [batch, q, k]: key position <= query position (and within ``window`` of it)."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    mask = diff >= 0
    return mask if window is None else mask & (diff < window)


class Attention(nn.Module):
    config: LlamaConfig
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, x, positions, cache=None):
        c = self.config
        hd, dt = c.resolved_head_dim, c.compute_dtype
        positions = jnp.broadcast_to(positions, x.shape[:2])
        proj = (
            lambda heads, name, axes: QDenseGeneral(  # noqa: E731
                (heads, hd),
                use_bias=c.qkv_bias,
                dtype=dt,
                kernel_init=_init(axes),
                bias_init=_init(axes[1:], nn.initializers.zeros),
                quant=self.quant,
                name=name,
            )
        )
        q = proj(c.num_heads, "query", ("embed", "heads", "head_dim"))(x)
        k = proj(c.num_kv_heads, "key", ("embed", "kv_heads", "head_dim"))(x)
        v = proj(c.num_kv_heads, "value", ("embed", "kv_heads", "head_dim"))(x)
        q = rope(q, positions, c.rope_theta, c.rope_scaling)
        k = rope(k, positions, c.rope_theta, c.rope_scaling)
        b, t = x.shape[:2]
        if cache is None:
            k_pos = positions
        else:  # write this call's keys and values, attend over the whole cache
            cache, k, v, k_pos = cache.update(k, v, positions)
        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dt)).astype(jnp.float32)
        scores = scores / jnp.sqrt(hd)
        mask = attention_mask(positions, k_pos, c.sliding_window)[:, None, None]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dt)).reshape(b, t, c.num_heads, hd)
        out = QDenseGeneral(
            c.embed_dim,
            axis=(-2, -1),
            use_bias=False,
            dtype=dt,
            kernel_init=_init(("heads", "head_dim", "embed")),
            quant=self.quant,
            name="out",
        )(out)
        return out if cache is None else (out, cache)


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
    def __call__(self, x, positions, cache=None):
        c = self.config
        norm = lambda name: RMSNorm(c.norm_eps, c.compute_dtype, name=name)  # noqa: E731
        attn = Attention(c, self.quant, name="attn")(norm("attn_norm")(x), positions, cache)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        x = x + MLP(c, self.quant, name="mlp")(norm("mlp_norm")(x))
        return x if cache is None else (x, cache)


class Llama(nn.Module):
    """The decoder: tokens int32 [batch, seq] to logits f32 [batch, seq, vocab].

    ``positions`` (int [batch, seq] or [seq]; default ``arange(seq)``) are the tokens' positions
    (RoPE and the causal mask). With ``cache`` (a ``KVCache``) the call returns
    ``(logits, cache)`` with this call's keys and values written at ``positions``.
    """

    config: LlamaConfig
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None):
        c = self.config
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"Llama tokens: expected integer token ids, got {tokens.dtype}.")
        if tokens.ndim != 2:
            raise ValueError(f"Llama tokens: expected [batch, seq], got shape {tokens.shape}.")
        if positions is None:
            positions = jnp.arange(tokens.shape[1])
        positions = jnp.broadcast_to(positions, tokens.shape)
        if cache is not None and len(cache.layers) != c.num_layers:
            raise ValueError(
                f"Llama: the cache holds {len(cache.layers)} layers, the model {c.num_layers}."
            )
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
        layers = []
        for i in range(c.num_layers):
            if cache is None:
                x = Block(c, self.quant, name=f"layers_{i}")(x, positions)
            else:
                x, layer = Block(c, self.quant, name=f"layers_{i}")(x, positions, cache.layers[i])
                layers.append(layer)
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
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, cache.replace(layers=tuple(layers)))
