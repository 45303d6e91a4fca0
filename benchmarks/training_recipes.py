"""Fully quantized training recipes (jaxquant.numerics.training) against float and QAT.

  python benchmarks/training_recipes.py --part=mse
  python benchmarks/training_recipes.py --part=train [--config=configs/shakespeare_tiny.py]
      [--steps=1000] [--variants=float,qat_int8,qat_int4,fp8,fp8_delayed,mxfp4_quartet,nvfp4]
      [--results=/tmp/training_recipes.jsonl]
  python benchmarks/training_recipes.py --part=cosine
  python benchmarks/training_recipes.py --part=time [--timing_steps=30]

Parts:
  mse:    Quartet's Table 2: the MSE of the MXFP4 forward quantizers on Gaussian blocks of 32
          (stochastic / nearest rounding of ¾ of the value on the E8M0 absmax scale, QuEST
          with its scale rounded to the nearest power of two, and as the paper code's kernel
          floors it), averaged over log2(sigma) uniform in [0, 1) (E8M0 scales make the error
          periodic in it), against the paper's numbers.
  train:  the same model from the same initialization on the same batches, once per variant
          (``VARIANTS``: config overrides), to ``--steps``; the validation loss of the trained
          weights in float and, for a recipe, with its own quantized forward pass (what the
          model computes as trained). One JSON line per finished variant in ``--results``: a
          rerun skips them.
  cosine: on one training batch of the float run's trained weights (``--results``' float
          checkpoint directory, else the initialization), the cosine similarity of each
          linear layer's weight gradient under each recipe with the float gradient.
  time:   step time relative to float, each variant in round-robin blocks of 10 steps after a
          warm-up (median of its blocks), so that load on the machine hits all alike. On CPU
          the recipes are emulated: this measures the emulation's overhead, not a speed-up.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import traverse_util  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from timing import round_robin_step_times  # noqa: E402

from jaxquant.numerics import training as T  # noqa: E402
from jaxquant.train import trainer as trainer_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare_tiny.py"),
    "Training config.",
    lock_config=False,
)
_PART = flags.DEFINE_enum("part", "train", ["mse", "train", "cosine", "time"], "What to run.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps per variant.")
_VARIANTS = flags.DEFINE_list(
    "variants",
    ["float", "qat_int8", "qat_int4", "fp8", "fp8_delayed", "mxfp4_quartet", "nvfp4"],
    "Variants (the first is the reference).",
)
_RESULTS = flags.DEFINE_string(
    "results", "/tmp/jaxquant_training_recipes/results.jsonl", "JSON lines, one per variant."
)
_TIMING = flags.DEFINE_integer("timing_steps", 30, "Timed steps per variant (blocks of 10).")

VARIANTS = {
    "float": {},
    "qat_int8": {"qat": "int8"},
    "qat_int4": {"qat": "int4"},
    **{name: {"train": name} for name in T.TRAINING_RECIPES},
}
# Quartet, Table 2 (arXiv 2505.14669): MSE of MXFP4 quantizers on Gaussian data.
PAPER_MSE = {"sr_absmax": 2.77e-2, "rtn_absmax": 1.37e-2, "quest": 1.32e-2}


def part_mse():
    base = T.QUARTET_TRAIN.grad_input.lhs
    quest = T.QUARTET_TRAIN.forward.lhs
    rows = {
        "sr_absmax": dataclasses.replace(base, rounding="stochastic"),
        "rtn_absmax": base,
        "quest": quest,
        "quest_floor (paper kernel)": dataclasses.replace(quest, quest_scale="floor"),
    }
    print("| quantizer | Gaussian MSE | paper | ratio |")
    print("|---|---:|---:|---:|")
    for name, op in rows.items():
        mse = T.gaussian_mse(op)
        paper = PAPER_MSE.get(name.split(" ")[0] if "floor" not in name else "quest")
        print(f"| {name} | {mse:.3e} | {paper:.2e} | {mse / paper:.3f} |", flush=True)


def _trainer(base, name, steps, workdir):
    config = base.copy_and_resolve_references()
    config.unlock()
    for field, value in VARIANTS[name].items():
        setattr(config.quant, field, value)
    config.train.num_steps = steps
    config.train.log_every = max(1, steps // 10)
    config.train.checkpoint_every = steps
    config.eval.variants = ""
    return trainer_lib.Trainer(config, workdir)


def _done(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["variant"]: r for r in map(json.loads, f) if r["steps"] == _STEPS.value}


def part_train():
    path = _RESULTS.value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    done = _done(path)
    for name in _VARIANTS.value:
        if name in done:
            print(f"{name}: done ({path})")
            continue
        workdir = os.path.join(os.path.dirname(path), f"{name}_{_STEPS.value}")
        t = _trainer(_CONFIG.value, name, _STEPS.value, workdir)
        t0 = time.time()
        state, losses = t.train()
        results = t.evaluate(state.params, state.overwrite)
        row = {
            "variant": name,
            "steps": _STEPS.value,
            "train_loss_last50": float(np.mean(losses[-50:])) if losses else None,
            "val_float": results[0].loss,
            "val_forward": results[1].loss if len(results) > 1 else results[0].loss,
            "workdir": workdir,
            "seconds": time.time() - t0,
        }
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    done = _done(path)
    ref = done.get(_VARIANTS.value[0])
    print(f"\n{_STEPS.value} steps, {jax.device_count()} {jax.default_backend()} device(s)")
    print("| variant | val loss, float weights | Δ | val loss, own forward | Δ |")
    print("|---|---:|---:|---:|---:|")
    for name in _VARIANTS.value:
        r = done.get(name)
        if r is None or ref is None:
            continue
        d1 = 100 * (r["val_float"] / ref["val_float"] - 1)
        d2 = 100 * (r["val_forward"] / ref["val_forward"] - 1)
        print(
            f"| {name} | {r['val_float']:.4f} | {d1:+.2f}% | {r['val_forward']:.4f} | {d2:+.2f}% |"
        )


def _float_params(t):
    done = _done(_RESULTS.value)
    ref = done.get("float")
    if ref is None:
        print("(no trained float run in --results: gradients at initialization)")
        return t.init_state().params
    ft = _trainer(_CONFIG.value, "float", _STEPS.value, ref["workdir"])
    with ft.checkpoint_manager() as manager:
        return ft.restore_or_init(manager).params


def part_cosine():
    names = [n for n in _VARIANTS.value if n in T.TRAINING_RECIPES]
    float_t = _trainer(_CONFIG.value, "float", 1, "/tmp/jaxquant_cosine_float")
    params = _float_params(float_t)
    batch = float_t.global_batch(next(float_t.data))

    def grads(t, overwrite):
        def loss(p):
            variables = {"params": p}
            if overwrite:
                variables[T.OVERWRITE_COLLECTION] = overwrite
            logits = t.model.apply(
                variables, batch["inputs"], rngs={T.RNG_STREAM: jax.random.key(0)}
            )
            return trainer_lib.evaluator_lib.cross_entropy(
                logits, batch["targets"], jnp.ones(batch["targets"].shape)
            )[0]

        return jax.jit(jax.grad(loss))(params)

    ref = traverse_util.flatten_dict(grads(float_t, {}), sep="/")
    table = {}
    for name in names:
        t = _trainer(_CONFIG.value, name, 1, f"/tmp/jaxquant_cosine_{name}")
        overwrite = t.init_state().overwrite
        if overwrite:  # delayed scaling: histories from one forward/backward first
            overwrite = jax.jit(
                jax.grad(
                    lambda o, t=t: jnp.sum(
                        t.model.apply(
                            {"params": params, T.OVERWRITE_COLLECTION: o}, batch["inputs"]
                        )
                    )
                )
            )(overwrite)
        g = traverse_util.flatten_dict(grads(t, overwrite), sep="/")
        table[name] = {
            k: float(jnp.vdot(g[k], ref[k]) / (jnp.linalg.norm(g[k]) * jnp.linalg.norm(ref[k])))
            for k in ref
            if k.endswith("kernel") and "embed" not in k and "head" not in k
        }
    layers = list(next(iter(table.values())))
    print("| layer | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for k in layers:
        print(
            f"| {k.removesuffix('/kernel')} | "
            + " | ".join(f"{table[n][k]:.4f}" for n in names)
            + " |"
        )
    print("| mean | " + " | ".join(f"{np.mean(list(table[n].values())):.4f}" for n in names) + " |")


def part_time():
    names = _VARIANTS.value
    trainers = {n: _trainer(_CONFIG.value, n, 10**6, f"/tmp/jaxquant_time_{n}") for n in names}
    times = round_robin_step_times(trainers, _TIMING.value)
    ref = names[0]
    print(f"{jax.device_count()} {jax.default_backend()} device(s), {jax.devices()[0].device_kind}")
    print(f"| variant | step ms | vs {ref} |")
    print("|---|---:|---:|")
    for name in names:
        print(f"| {name} | {1e3 * times[name]:.0f} | {times[name] / times[ref]:.2f}x |")


def main(argv):
    del argv
    unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}.")
    {"mse": part_mse, "train": part_train, "cosine": part_cosine, "time": part_time}[_PART.value]()


if __name__ == "__main__":
    app.run(main)
