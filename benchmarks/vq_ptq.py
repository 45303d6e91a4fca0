"""PTQ on a trained checkpoint: Hessian-aware VQ against scalar GPTQ at 2 and 3 bits per weight.

  python train.py --config=configs/shakespeare_small.py --workdir=/tmp/small   # ~30 min
  python benchmarks/vq_ptq.py --workdir=/tmp/small \\
      --pairs=int2_g64:e8p2_rht,int3_g64:e8p3_rht

Each pair ``scalar:vq`` quantizes every linear kernel of the latest checkpoint twice,
layer-sequentially on the same calibration batches: the scalar preset by GPTQ (act-order,
static groups, the stronger of GPTQ's orders on this model, BENCHMARKS.md) and the vector
quantizer (``jaxquant.get_quantizer`` names) by Hessian-aware VQ (``quantize_model``: each
quantizer picks its Hessian-aware method). Both are
evaluated on the whole validation split. The target: the vector quantizer's loss increase over float
is at most half of scalar GPTQ's, at no more bits per weight (the quantized layers' bits,
every scale, codebook and sign counted).
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxquant.nn import QuantRule  # noqa: E402
from jaxquant.numerics import get_quantizer  # noqa: E402
from jaxquant.ptq import quantize_model  # noqa: E402
from jaxquant.train import ptq  # noqa: E402
from jaxquant.train.trainer import Trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare_small.py"),
    "The config the checkpoint was trained with.",
    lock_config=False,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained run.", required=True)
_PAIRS = flags.DEFINE_list(
    "pairs", ["int2_g64:e8p2_rht", "int3_g64:e8p3_rht"], "scalar:vq pairs to compare."
)
_BATCHES = flags.DEFINE_integer("calibration_batches", 8, "Calibration batches.")


def _layer_bits(report) -> float:
    return 8 * report.quant_bytes / report.quant_params


def main(argv):
    del argv
    config = _CONFIG.value
    trainer = Trainer(config, _WORKDIR.value)
    with trainer.checkpoint_manager() as manager:
        if manager.latest_step() is None:
            raise ValueError(f"no checkpoint in {_WORKDIR.value}; train first.")
        state = trainer.restore_or_init(manager)
    params = jax.device_get(nn.unbox(state.params))
    model = trainer.float_model
    batches = ptq.calibration_batches(trainer, _BATCHES.value)
    evaluator = trainer.evaluator()
    base = evaluator.evaluate({"params": params}, name="float").loss
    print(f"float val loss {base:.4f}")
    rows, failures = [], []
    for pair in _PAIRS.value:
        scalar, vq_name = pair.split(":")
        out = {}
        for name, rules, method, order in (
            (scalar, ptq.ptq_rules(scalar), "gptq", "act"),
            (vq_name, (QuantRule(".*", weight=get_quantizer(vq_name)),), "havq", None),
        ):
            t0 = time.perf_counter()
            quant, report = quantize_model(model, params, batches, rules, order=order)
            seconds = time.perf_counter() - t0
            res = evaluator.evaluate_quantized(params, quant, rules, report, name=name)
            err = float(np.mean([r.error for r in report.weights]))
            out[name] = (res.loss - base, _layer_bits(report), report.bits_per_weight, err)
            rows.append(
                f"| {name} | {'GPTQ (act-order)' if method == 'gptq' else 'HAVQ'} | "
                f"{out[name][1]:.3f} | {out[name][2]:.3f} | {res.loss:.4f} | "
                f"{out[name][0]:+.4f} | {err:.4f} | {seconds:.0f} |"
            )
            print(rows[-1], flush=True)
        d_s, bits_s = out[scalar][0], out[scalar][1]
        d_v, bits_v = out[vq_name][0], out[vq_name][1]
        if d_v > 0.5 * d_s or bits_v > bits_s:
            failures.append(f"{vq_name}: Δ {d_v:+.4f} ({bits_v:.3f} b/w) vs {scalar} {d_s:+.4f}")
    print(
        "\n| format | method | layer bits/weight | model bits/weight | val loss | Δ loss | "
        "mean layer error | seconds |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("targets:", "met" if not failures else "MISSED: " + "; ".join(failures))


if __name__ == "__main__":
    app.run(main)
