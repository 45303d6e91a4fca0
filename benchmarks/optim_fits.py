"""Low-bit optimizer states on converging fits: every state format, three problems, two
horizons, several seeds.

  python benchmarks/optim_fits.py [--problems=regression,classification,lm]
      [--horizons=short,long] [--seeds=3] [--variants=...] [--out=results.json]

Each problem is trained from the same initialization on the same batches by every variant
(``VARIANTS``), for each horizon (a warmup + cosine schedule that ends at that horizon, so the
loss converges), and seed. A variant is compared with its own float counterpart (``family``:
AdamW, Lion, SGD with momentum, Shampoo, each at f32 states); the table gives the mean final
loss over the seeds, its relative change against the counterpart (mean and spread over seeds,
paired by seed) and the state's exact bytes per parameter (``jaxquant.optim.bytes_per_param``).

Problems (``PROBLEMS``):

* ``regression``: a tanh MLP (32 → 256 → 256 → 1) fitted to a random tanh teacher (32 → 64 →
  64 → 1) on fresh Gaussian inputs, batch 128; loss: the mean squared error on 8,192 held-out
  inputs (the population loss).
* ``classification``: a tanh MLP (64 → 256 → 256 → 10) on the bundled 8×8 digits' training
  split (1,437 images), batch 128, trained toward zero training loss; loss: the training set's
  cross-entropy.
* ``lm``: a byte-level Llama (embed 64, 2 layers, 4 heads, MLP 256) on the bundled
  Shakespeare, sequences of 64, batch 16; loss: nats per byte on 128 validation windows.

The learning rates (``LR``) were chosen for each family's f32 optimizer (the best of a
{1, 3} × 10^k grid on the short horizon, seed 0; AdamW's best, 1e-2, was the grid's top, so a
higher rate may do better still); the low-bit variants use their family's.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxquant import optim  # noqa: E402
from jaxquant.data import load_digits, load_text  # noqa: E402
from jaxquant.models import Llama, LlamaConfig  # noqa: E402

_PROBLEMS = flags.DEFINE_list("problems", ["regression", "classification", "lm"], "Problems.")
_HORIZONS = flags.DEFINE_list("horizons", ["short", "long"], "Horizons (HORIZONS).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per (problem, horizon, variant).")
_VARIANTS = flags.DEFINE_list("variants", [], "Variants (default: all of VARIANTS).")
_OUT = flags.DEFINE_string("out", "", "Write every run's result to this JSON file.")
_LR = flags.DEFINE_string("lr", "", "Override: family=lr,... (for the learning-rate sweep).")

HORIZONS = {
    "regression": {"short": 1000, "long": 3000},
    "classification": {"short": 500, "long": 2000},
    "lm": {"short": 300, "long": 1000},
}
# The best of the grid {1, 3} x 10^k on the short horizon, f32, seed 0 (see BENCHMARKS.md);
# Shampoo's step has Adam's norm (grafting), so it takes AdamW's rate.
LR = {
    "regression": {"adamw": 1e-2, "lion": 3e-4, "sgdm": 1e-1, "shampoo": 1e-2},
    "classification": {"adamw": 1e-2, "lion": 1e-3, "sgdm": 3e-1, "shampoo": 1e-2},
    "lm": {"adamw": 1e-2, "lion": 1e-3, "sgdm": 1e-1, "shampoo": 1e-2},
}
WEIGHT_DECAY = {"adamw": 1e-4, "lion": 1e-3, "sgdm": 0.0, "shampoo": 1e-4}
CHUNK = 50  # steps per jitted call


def _adamw(lr, **kw):
    return optim.adamw(lr, weight_decay=WEIGHT_DECAY["adamw"], **kw)


def _shampoo(lr, **kw):
    return optim.shampoo(lr, weight_decay=WEIGHT_DECAY["shampoo"], **kw)


# name -> (family, factory of the schedule). The family's f32 member is its reference.
VARIANTS = {
    "adamw_f32": ("adamw", lambda lr: optax.adamw(lr, weight_decay=WEIGHT_DECAY["adamw"])),
    "8bit": ("adamw", lambda lr: _adamw(lr, state_bits=8)),
    "8bit_sr": ("adamw", lambda lr: _adamw(lr, state_bits=8, rounding="stochastic")),
    "fp8": ("adamw", lambda lr: _adamw(lr, state_bits=8, state_format="e4m3")),
    "fp8_sr": (
        "adamw",
        lambda lr: _adamw(lr, state_bits=8, state_format="e4m3", rounding="stochastic"),
    ),
    "4bit": ("adamw", lambda lr: _adamw(lr, state_bits=4)),
    "4bit_b32": ("adamw", lambda lr: _adamw(lr, state_bits=4, block_size=32)),
    "4bit_nearest": ("adamw", lambda lr: _adamw(lr, state_bits=4, rounding="nearest")),
    "4bit_factorized_b128": (
        "adamw",
        lambda lr: _adamw(lr, state_bits=4, state_format="factorized", block_size=128),
    ),
    "4bit_factorized_b128_nearest": (
        "adamw",
        lambda lr: _adamw(
            lr, state_bits=4, state_format="factorized", block_size=128, rounding="nearest"
        ),
    ),
    "4bit_rank1": ("adamw", lambda lr: _adamw(lr, state_bits=4, state_format="rank1")),
    "4bit_rank1_nearest": (
        "adamw",
        lambda lr: _adamw(lr, state_bits=4, state_format="rank1", rounding="nearest"),
    ),
    "4bit_paper": ("adamw", lambda lr: _adamw(lr, state_bits=4, state_format="rank1_dynamic")),
    "4bit_paper_sr": (
        "adamw",
        lambda lr: _adamw(lr, state_bits=4, state_format="rank1_dynamic", rounding="stochastic"),
    ),
    "lion_f32": ("lion", lambda lr: optax.lion(lr, weight_decay=WEIGHT_DECAY["lion"])),
    "lion_8bit": (
        "lion",
        lambda lr: optim.lion(lr, weight_decay=WEIGHT_DECAY["lion"], state_bits=8),
    ),
    "lion_4bit": (
        "lion",
        lambda lr: optim.lion(lr, weight_decay=WEIGHT_DECAY["lion"], state_bits=4),
    ),
    "lion_4bit_rank1": (
        "lion",
        lambda lr: optim.lion(
            lr, weight_decay=WEIGHT_DECAY["lion"], state_bits=4, state_format="rank1"
        ),
    ),
    "lion_4bit_dynamic": (
        "lion",
        lambda lr: optim.lion(
            lr, weight_decay=WEIGHT_DECAY["lion"], state_bits=4, state_format="rank1_dynamic"
        ),
    ),
    "sgdm_f32": ("sgdm", lambda lr: optax.sgd(lr, momentum=0.9)),
    "sgdm_8bit": ("sgdm", lambda lr: optim.sgd(lr, momentum=0.9, state_bits=8)),
    "sgdm_4bit": ("sgdm", lambda lr: optim.sgd(lr, momentum=0.9, state_bits=4)),
    "sgdm_4bit_rank1": (
        "sgdm",
        lambda lr: optim.sgd(lr, momentum=0.9, state_bits=4, state_format="rank1"),
    ),
    "sgdm_4bit_dynamic": (
        "sgdm",
        lambda lr: optim.sgd(lr, momentum=0.9, state_bits=4, state_format="rank1_dynamic"),
    ),
    "shampoo_f32": ("shampoo", lambda lr: _shampoo(lr)),
    "shampoo_4bit": ("shampoo", lambda lr: _shampoo(lr, state_bits=4)),
}
REFERENCE = {"adamw": "adamw_f32", "lion": "lion_f32", "sgdm": "sgdm_f32", "shampoo": "shampoo_f32"}


def mlp_init(key, sizes):
    params = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        key, k = jax.random.split(key)
        params.append({"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)})
    return params


def mlp(params, x):
    for p in params[:-1]:
        x = jnp.tanh(x @ p["w"] + p["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


class Problem:
    """``init(seed) -> params``, ``loss(params, step_key) -> scalar`` on one batch drawn from
    the key, ``evaluate(params) -> float``."""


class Regression(Problem):
    din = 32

    def __init__(self, seed):
        self.teacher = mlp_init(jax.random.key(10_000 + seed), [self.din, 64, 64, 1])
        self.x_eval = jax.random.normal(jax.random.key(7), (8192, self.din))

    def init(self, seed):
        return mlp_init(jax.random.key(seed), [self.din, 256, 256, 1])

    def _mse(self, params, x):
        return jnp.mean((mlp(params, x) - mlp(self.teacher, x)) ** 2)

    def loss(self, params, key):
        return self._mse(params, jax.random.normal(key, (128, self.din)))

    def evaluate(self, params):
        return float(jax.jit(self._mse)(params, self.x_eval))


class Classification(Problem):
    def __init__(self, seed):
        del seed
        images, labels = load_digits("train")
        self.x = jnp.asarray(images.reshape(len(labels), -1))
        self.y = jnp.asarray(labels)

    def init(self, seed):
        return mlp_init(jax.random.key(seed), [64, 256, 256, 10])

    def _ce(self, params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()

    def loss(self, params, key):
        idx = jax.random.randint(key, (128,), 0, self.y.shape[0])
        return self._ce(params, self.x[idx], self.y[idx])

    def evaluate(self, params):
        return float(jax.jit(self._ce)(params, self.x, self.y))


class LanguageModel(Problem):
    seq = 64

    def __init__(self, seed):
        del seed
        self.model = Llama(
            LlamaConfig(
                vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                mlp_dim=256,
            )
        )  # fmt: skip
        self.train = jnp.asarray(np.frombuffer(load_text("train").encode(), np.uint8))
        val = np.frombuffer(load_text("validation").encode(), np.uint8)
        starts = np.linspace(0, len(val) - self.seq - 2, 128).astype(np.int64)
        self.val = jnp.asarray(np.stack([val[s : s + self.seq + 1] for s in starts]))

    def init(self, seed):
        tokens = jnp.zeros((1, self.seq), jnp.int32)
        return nn.unbox(self.model.init(jax.random.key(seed), tokens)["params"])

    def _nll(self, params, windows):
        windows = windows.astype(jnp.int32)
        logits = self.model.apply({"params": params}, windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    def loss(self, params, key):
        starts = jax.random.randint(key, (16,), 0, self.train.shape[0] - self.seq - 1)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice(self.train, (s,), (self.seq + 1,)))(
            starts
        )
        return self._nll(params, windows)

    def evaluate(self, params):
        return float(jax.jit(self._nll)(params, self.val))


PROBLEMS = {"regression": Regression, "classification": Classification, "lm": LanguageModel}


def schedule(peak, steps):
    """Linear warmup over 5% of the steps, then cosine to 0 at ``steps``."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 20), steps, 0.0)


def run(problem: Problem, variant: str, steps: int, seed: int, lr: float) -> dict:
    opt = VARIANTS[variant][1](schedule(lr, steps))
    params = problem.init(seed)
    state = opt.init(params)
    data_key = jax.random.key(20_000 + seed)

    @jax.jit
    def chunk(params, state, start):
        def body(i, carry):
            p, s = carry
            g = jax.grad(problem.loss)(p, jax.random.fold_in(data_key, i))
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(start, start + CHUNK, body, (params, state))

    t0 = time.perf_counter()
    for start in range(0, steps, CHUNK):
        params, state = chunk(params, state, start)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    loss = problem.evaluate(params)
    if not np.isfinite(loss):
        print(f"  warning: {variant} seed {seed}: final loss {loss}", flush=True)
    return {
        "loss": loss,
        "bytes_per_param": optim.bytes_per_param(state, params),
        "seconds": seconds,
    }


def table(results, problems, horizons, names):
    lines = [
        "| problem | horizon | variant | final loss | Δ vs f32 counterpart (mean, min..max) "
        "| state bytes/param |",
        "|---|---|---|---:|---:|---:|",
    ]
    for p in problems:
        for h in horizons:
            for name in names:
                rows = results.get(f"{p}/{h}/{name}")
                ref = results.get(f"{p}/{h}/{REFERENCE[VARIANTS[name][0]]}")
                if not rows:
                    continue
                loss = statistics.mean(r["loss"] for r in rows)
                delta = ""
                if ref and name != REFERENCE[VARIANTS[name][0]]:
                    pairs = list(zip(rows, ref, strict=True))
                    if any(q["loss"] <= 0 for _, q in pairs):  # a loss that underflowed to 0
                        delta = "n/a (reference loss 0)"
                    else:
                        d = [100 * (r["loss"] / q["loss"] - 1) for r, q in pairs]
                        delta = f"{statistics.mean(d):+.1f}% ({min(d):+.1f}..{max(d):+.1f})"
                steps = HORIZONS[p][h]
                lines.append(
                    f"| {p} | {h} ({steps}) | {name} | {loss:.4g} | {delta} | "
                    f"{rows[0]['bytes_per_param']:.3f} |"
                )
    return "\n".join(lines)


def main(argv):
    del argv
    names = _VARIANTS.value or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    bad = [p for p in _PROBLEMS.value if p not in PROBLEMS]
    if unknown or bad:
        raise ValueError(f"unknown variants {unknown} / problems {bad}")
    lr_override = dict(kv.split("=") for kv in _LR.value.split(",") if kv)
    results = {}
    for p in _PROBLEMS.value:
        for h in _HORIZONS.value:
            steps = HORIZONS[p][h]
            for name in names:
                family = VARIANTS[name][0]
                lr = float(lr_override.get(family, LR[p][family]))
                rows = []
                for seed in range(_SEEDS.value):
                    problem = PROBLEMS[p](seed)
                    rows.append(run(problem, name, steps, seed, lr))
                results[f"{p}/{h}/{name}"] = rows
                losses = " ".join(f"{r['loss']:.4g}" for r in rows)
                print(
                    f"{p}/{h}/{name} (lr {lr:g}): {losses}  "
                    f"[{sum(r['seconds'] for r in rows):.0f} s]",
                    flush=True,
                )
                if _OUT.value:
                    with open(_OUT.value, "w") as f:
                        json.dump(results, f, indent=1)
    print(f"\n{jax.device_count()} {jax.default_backend()} device(s)")
    print(table(results, _PROBLEMS.value, _HORIZONS.value, names))


if __name__ == "__main__":
    app.run(main)
