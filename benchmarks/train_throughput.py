"""Training throughput of float, int8 QAT and int4 QAT on shakespeare_tiny, in one run.

  python benchmarks/train_throughput.py [--steps=60] [--warmup=10]

Times ``--steps`` jitted train steps of each recipe (after ``--warmup`` steps that compile and
warm up), in one process on the same data, and prints tokens/s and the QAT overhead as a ratio
to float. Results are recorded in BENCHMARKS.md with the machine they ran on.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import shakespeare_tiny  # noqa: E402
from jaxquant.train import Trainer  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per recipe.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed steps per recipe (compilation).")


def _time(arg: str) -> float:
    config = shakespeare_tiny.get_config(arg)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
        state = trainer.init_state()
        for _ in range(_WARMUP.value):
            state, metrics = trainer.step(state, next(trainer.data))
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(_STEPS.value):
            state, metrics = trainer.step(state, next(trainer.data))
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
    return _STEPS.value * config.train.batch_size * config.train.seq_len / seconds


def main(argv):
    del argv
    print(f"devices: {jax.devices()}")
    rows = [
        (name, _time(arg))
        for name, arg in [
            ("float", ""),
            ("int8 QAT (W8A8)", "qat_int8"),
            ("int4 QAT (W4)", "qat_int4"),
        ]
    ]
    print("| recipe | tokens/s | time vs float |")
    print("|---|---:|---:|")
    for name, tps in rows:
        print(f"| {name} | {tps:,.0f} | {rows[0][1] / tps:.2f}x |")


if __name__ == "__main__":
    app.run(main)
