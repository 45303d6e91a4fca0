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
# # 02 · Quantize your own Flax model
#
# jaxquant does not ask you to rewrite your model. A Linen model of plain `nn.Dense`,
# `nn.DenseGeneral`, `nn.Einsum` and `nn.Conv` layers is quantized where it stands, through
# `jq.intercept`: the layers are swapped for their quantized versions while the model is
# traced, with the same parameters. This notebook takes a small CNN of our own on handwritten
# digits through the whole path:
#
# 1. **rules** say which layer gets which quantizer;
# 2. **QAT** (quantization-aware training) fine-tunes through fake-quantized weights and
#    activations;
# 3. **calibrate** gathers each layer's input statistics (the Hessian `Σ x xᵀ`);
# 4. **freeze** stores the weights as packed codes and **serve** computes with them;
# 5. **GPTQ** (`jq.quantize_model`) uses the Hessians to quantize without training, and we plot
#    float vs round-to-nearest vs GPTQ accuracy at every bit width.

# %%
# Setup. On Colab this installs jaxquant from its repository; elsewhere:
#   pip install "jaxquant[colab] @ git+https://github.com/jaxquant/jaxquant"
import subprocess
import sys

if "google.colab" in sys.modules:  # if pip changes Colab's jax, restart the session when asked
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "jaxquant[colab] @ git+https://github.com/jaxquant/jaxquant"], check=True)

# %%
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jaxquant as jq
from jaxquant.data import load_digits

# CI runs every notebook top to bottom at a reduced size; the prose quotes the full size.
SMALL = os.environ.get("JAXQUANT_COLAB_SIZE", "full") == "small"
FLOAT_STEPS, QAT_STEPS = (100, 25) if SMALL else (400, 100)
BITS = (2, 4) if SMALL else (2, 3, 4, 8)
print(jax.devices(), "small" if SMALL else "full size")

# %% [markdown]
# ## A model of your own
#
# Nothing here imports jaxquant: two convolutions, a hidden dense layer and a head, trained in
# float on the bundled digits (8 × 8 grey images; 1,437 to train, 360 to test).


# %%
class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


x_train, y_train = map(jnp.asarray, load_digits("train"))
x_test, y_test = map(jnp.asarray, load_digits("test"))
print("images", x_train.shape, "labels", y_train.shape)
cnn, tx = CNN(), optax.adam(3e-3)


def train(config, params, steps):
    """Adam on batches of 128; ``config`` is float (no rules) or QAT."""

    def loss(params, x, y):
        with jq.intercept(config):  # quantizes the plain layers while this is traced
            logits = cnn.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt, i):
        idx = jax.random.choice(jax.random.key(i), len(y_train), (128,))
        updates, opt = tx.update(jax.grad(loss)(params, x_train[idx], y_train[idx]), opt)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    for i in range(steps):
        params, opt = step(params, opt, i)
    return params


def accuracy(config, variables):
    logits = jq.apply_with_config(cnn, config, variables, x_test)  # = apply under intercept
    return float((logits.argmax(-1) == y_test).mean())


params = train(jq.QuantConfig(), cnn.init(jax.random.key(0), x_train[:1])["params"], FLOAT_STEPS)
float_acc = accuracy(jq.QuantConfig(), {"params": params})
print(f"float test accuracy: {float_acc:.3f}")

# %% [markdown]
# ## 1. Rules
#
# A `QuantRule(path_regex, weight=..., act=...)` matches layer paths (`Conv_0`, `Dense_1`, ...)
# and gives a weight quantizer and optionally an activation quantizer; the first match wins.
# `jq.freeze` reports what every rule did. Two things to notice in the report below:
#
# - the **head** (the last `Dense`, whose output the model returns) stays in float under
#   `QuantRule(".*")`, by role: its error lands directly on the logits. Name the role
#   (`roles=("linear", "head")`) to quantize it anyway.
# - the first convolution sees 3 × 3 × 1 = 9 inputs per output: one scale per 9 weights, so it
#   gets 8 bits here.

# %%
rules = (
    jq.QuantRule("Conv_0", weight=jq.INT8),
    jq.QuantRule(".*", weight=jq.INT4, act=jq.INT8),  # W4A8: per-token int8 activations
)
quant, report = jq.freeze(cnn, params, x_train[:1], rules=rules)
print(report)

# %% [markdown]
# ## 2. Quantization-aware training
#
# In `qat` mode each matched layer fake-quantizes its weight and input (quantize, then
# dequantize) with a straight-through gradient, so training sees the error it will have to live
# with. A short fine-tune from the float weights:

# %%
qat = jq.QuantConfig(mode="qat", rules=rules)
print(f"W4A8 before QAT: {accuracy(qat, {'params': params}):.3f}")
qat_params = train(qat, params, QAT_STEPS)
print(f"W4A8 after {QAT_STEPS} QAT steps: {accuracy(qat, {'params': qat_params}):.3f}")

# %% [markdown]
# ## 3. Freeze and serve
#
# `freeze` rounds the QAT weights to their codes (a `QArray` each, in the `'quant'`
# collection); `serving_params` drops the float weights it replaced. In `serve` mode every
# quantized layer multiplies with its frozen tensor, through a low-bit matmul kernel where one
# applies. Serving computes what QAT trained: with the reference matmul
# (`kernel_options(implementation="xla")`) the logits are bit-identical.

# %%
quant, report = jq.freeze(cnn, qat_params, x_train[:1], rules=rules)
served = {"params": jq.serving_params(qat_params, quant), "quant": quant}
serve = jq.QuantConfig(mode="serve", rules=rules)
with jq.kernel_options(implementation="xla"):
    served_logits = jq.apply_with_config(cnn, serve, served, x_test)
qat_logits = jq.apply_with_config(cnn, qat, {"params": qat_params}, x_test)
print("served == QAT, bit for bit:", bool((served_logits == qat_logits).all()))
print(f"served W4A8 test accuracy: {accuracy(serve, served):.3f}")
float_bytes = sum(p.nbytes for p in jax.tree.leaves(qat_params))
print(f"model bytes: float {float_bytes:,}, served {report.model_bytes:,}")

# %% [markdown]
# ## 4. Calibrate: what GPTQ needs to know
#
# Post-training quantization without any training needs to know what the layers see. In
# `calibrate` mode each matched layer adds its inputs' `Σ x xᵀ` (for a convolution: over the
# unfolded 3 × 3 patches) to a `'qstats'` collection. Its diagonal says which inputs carry
# energy, its off-diagonal how they correlate: GPTQ rounds one input row at a time and pushes
# each row's error onto the rows still to be rounded, along these correlations.

# %%
calibrate = jq.QuantConfig(mode="calibrate", rules=rules)
_, stats = jq.apply_with_config(
    cnn, calibrate, {"params": params}, x_train[:512], mutable=["qstats"]
)
h = stats["qstats"]["Conv_1"]["hessian"]
print("Conv_1 Hessian:", h.shape, "from", int(stats["qstats"]["Conv_1"]["count"]), "patches")
corr = h / jnp.sqrt(jnp.outer(jnp.diag(h), jnp.diag(h)) + 1e-12)
fig, ax = plt.subplots(figsize=(4.5, 4))
ax.imshow(np.asarray(corr[:96, :96]), cmap="RdBu", vmin=-1, vmax=1)
ax.set_title("Conv_1 input correlations (first 96 of 288)")
plt.show()

# %% [markdown]
# ## 5. GPTQ vs round-to-nearest, at every bit width
#
# `jq.quantize_model(model, params, calibration_batches, rules)` runs GPTQ layer by layer: the
# Hessians of each layer are gathered on the outputs of the layers before it *already
# quantized*, so each layer corrects for the error upstream. Round-to-nearest (`freeze`) needs
# no data. Both use the same format and scales; only the rounding differs. Weights only here;
# the first convolution stays at 8 bits.

# %%
calibration = [x_train[:512], x_train[512:1024]]
results = {"RTN": {}, "GPTQ": {}}
for bits in BITS:
    weight_rules = (jq.QuantRule("Conv_0", weight=jq.INT8), jq.QuantRule(".*", weight=f"int{bits}"))
    serve = jq.QuantConfig(mode="serve", rules=weight_rules)
    rtn, _ = jq.freeze(cnn, params, x_train[:1], rules=weight_rules)
    gptq, report = jq.quantize_model(cnn, params, calibration, weight_rules)
    for method, q in (("RTN", rtn), ("GPTQ", gptq)):
        results[method][bits] = accuracy(
            serve, {"params": jq.serving_params(params, q), "quant": q}
        )
    print(f"int{bits}: RTN {results['RTN'][bits]:.3f}  GPTQ {results['GPTQ'][bits]:.3f}")

# %%
fig, ax = plt.subplots(figsize=(6, 4))
ax.axhline(float_acc, color="k", ls="--", label="float")
for method, marker in (("RTN", "o"), ("GPTQ", "s")):
    ax.plot(BITS, [results[method][b] for b in BITS], marker=marker, label=method)
ax.set(xlabel="weight bits (one scale per output channel)", ylabel="test accuracy", xticks=BITS)
ax.legend()
ax.set_title("Post-training quantization of the CNN")
plt.show()

# %% [markdown]
# At 3 bits and above rounding to nearest loses nothing on this small model; at 2 bits with one
# scale per channel it falls apart, and GPTQ, with the same format and scales, keeps close to
# float (at full size: float 0.989; int2 RTN 0.667, GPTQ 0.986). BENCHMARKS.md, "PTQ of a
# user's CNN", has every width over six seeds. Smaller groups (`"int2_g32"`) help RTN too, at
# 1 more bit per weight.
#
# What this notebook did not need: any change to the model. The same calls work on any Linen
# model of Dense, DenseGeneral, Einsum and Conv layers; a layer jaxquant cannot quantize that a
# rule reaches (`nn.ConvTranspose`, a custom `self.param` matrix) gets a warning naming it, and
# a rule that matches nothing warns too.
#
# Next: `03_pretrained_llm` does the same to a real pretrained language model.
