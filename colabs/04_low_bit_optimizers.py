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
# # 04 · Low-bit optimizer states in your own optax loop
#
# AdamW keeps two f32 moments per parameter: 8 bytes of state for every 4-byte weight, twice
# the model. `jaxquant.optim` stores those moments in 8 or 4 bits (and Shampoo's
# preconditioners in 4 bits) while doing every update's arithmetic in f32. Each optimizer is
# an `optax.GradientTransformation`, so it drops into any training loop; this notebook uses a
# plain one:
#
# 1. the state's exact bytes, for this model and (without allocating anything) for a 7B model;
# 2. training curves of f32 AdamW vs 8-bit and 4-bit AdamW and 4-bit Shampoo, same batches;
# 3. weight averaging (a growing-half-life EMA) on top of a 4-bit optimizer.

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
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from jaxquant import optim
from jaxquant.data import load_digits

# CI runs every notebook top to bottom at a reduced size; the prose quotes the full size.
SMALL = os.environ.get("JAXQUANT_COLAB_SIZE", "full") == "small"
STEPS = 60 if SMALL else 1500
WIDTH = 256 if SMALL else 512
print(jax.devices(), "small" if SMALL else "full size")

# %% [markdown]
# ## The model and the loop: yours
#
# An MLP on the bundled handwritten digits (8 × 8 images; 1,437 to train, 360 to test). With
# two hidden layers of 512 it has 300 k parameters, small enough to train with each optimizer
# in a minute or two on a CPU; its two big kernels get quantized states. The loop is plain
# optax: `tx.init`, `tx.update`, `optax.apply_updates`.


# %%
class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.gelu(nn.Dense(self.width)(x))
        x = nn.gelu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


x_train, y_train = map(jnp.asarray, load_digits("train"))
x_test, y_test = map(jnp.asarray, load_digits("test"))
model = MLP(WIDTH)
params0 = model.init(jax.random.key(0), x_train[:1])["params"]
n_params = sum(p.size for p in jax.tree.leaves(params0))
print(f"{n_params:,} parameters")


def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_accuracy(params):
    return float((model.apply({"params": params}, x_test).argmax(-1) == y_test).mean())


def train(tx, steps=STEPS, batch=64):
    """The same batches for every optimizer; returns the params, the state and the losses."""

    @jax.jit
    def step(params, state, i):
        idx = jax.random.choice(jax.random.key(i), len(y_train), (batch,))
        loss, grads = jax.value_and_grad(loss_fn)(params, x_train[idx], y_train[idx])
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state, losses = params0, tx.init(params0), []
    start = time.perf_counter()
    for i in range(steps):
        params, state, loss = step(params, state, i)
        losses.append(loss)
    seconds = time.perf_counter() - start
    return params, state, np.asarray(jax.device_get(losses)), seconds


# %% [markdown]
# ## 1. What the state costs
#
# `optim.bytes_per_param(state, params)` counts the state's stored arrays exactly: codes,
# block scales, f32 leaves. Leaves under 4,096 elements (the biases here) keep f32 state,
# since their scales would cost more than they save.

# %%
LR = optax.warmup_cosine_decay_schedule(0.0, 1e-3, STEPS // 10, STEPS)
optimizers = {
    "optax.adamw (f32)": optax.adamw(LR, weight_decay=1e-4),
    "adamw 8-bit": optim.adamw(LR, weight_decay=1e-4, state_bits=8),
    "adamw 4-bit": optim.adamw(LR, weight_decay=1e-4, state_bits=4),
    "shampoo 4-bit": optim.shampoo(LR, state_bits=4, moment_bits=4),
}
for name, tx in optimizers.items():
    print(f"{name:<18} {optim.bytes_per_param(tx.init(params0), params0):6.3f} bytes/param")

# %% [markdown]
# The same count works on shapes alone: `jax.eval_shape(tx.init, ...)` builds the state's
# structure without allocating it. For the linear layers and embeddings of a Llama-2-7B-shaped
# model (6.7 B parameters):
#
# (Shampoo's Kronecker factors cost more than Adam's moments on this MLP's 512-wide kernels:
# two 512 × 512 factors per kernel. At 7B every dimension exceeds `max_preconditioner_dim`
# (1,024), so every leaf falls back to its grafted Adam, here with 4-bit moments: the same
# bytes as 4-bit AdamW. Raise `max_preconditioner_dim` to precondition them, at the cost of
# eigendecompositions of 4,096-wide factors.)

# %%
dim, hidden, vocab, layers = 4096, 11008, 32000, 32
shapes = {"embed": (vocab, dim), "head": (dim, vocab)}
for i in range(layers):
    for k in "qkvo":
        shapes[f"{i}/{k}"] = (dim, dim)
    for k, s in (("gate", (dim, hidden)), ("up", (dim, hidden)), ("down", (hidden, dim))):
        shapes[f"{i}/{k}"] = s
big = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
gib = {}
for name, tx in optimizers.items():
    gib[name] = optim.state_nbytes(jax.eval_shape(tx.init, big)) / 2**30
    print(f"{name:<18} {gib[name]:6.1f} GiB of optimizer state")
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.barh(list(gib), list(gib.values()))
ax.set_xlabel("GiB of optimizer state for 6.7 B parameters")
ax.invert_yaxis()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Does it train as well?
#
# Same initialization, same batches, same schedule (linear warm-up, cosine decay). At full size:
# 1,500 steps of 64 images.

# %%
runs = {}
for name, tx in optimizers.items():
    params, state, losses, seconds = train(tx)
    runs[name] = (losses, test_accuracy(params), seconds)
    print(
        f"{name:<18} final train loss {losses[-50:].mean():.4f}  test accuracy "
        f"{runs[name][1]:.3f}  ({seconds:.1f} s)"
    )


# %%
def smooth(x, k=25):
    k = min(k, len(x))
    return np.convolve(x, np.ones(k) / k, mode="valid")


fig, ax = plt.subplots(figsize=(8, 4.5))
for name, (losses, acc, _) in runs.items():
    ax.plot(smooth(losses), label=f"{name} (test acc {acc:.3f})")
ax.set(yscale="log", xlabel="step", ylabel="train loss (moving average)")
ax.legend()
plt.show()

# %% [markdown]
# At full size (CPU-2), f32, 8-bit and 4-bit AdamW all end at a train loss of 0.0013–0.0014
# and 0.986 test accuracy: the 4-bit default (an NF4 first moment with stochastic rounding in
# blocks of 16, and a factored f32 second moment) trains as well at a tenth of the memory
# (0.80 bytes per parameter against 8). BENCHMARKS.md ("Low-bit optimizer states on
# converging fits") measures every format over long runs and three seeds.
#
# 4-bit Shampoo did *worse* here (train loss 0.039, test accuracy 0.983) and took 266 s
# against AdamW's 4–14 s: its eigendecompositions every 10 steps dominate on a CPU, and its
# hyperparameters (the same learning rate as AdamW, grafted) were not tuned for this model.
# It is the optimizer to try when the step, not the state, limits you, on an accelerator.
#
# ## 3. Weight averaging on top
#
# `optim.with_averaging(tx, optim.ema_growing())` keeps an exponential moving average of the
# weights whose half-life is a fixed fraction of the steps taken so far, so it needs no
# horizon; `optim.averaged_params(state)` reads it. It wraps any optimizer, low-bit ones
# included (the average itself is f32 here: one more copy of the params). After a cosine decay
# to zero the last iterate has already settled, and at full size the average scores the same
# (test loss 0.0768 both); averaging pays off with constant or `inverse_sqrt` schedules,
# where the run can stop at any step (`optim.inverse_sqrt_schedule`).

# %%
tx = optim.with_averaging(optimizers["adamw 4-bit"], optim.ema_growing())
params, state, losses, _ = train(tx)
average = optim.averaged_params(state)
print(
    f"4-bit AdamW, last iterate:    test accuracy {test_accuracy(params):.3f}, "
    f"test loss {float(loss_fn(params, x_test, y_test)):.4f}"
)
print(
    f"4-bit AdamW, averaged (EMA):  test accuracy {test_accuracy(average):.3f}, "
    f"test loss {float(loss_fn(average, x_test, y_test)):.4f}"
)

# %% [markdown]
# The same options are flags of the trainer (`--config.optim.state_bits=4`,
# `--config.optim.averaging=ema`, ...): see the README. Next: `05_low_precision_training`
# quantizes the matmuls of training themselves.
