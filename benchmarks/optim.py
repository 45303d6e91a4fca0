"""Optimizer-state precision: f32 AdamW (optax) vs AdamW with 8-bit moments, one run.

  python benchmarks/optim.py [--config=configs/shakespeare_tiny.py] [--steps=1500]
                             [--state_bits=32,8]

Trains the same model from the same initialization on the same batches once per
``state_bits`` (32 is ``optax.adamw``; 8 is ``jaxquant.optim.adamw(state_bits=8)``) and prints
the validation loss, its change against f32, the optimizer state's bytes per parameter
(``jaxquant.optim.bytes_per_param``: every array of the state, counts and clip state
included) and the median step time after 20 warm-up steps, relative to f32.
"""

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxquant import optim  # noqa: E402
from jaxquant.train import trainer as trainer_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare_tiny.py"),
    "Training config.",
    lock_config=False,
)
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps per variant.")
_BITS = flags.DEFINE_list("state_bits", ["32", "8"], "Optimizer state bits to compare.")
_WARMUP = 20


def run(config, bits: int):
    config.optim.state_bits = bits
    config.train.num_steps = _STEPS.value
    with tempfile.TemporaryDirectory() as workdir:
        t = trainer_lib.Trainer(config, workdir)
        state = t.init_state()
        times = []
        for step in range(_STEPS.value):
            t0 = time.perf_counter()
            state, metrics = t.step(state, next(t.data))
            jax.block_until_ready(metrics)
            if step >= _WARMUP:
                times.append(time.perf_counter() - t0)
        result = t.evaluator().evaluate({"params": state.params}, name=f"state_bits={bits}")
        per_param = optim.bytes_per_param(state.opt_state, state.params)
    return result.loss, per_param, statistics.median(times)


def main(argv):
    del argv
    rows = {int(b): run(_CONFIG.value, int(b)) for b in _BITS.value}
    base_loss, _, base_time = rows.get(32, next(iter(rows.values())))
    print(f"\n{_STEPS.value} steps, {jax.device_count()} {jax.default_backend()} device(s)")
    print("| state | val loss | Δ vs f32 | state bytes/param | step ms | step time vs f32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for bits, (loss, per_param, step) in rows.items():
        print(
            f"| {bits}-bit | {loss:.4f} | {100 * (loss / base_loss - 1):+.2f}% | "
            f"{per_param:.3f} | {1e3 * step:.1f} | {step / base_time:.2f}x |"
        )


if __name__ == "__main__":
    app.run(main)
