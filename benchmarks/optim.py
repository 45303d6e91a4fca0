"""Optimizer-state precision on one config: f32 AdamW (optax) vs 8-bit, 4-bit, 4-bit
factorized and FP8 AdamW states, and Shampoo f32 vs 4-bit, in one run.

  python benchmarks/optim.py [--config=configs/shakespeare_tiny.py] [--steps=1500]
      [--variants=f32,8bit,fp8,4bit,4bit_factorized,shampoo_f32,shampoo_4bit]
      [--timing_steps=30]

Trains the same model from the same initialization on the same batches once per variant
(``VARIANTS``: config overrides; ``f32`` is ``optax.adamw`` itself) and prints the validation
loss, its change against ``f32``, the optimizer state's bytes per parameter
(``jaxquant.optim.bytes_per_param``: every array of the state, counts and clip state
included) and the step time relative to ``f32``. Step times are taken after training, in a
separate phase that runs ``timing_steps`` steps of every variant round-robin in blocks of 10
(after a compiled warm-up), so that a change in the machine's load hits all variants alike;
each variant's time is the median of its blocks' per-step times.

Every state format on three problems (regression, classification, a small LM), two horizons
and three seeds, through schedules that converge: ``benchmarks/optim_fits.py``. Which stored
moment costs what: ``benchmarks/optim_ablation.py``.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from timing import round_robin_step_times  # noqa: E402

from jaxquant import optim  # noqa: E402
from jaxquant.train import trainer as trainer_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare_tiny.py"),
    "Training config.",
    lock_config=False,
)
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps per variant.")
_VARIANTS = flags.DEFINE_list(
    "variants",
    ["f32", "8bit", "fp8", "4bit", "4bit_factorized", "shampoo_f32", "shampoo_4bit"],
    "Variants to compare (the first is the reference).",
)
_TIMING = flags.DEFINE_integer("timing_steps", 30, "Timed steps per variant (blocks of 10).")

VARIANTS = {
    "f32": {},
    "8bit": {"state_bits": 8},
    "8bit_stochastic": {"state_bits": 8, "state_rounding": "stochastic"},
    "fp8": {"state_bits": 8, "state_format": "e4m3"},
    "4bit": {"state_bits": 4},
    "4bit_stochastic": {"state_bits": 4, "state_rounding": "stochastic"},
    "4bit_nearest": {"state_bits": 4, "state_rounding": "nearest"},
    "4bit_paper": {"state_bits": 4, "state_format": "rank1_dynamic"},
    "4bit_factorized": {"state_bits": 4, "state_format": "factorized"},
    "shampoo_f32": {"name": "shampoo", "state_bits": 32},
    "shampoo_4bit": {"name": "shampoo", "state_bits": 4},
    "shampoo_4bit_m8": {"name": "shampoo", "state_bits": 4, "shampoo_moment_bits": 8},
}


def _trainer(base, name, steps, workdir):
    config = base.copy_and_resolve_references()
    config.unlock()
    for field, value in VARIANTS[name].items():
        setattr(config.optim, field, value)
    config.train.num_steps = steps
    return trainer_lib.Trainer(config, workdir)


def train(base, name):
    with tempfile.TemporaryDirectory() as workdir:
        t = _trainer(base, name, _STEPS.value, workdir)
        state = t.init_state()
        for _ in range(_STEPS.value):
            state, _ = t.step(state, next(t.data))
        jax.block_until_ready(state)
        result = t.evaluator().evaluate({"params": state.params}, name=name)
        per_param = optim.bytes_per_param(state.opt_state, state.params)
    print(f"{name}: val loss {result.loss:.4f}, {per_param:.3f} bytes/param", flush=True)
    return result.loss, per_param


def step_times(base, names):
    with tempfile.TemporaryDirectory() as workdir:
        trainers = {n: _trainer(base, n, _STEPS.value, os.path.join(workdir, n)) for n in names}
        return round_robin_step_times(trainers, _TIMING.value)


def main(argv):
    del argv
    unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}.")
    names = _VARIANTS.value
    rows = {name: train(_CONFIG.value, name) for name in names}
    times = step_times(_CONFIG.value, names)
    ref = names[0]
    base_loss, base_time = rows[ref][0], times[ref]
    print(f"\n{_STEPS.value} steps, {jax.device_count()} {jax.default_backend()} device(s)")
    print(f"| variant | val loss | Δ vs {ref} | state bytes/param | step ms | step time vs {ref} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        loss, per_param = rows[name]
        print(
            f"| {name} | {loss:.4f} | {100 * (loss / base_loss - 1):+.2f}% | {per_param:.3f} | "
            f"{1e3 * times[name]:.1f} | {times[name] / base_time:.2f}x |"
        )


if __name__ == "__main__":
    app.run(main)
