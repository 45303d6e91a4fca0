"""Text generation with a KV cache: batched prompts, a prefill, then one jitted decode loop.

``generate(model, variables, prompts, max_new_tokens=...)`` works for every way a ``Llama`` is
applied: float params, a served-quantized model (``{'params', 'quant'}`` with
``QuantConfig(mode='serve')``: the kernels), a VQ-served one, and params sharded on a mesh.

The cache (``KVCache``) holds each layer's keys and values for ``batch x length`` positions:

* ``'float32'`` / ``'bfloat16'``: as computed, in that dtype;
* ``'int8'`` / ``'int4'``: KIVI's recipe (Liu et al., arXiv:2402.02750) through the numerics
  core: values quantized per token (one scale per token and head, over ``head_dim``), keys per
  channel (one scale per channel over each group of ``group`` positions, default 32); the keys of
  the group still being filled are kept in bfloat16 (the residual) until it is complete. Scales
  are float32: per token and head for values (4 bytes per ``head_dim`` codes), per channel and
  group for keys.

Prompts of different lengths are right-padded; each row has its own positions, so a row's cache
slot ``s`` holds its position ``s`` and the decode step writes each row at its own length. Pad
tokens get an out-of-range position, so they write nothing.

``kv_cache='none'`` decodes without a cache: every step runs the whole model over the
``prompt + max_new_tokens`` buffer (one compilation, like the cached loop): the reference the
cache is tested against and the baseline its speed is measured against.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant.numerics as jn
from jaxquant.numerics.kernel_options import current_kernel_options

KV_FORMATS = ("float32", "bfloat16", "int8", "int4", "none")
_FLOAT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _leafwise(fn, big, new):
    """``fn`` over the array leaves of two QArrays whose shapes differ (the cache and a slice)."""
    leaves, treedef = jax.tree.flatten(big)
    return jax.tree.unflatten(
        treedef, [fn(a, b) for a, b in zip(leaves, jax.tree.leaves(new), strict=True)]
    )


@flax.struct.dataclass
class LayerKV:
    """One layer's cache. Float formats: ``keys``/``values`` ``[batch, length, kv_heads, hd]``.
    Integer formats: ``keys`` a ``QArray`` of ``[batch, length/group, group, kv_heads, hd]``
    (scales shared along ``group``), ``values`` a ``QArray`` of ``[batch, length, kv_heads, hd]``
    (scales shared along ``hd``), ``residual`` the float keys of each row's incomplete group
    ``[batch, group, kv_heads, hd]`` (bfloat16)."""

    keys: object
    values: object
    residual: jax.Array | None = None
    kind: str = flax.struct.field(pytree_node=False, default="float32")
    group: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def length(self) -> int:
        return self.values.shape[1]

    def update(self, k, v, positions):
        """Writes ``k``, ``v`` ``[batch, t, kv_heads, hd]`` at ``positions`` ``[batch, t]``
        (out-of-range positions write nothing; a row's positions are consecutive from its current
        length). Returns ``(new cache, keys, values, key positions)`` for attention over the
        whole cache: float ``[batch, length, kv_heads, hd]``, positions ``[batch, length]``."""
        b = k.shape[0]
        rows = jnp.arange(b)[:, None]
        slots = jnp.broadcast_to(jnp.arange(self.length), (b, self.length))
        if self.kind in _FLOAT:
            dt = _FLOAT[self.kind]
            keys = self.keys.at[rows, positions].set(k.astype(dt), mode="drop")
            values = self.values.at[rows, positions].set(v.astype(dt), mode="drop")
            return self.replace(keys=keys, values=values), keys, values, slots
        fmt, g = self.kind, self.group
        s, n_groups = self.length, self.length // self.group
        # values: each token quantized on its own, scattered into every QArray leaf
        qv = jn.quantize(v.astype(jnp.float32), fmt, axis=-1)
        values = _leafwise(
            lambda big, new: big.at[rows, positions].set(new, mode="drop"), self.values, qv
        )
        # keys: the float view (complete groups dequantized, the row's open group from the
        # residual), this call's keys written into it, newly completed groups quantized
        valid = positions < s
        start = positions[:, 0]  # the row's length before this call
        end = start + valid.sum(axis=1)  # and after
        open_before, open_after = start // g, end // g  # [b]
        grouped = self.keys.dequantize().reshape(b, s, *k.shape[2:])
        in_open = (slots // g) == open_before[:, None]
        resid = jnp.take_along_axis(
            self.residual.astype(jnp.float32), (slots % g)[:, :, None, None], axis=1
        )  # [b, s, kvh, hd]: the residual tiled over every group
        full = jnp.where(in_open[:, :, None, None], resid, grouped)
        # new keys at the residual's precision, so a group is quantized from the same values
        # whichever step completes it
        k = k.astype(self.residual.dtype).astype(jnp.float32)
        full = full.at[rows, positions].set(k, mode="drop")
        fresh = jn.quantize(full.reshape(b, n_groups, g, *k.shape[2:]), fmt, axis=2)
        gi = jnp.arange(n_groups)[None, :]
        take = (gi >= open_before[:, None]) & (gi < open_after[:, None])  # [b, n_groups]

        def pick(old, new):
            return jnp.where(take.reshape(b, n_groups, *([1] * (old.ndim - 2))), new, old)

        keys = _leafwise(pick, self.keys, fresh)
        window = jnp.clip(open_after * g, 0, s - g)[:, None] + jnp.arange(g)[None, :]
        residual = jnp.take_along_axis(full, window[:, :, None, None], axis=1).astype(
            self.residual.dtype
        )
        return (
            self.replace(keys=keys, values=values, residual=residual),
            full,
            values.dequantize(),
            slots,
        )

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


@flax.struct.dataclass
class KVCache:
    """The per-layer caches of a model: ``model.apply(v, tokens, positions, cache)``."""

    layers: tuple

    @classmethod
    def create(cls, config, batch: int, length: int, kind: str = "bfloat16", *, group: int = 32):
        """An empty cache for ``batch`` rows of ``length`` positions in format ``kind``
        (``'float32'``, ``'bfloat16'``, ``'int8'``, ``'int4'``); integer formats round
        ``length`` up to a multiple of ``group``."""
        if kind not in _FLOAT and kind not in ("int8", "int4"):
            raise ValueError(
                f"KV cache format {kind!r}: expected one of float32, bfloat16, int8, int4."
            )
        shape = (batch, length, config.num_kv_heads, config.resolved_head_dim)
        if kind in _FLOAT:
            zeros = jnp.zeros(shape, _FLOAT[kind])
            layer = LayerKV(keys=zeros, values=zeros, kind=kind)
        else:
            if group < 1:
                raise ValueError(f"KV cache group={group}: expected a positive int.")
            length = -(-length // group) * group
            shape = (batch, length, *shape[2:])
            zeros = jnp.zeros(shape, jnp.float32)
            keys = jn.quantize(
                zeros.reshape(batch, length // group, group, *shape[2:]), kind, axis=2
            )
            values = jn.quantize(zeros, kind, axis=-1)
            residual = jnp.zeros((batch, group, *shape[2:]), jnp.bfloat16)
            layer = LayerKV(keys=keys, values=values, residual=residual, kind=kind, group=group)
        return cls(layers=tuple(layer for _ in range(config.num_layers)))

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (codes, scales and the float residual)."""
        return sum(layer.nbytes for layer in self.layers)


@dataclasses.dataclass
class Generation:
    """What ``generate`` returns.

    tokens: per prompt, the generated ids (without the prompt and without the stop token);
    text: their decoded text (when a tokenizer was given); finished: whether each row stopped on
    a stop token; prefill_seconds, decode_seconds: wall time of the prefill and of the decode loop
    (compilation excluded: both are compiled before they are timed); decode_tokens_per_second:
    ``batch * steps / decode_seconds``; cache_bytes: the KV cache's size (0 without one).
    """

    tokens: list[list[int]]
    text: list[str] | None
    finished: list[bool]
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float
    cache_bytes: int
    steps: int


def sample_logits(logits, key, *, temperature: float, top_k: int, top_p: float):
    """Next ids ``[batch]`` from logits ``[batch, vocab]``: greedy at temperature 0, else a draw
    from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely ids (0: all)
    and to the smallest set whose probability reaches ``top_p`` (1: all)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely ids
        drop_sorted = before >= top_p  # the most likely id is always kept
        drop = (
            jnp.zeros_like(drop_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(drop_sorted)
        )
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_k, top_p, max_new_tokens):
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature}: expected >= 0 (0: greedy).")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: expected an int >= 0 (0: no limit).")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive int.")


def generate(
    model,
    variables,
    prompts,
    *,
    max_new_tokens: int,
    tokenizer=None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    kv_cache: str = "bfloat16",
    kv_group: int = 32,
    pad_to: int = 32,
) -> Generation:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: a ``jaxquant.models.Llama`` (float, QAT or serving ``QuantConfig``).
      variables: its variables (``{'params': ...}``, plus ``'quant'`` when serving), possibly
        sharded on a mesh (the computation follows their shardings).
      prompts: a list of token-id lists (or 1-D arrays), or of strings (then ``tokenizer``
        encodes them); rows may have different lengths.
      max_new_tokens: tokens to generate per row at most.
      tokenizer: a ``jaxquant.data`` tokenizer: encodes string prompts, decodes ``text``, and
        gives the default stop tokens (its ``eos_ids``).
      temperature, top_k, top_p, seed: sampling (``temperature=0``: greedy, the default).
      stop_tokens: ids that end a row (default: the tokenizer's ``eos_ids``; ``[]``: none).
      kv_cache: ``'bfloat16'`` (default), ``'float32'``, ``'int8'``, ``'int4'`` or ``'none'``.
      kv_group: positions per key scale of the integer caches.
      pad_to: prompts are padded to a multiple of this length (fewer compilations).

    Returns:
      A ``Generation``.
    """
    _check_sampling(temperature, top_k, top_p, max_new_tokens)
    if kv_cache not in KV_FORMATS:
        raise ValueError(f"kv_cache={kv_cache!r}: expected one of {KV_FORMATS}.")
    config = model.config
    if isinstance(prompts, (str, np.ndarray)) or not isinstance(prompts, Sequence):
        prompts = [prompts]
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompts[{i}] is text: pass tokenizer= to encode it.")
            p = tokenizer.encode(p)
        p = np.asarray(p)
        if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
            raise ValueError(
                f"prompts[{i}]: expected a non-empty 1-D list of token ids, got shape {p.shape} "
                f"and dtype {p.dtype}."
            )
        if p.min() < 0 or p.max() >= config.vocab_size:
            raise ValueError(
                f"prompts[{i}]: token ids in [{p.min()}, {p.max()}], outside the model's "
                f"vocabulary [0, {config.vocab_size})."
            )
        rows.append(p.astype(np.int32))
    if stop_tokens is None:
        stop_tokens = getattr(tokenizer, "eos_ids", ()) if tokenizer is not None else ()
    lengths = np.array([len(r) for r in rows], np.int32)
    longest = int(lengths.max())
    context = config.max_seq_len
    if context is not None and longest + max_new_tokens > context:
        raise ValueError(
            f"The longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} is "
            f"{longest + max_new_tokens}, beyond the model's context of {context} positions."
        )
    t = -(-longest // pad_to) * pad_to
    total = t + max_new_tokens
    if kv_cache in ("int8", "int4"):
        total = -(-total // kv_group) * kv_group
    b = len(rows)
    tokens = np.zeros((b, t), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    out_of_range = total + 1
    positions = np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], out_of_range)
    key = jax.random.key(seed)
    stop_ids = tuple(int(i) for i in stop_tokens)
    prefill, decode = _functions(
        model, kv_cache == "none", temperature, top_k, top_p, max_new_tokens, stop_ids, t, total
    )
    cache = (
        None if kv_cache == "none" else KVCache.create(config, b, total, kv_cache, group=kv_group)
    )
    args = (
        variables,
        jnp.asarray(tokens),
        jnp.asarray(positions),
        jnp.asarray(lengths),
        cache,
        key,
    )
    prefill_c = _compiled(prefill, args)
    start = time.perf_counter()
    first, state = jax.block_until_ready(prefill_c(*args))
    prefill_seconds = time.perf_counter() - start
    decode_c = _compiled(decode, (variables, first, state))
    start = time.perf_counter()
    out, steps, done = jax.block_until_ready(decode_c(variables, first, state))
    decode_seconds = time.perf_counter() - start
    out, steps, done = np.asarray(out), int(steps), np.asarray(done)
    stops = set(stop_ids)
    result = []
    for row in out:
        ids = []
        for tok in row[:steps].tolist():
            if tok in stops:
                break
            ids.append(tok)
        result.append(ids)
    text = [tokenizer.decode(np.asarray(r, np.int32)) for r in result] if tokenizer else None
    generated = b * max(steps - 1, 1)  # the first token comes from the prefill
    return Generation(
        tokens=result,
        text=text,
        finished=[bool(d) for d in done],
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        decode_tokens_per_second=generated / decode_seconds if decode_seconds > 0 else math.inf,
        cache_bytes=0 if kv_cache == "none" else cache.nbytes,
        steps=steps,
    )


_EXECUTABLES: dict = {}


def _compiled(fn, args):
    """``fn`` compiled for ``args`` (shapes, dtypes, shardings) and the kernel options in effect,
    kept across calls, so that a second ``generate`` with the same shapes compiles nothing and
    the timing excludes compilation."""
    leaves, treedef = jax.tree.flatten(args)
    signature = tuple(
        (x.shape, x.dtype, getattr(x, "sharding", None)) if hasattr(x, "shape") else x
        for x in leaves
    )
    key = (fn, treedef, signature, current_kernel_options())
    if key not in _EXECUTABLES:
        if len(_EXECUTABLES) > 32:
            _EXECUTABLES.clear()
        _EXECUTABLES[key] = fn.lower(*args).compile()
    return _EXECUTABLES[key]


@functools.lru_cache(maxsize=16)
def _functions(model, recompute, temperature, top_k, top_p, max_new_tokens, stop_ids, t, total):
    """The jitted prefill and decode loop (one pair per model and static setting)."""
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    if recompute:
        return _recompute_fns(model, sample, t, total, max_new_tokens, stop)
    return _cached_fns(model, sample, max_new_tokens, stop)


def _cached_fns(model, sample, max_new_tokens, stop):
    @jax.jit
    def prefill(variables, tokens, positions, lengths, cache, key):
        logits, cache = model.apply(variables, tokens, positions, cache)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        key, sub = jax.random.split(key)
        first = sample(last, sub)
        return first, (cache, lengths, key)

    @jax.jit
    def decode(variables, first, state):
        cache, lengths, key = state
        b = first.shape[0]
        out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, stop)

        def cond(carry):
            step, _, _, _, done, _ = carry
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            step, cache, out, tok, done, key = carry
            positions = (lengths + step - 1)[:, None]
            logits, cache = model.apply(variables, tok[:, None], positions, cache)
            key, sub = jax.random.split(key)
            nxt = sample(logits[:, 0], sub)
            out = out.at[:, step].set(nxt)
            return step + 1, cache, out, nxt, done | jnp.isin(nxt, stop), key

        step, _, out, _, done, _ = jax.lax.while_loop(
            cond, body, (jnp.int32(1), cache, out, first, done, key)
        )
        return out, step, done

    return prefill, decode


def _recompute_fns(model, sample, t, total, max_new_tokens, stop):
    """No cache: each step reruns the model over the whole ``[batch, total]`` buffer."""

    @jax.jit
    def prefill(variables, tokens, positions, lengths, cache, key):
        del positions, cache
        buf = jnp.zeros((tokens.shape[0], total), jnp.int32).at[:, :t].set(tokens)
        logits = model.apply(variables, buf)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        key, sub = jax.random.split(key)
        first = sample(last, sub)
        rows = jnp.arange(tokens.shape[0])
        return first, (buf.at[rows, lengths].set(first), lengths, key)

    @jax.jit
    def decode(variables, first, state):
        buf, lengths, key = state
        b = first.shape[0]
        rows = jnp.arange(b)
        out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, stop)

        def cond(carry):
            step, _, _, done, _ = carry
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            step, buf, out, done, key = carry
            logits = model.apply(variables, buf)
            cur = lengths + step - 1
            key, sub = jax.random.split(key)
            nxt = sample(logits[rows, cur], sub)
            out = out.at[:, step].set(nxt)
            buf = buf.at[rows, cur + 1].set(nxt, mode="drop")
            return step + 1, buf, out, done | jnp.isin(nxt, stop), key

        step, _, out, done, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), buf, out, done, key))
        return out, step, done

    return prefill, decode
