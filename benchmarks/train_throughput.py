"""Training throughput: QAT against float, and jaxquant's QAT against qwix 0.1.8.

  python benchmarks/train_throughput.py [--rounds=5] [--steps=10] [--recipes=...]
      [--module=model|block|attention|mlp] [--tiny]

Two measurements in one run:

1. (default) A plain Flax Linen model, QAT through ``jaxquant.nn.intercept`` against qwix's
   ``QtProvider`` on the same model (``pip install -e '.[bench]'`` for qwix; its rows are
   skipped without it).
2. (``--tiny``) shakespeare_tiny's own recipes through the Trainer: float, int8 QAT (W8A8) and
   int4 QAT (W4), tokens/s.

The model is written with ``nn.Dense`` only (no jaxquant or qwix layers): token embedding, 4
pre-norm blocks (RMSNorm; attention with q/k/v/o ``nn.Dense`` projections, 4 heads, causal
softmax; MLP 256 -> 1024 -> 256, GELU), a final RMSNorm and an ``nn.Dense`` head over a vocab of
256; d_model 256; int32 tokens [16, 128]. A train step is next-token cross-entropy, its
gradient and an ``optax.adamw`` update, jitted with the state donated.

Recipes (the same float initial params for all):
  float         the model as written;
  qwix W8A8     ``qwix.quantize_model`` with ``QtProvider([QtRule(weight_qtype=int8,
                act_qtype=int8)])``;
  jaxquant W8A8 the apply inside ``jaxquant.nn.intercept(QuantConfig(mode='qat', rules=(
                QuantRule(..., weight=INT8, act=INT8),)))``, entered inside the jitted function;
  jaxquant float the same intercept with a rule that quantizes nothing: the layers' QAT matmul
                path in float (a 2-D matmul with a hand-written backward, ``matmul_2d``), so
                that jaxquant W8A8 / jaxquant float is the cost of the quantization alone;
  qwix W4       ``QtRule(weight_qtype=int4)`` (weight-only);
  jaxquant W4   ``QuantRule(..., weight=INT4)`` (weight-only).
Both libraries quantize exactly the 24 block projections (q, k, v, o, up, down of 4 blocks);
the head (and the embedding, and the attention score/value products) stay in float in both.
Weights: one absmax scale per output channel in both. Activations: one absmax scale per token
(per row of the [batch, seq] axes) in both.

Timing: after one compile-and-warm-up step per recipe, ``--rounds`` rounds; in each round every
recipe runs ``--steps`` steps in turn (round robin, so machine noise hits all recipes alike).
Reported: the median over rounds of ms/step, and its ratio to float's median.
"""

import functools
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

from jaxquant.nn import QuantConfig, QuantRule, intercept  # noqa: E402
from jaxquant.numerics import INT4, INT8  # noqa: E402

try:
    import qwix  # noqa: E402
except ImportError:  # pragma: no cover - optional comparison
    qwix = None

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Round-robin rounds.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per recipe per round.")
_MODULE = flags.DEFINE_enum(
    "module",
    "model",
    ["model", "block", "attention", "mlp"],
    "What one step times: 'model' = the whole model's AdamW train step; 'block', 'attention' or "
    "'mlp' = the gradient of one such module (w.r.t. its params and input) on [16, 128, 256] "
    "activations, with less noise from the parts both libraries leave in float.",
)
_TINY = flags.DEFINE_bool("tiny", False, "Also time shakespeare_tiny's Trainer recipes.")
_TINY_STEPS = flags.DEFINE_integer("tiny_steps", 60, "Timed Trainer steps per tiny recipe.")
_RECIPES = flags.DEFINE_list(
    "recipes",
    ["float", "jaxquant_float", "qwix_w8a8", "jaxquant_w8a8", "qwix_w4", "jaxquant_w4"],
    "Recipes to time (float is always timed first as the reference).",
)

VOCAB, D_MODEL, HEADS, D_FF, LAYERS = 256, 256, 4, 1024, 4
BATCH, SEQ = 16, 128
# The Dense layers both libraries quantize: every block projection; not the head.
QUANT_PATH = r"blocks_\d+/(attn/(q|k|v|o)|mlp/(up|down))"
NAMES = {
    "float": "float",
    "jaxquant_float": "jaxquant, rule with no formats (float, jaxquant's matmul path)",
    "qwix_w8a8": "qwix W8A8 (int8 w per-channel, int8 act per-token)",
    "jaxquant_w8a8": "jaxquant W8A8 (INT8 w per-channel, INT8 act per-token)",
    "qwix_w4": "qwix W4 (int4 w per-channel, weight-only)",
    "jaxquant_w4": "jaxquant W4 (INT4 w per-channel, weight-only)",
}


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        dh = d // HEADS

        def proj(name):
            return nn.Dense(d, use_bias=False, name=name)(x).reshape(b, t, HEADS, dh)

        q, k, v = proj("q"), proj("k"), proj("v")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh).astype(np.float32)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        p = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, d)
        return nn.Dense(d, use_bias=False, name="o")(o)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(D_FF, name="up")(x))
        return nn.Dense(D_MODEL, name="down")(h)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + Attention(name="attn")(nn.RMSNorm(name="norm_attn")(x))
        return x + Mlp(name="mlp")(nn.RMSNorm(name="norm_mlp")(x))


class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D_MODEL, name="embed")(tokens)
        for i in range(LAYERS):
            x = Block(name=f"blocks_{i}")(x)
        return nn.Dense(VOCAB, name="head")(nn.RMSNorm(name="norm_out")(x))


# --module -> (the module, the regex of its quantized Dense layers in both libraries).
MODULES = {
    "model": (Model, QUANT_PATH),
    "block": (Block, r"(attn/(q|k|v|o)|mlp/(up|down))"),
    "attention": (Attention, r"(q|k|v|o)"),
    "mlp": (Mlp, r"(up|down)"),
}


def jaxquant_config(weight, act, path: str = QUANT_PATH) -> QuantConfig:
    # roles: a lone module's last Dense ('mlp/down', 'attention/o') returns the module's output,
    # which intercept takes for a head; qwix quantizes it, so the path names it here too.
    rule = QuantRule(path, weight=weight, act=act, roles=("linear", "head"))
    return QuantConfig(mode="qat", rules=(rule,))


def make_apply(recipe: str, module: str = "model"):
    """``apply(params, inputs) -> outputs`` for a recipe, or None when qwix is missing."""
    module_cls, path = MODULES[module]
    model = module_cls()
    if recipe == "float":
        return model.apply
    if recipe.startswith("qwix"):
        if qwix is None:
            return None
        act = jnp.int8 if recipe == "qwix_w8a8" else None
        weight = jnp.int8 if recipe == "qwix_w8a8" else jnp.int4
        rule = qwix.QtRule(module_path=path, weight_qtype=weight, act_qtype=act)
        return qwix.quantize_model(model, qwix.QtProvider([rule])).apply
    config = {
        "jaxquant_float": jaxquant_config(None, None, path),
        "jaxquant_w8a8": jaxquant_config(INT8, INT8, path),
        "jaxquant_w4": jaxquant_config(INT4, None, path),
    }[recipe]

    def apply(params, tokens):
        with intercept(config):  # inside the traced function
            return model.apply(params, tokens)

    return apply


def make_step(apply, optimizer):
    def loss_fn(params, tokens):
        logits = apply({"params": params}, tokens)
        targets = jnp.roll(tokens, -1, axis=1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, tokens):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def make_module_step(apply):
    """The jitted gradient of ``sum(module(x)²)`` w.r.t. the module's params and its input."""

    def loss_fn(params, x):
        return jnp.sum(apply({"params": params}, x) ** 2)

    grad = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))

    def step(state, x):
        params, _ = state
        grads = grad(params, x)
        return state, grads[1][0, 0, 0]

    return step


def init_params():
    tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
    return Model().init(jax.random.key(0), tokens)["params"]


def batch(seed: int = 1):
    return jax.random.randint(jax.random.key(seed), (BATCH, SEQ), 0, VOCAB, jnp.int32)


def main(argv):
    del argv
    print(f"devices: {jax.devices()}  jax {jax.__version__}")
    recipes = ["float"] + [r for r in _RECIPES.value if r != "float"]
    if qwix is None:
        print("qwix not installed: skipping its rows (pip install qwix==0.1.8)")
    else:
        print(f"qwix {qwix.__version__}")
    optimizer = optax.adamw(1e-3)
    module = _MODULE.value
    if module == "model":
        params, tokens = init_params(), batch()
    else:
        tokens = jax.random.normal(jax.random.key(1), (BATCH, SEQ, D_MODEL), jnp.float32)
        params = MODULES[module][0]().init(jax.random.key(0), tokens)["params"]
    runs = {}
    for r in recipes:
        apply = make_apply(r, module)
        if apply is None:
            continue
        p = jax.tree.map(jnp.copy, params)
        if module == "model":
            state, step = (p, optimizer.init(p)), make_step(apply, optimizer)
        else:
            state, step = (p, None), make_module_step(apply)
        t0 = time.perf_counter()
        state, loss = step(state, tokens)
        jax.block_until_ready(loss)
        label = "loss" if module == "model" else "dx[0, 0, 0]"
        seconds = time.perf_counter() - t0
        print(f"{r}: compile + first step {seconds:.1f} s, {label} {float(loss):.4f}")
        runs[r] = [step, state, []]
    for _ in range(_ROUNDS.value):
        for run in runs.values():
            step, state, times = run
            t0 = time.perf_counter()
            for _ in range(_STEPS.value):
                state, loss = step(state, tokens)
            jax.block_until_ready((state, loss))
            times.append(1e3 * (time.perf_counter() - t0) / _STEPS.value)
            run[1] = state
    base = statistics.median(runs["float"][2])
    print(f"\n{module}: {_ROUNDS.value} rounds x {_STEPS.value} steps, median ms/step")
    print("| recipe | ms/step | min..max | vs float |")
    print("|---|---:|---:|---:|")
    for r, (_, _, times) in runs.items():
        m = statistics.median(times)
        print(f"| {NAMES[r]} | {m:.1f} | {min(times):.0f}..{max(times):.0f} | {m / base:.2f}x |")
    if _TINY.value:
        tiny()


def _tiny_tokens_per_second(arg: str) -> float:
    import tempfile

    from configs import shakespeare_tiny
    from jaxquant.train import Trainer

    config = shakespeare_tiny.get_config(arg)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
        state = trainer.init_state()
        for _ in range(10):  # compile and warm up
            state, metrics = trainer.step(state, next(trainer.data))
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(_TINY_STEPS.value):
            state, metrics = trainer.step(state, next(trainer.data))
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
    return _TINY_STEPS.value * config.train.batch_size * config.train.seq_len / seconds


def tiny():
    rows = [
        (name, _tiny_tokens_per_second(arg))
        for name, arg in [
            ("float", ""),
            ("int8 QAT (W8A8)", "qat_int8"),
            ("int4 QAT (W4)", "qat_int4"),
        ]
    ]
    print("\nshakespeare_tiny, Trainer steps")
    print("| recipe | tokens/s | time vs float |")
    print("|---|---:|---:|")
    for name, tps in rows:
        print(f"| {name} | {tps:,.0f} | {rows[0][1] / tps:.2f}x |")


if __name__ == "__main__":
    app.run(main)
