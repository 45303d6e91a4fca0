"""A user's CNN on the bundled digits: round to nearest against GPTQ, over several seeds.

  python benchmarks/cnn_ptq.py --seeds=6 --formats=int4,int3,int2,int3_g32,int2_g32

The README's CNN (two plain ``nn.Conv``, two ``nn.Dense``; the head kept in float by role, the
first conv at int8), trained in float for ``--steps`` Adam steps from each seed, then quantized
weights-only by ``freeze`` (round to nearest) and by ``quantize_model`` (GPTQ, calibrated on
the first 1,024 training images). Accuracy on the 360 test digits, per seed and averaged: one
seed's table (the README's) cannot tell a real gap from a few digits that flip.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.data import load_digits  # noqa: E402

_SEEDS = flags.DEFINE_integer("seeds", 6, "Seeds (init and batch order) to train from.")
_STEPS = flags.DEFINE_integer("steps", 200, "Float training steps per seed.")
_FORMATS = flags.DEFINE_list(
    "formats", ["int4", "int3", "int2", "int3_g32", "int2_g32"], "Weight quantizer names."
)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def main(argv):
    del argv
    warnings.simplefilter("ignore")  # dead ReLU inputs: kept, rounded to nearest, warned each time
    x_train, y_train = map(jnp.asarray, load_digits("train"))
    x_test, y_test = map(jnp.asarray, load_digits("test"))
    cnn, tx = CNN(), optax.adam(3e-3)

    def accuracy(config, variables):
        logits = jq.apply_with_config(cnn, config, variables, x_test)
        return float((logits.argmax(-1) == y_test).mean())

    @jax.jit
    def step(params, opt, key):
        idx = jax.random.choice(key, len(y_train), (128,))

        def loss(p):
            logits = cnn.apply({"params": p}, x_train[idx])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean()

        updates, opt = tx.update(jax.grad(loss)(params), opt)
        return optax.apply_updates(params, updates), opt

    rows = {name: [] for name in ["float"] + _FORMATS.value}
    for seed in range(_SEEDS.value):
        params = cnn.init(jax.random.key(seed), x_train[:1])["params"]
        opt = tx.init(params)
        for i in range(_STEPS.value):
            params, opt = step(params, opt, jax.random.key(1000 * seed + i))
        rows["float"].append((accuracy(jq.QuantConfig(), {"params": params}),) * 2)
        for name in _FORMATS.value:
            rules = (jq.QuantRule("Conv_0", weight=jq.INT8), jq.QuantRule(".*", weight=name))
            serve = jq.QuantConfig(mode="serve", rules=rules)
            rtn, _ = jq.freeze(cnn, params, x_train[:1], rules=rules)
            gptq, _ = jq.quantize_model(cnn, params, [x_train[:512], x_train[512:1024]], rules)
            rows[name].append(
                tuple(
                    accuracy(serve, {"params": jq.serving_params(params, q), "quant": q})
                    for q in (rtn, gptq)
                )
            )
        print(
            f"seed {seed}: "
            + ", ".join(f"{k} {v[-1][0]:.3f}/{v[-1][1]:.3f}" for k, v in rows.items())
        )
    print(f"\nmean over {_SEEDS.value} seeds (test accuracy, 360 digits)")
    print("| weights | RTN | GPTQ | GPTQ - RTN, per seed (digits) |\n| --- | --- | --- | --- |")
    for name, accs in rows.items():
        a = np.asarray(accs)
        diff = " ".join(f"{d:+d}" for d in np.rint((a[:, 1] - a[:, 0]) * 360).astype(int))
        gptq = "" if name == "float" else f"{a[:, 1].mean():.3f}"
        print(f"| {name} | {a[:, 0].mean():.3f} | {gptq} | {'' if name == 'float' else diff} |")


if __name__ == "__main__":
    app.run(main)
