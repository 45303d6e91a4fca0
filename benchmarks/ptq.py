"""PTQ on a trained checkpoint: GPTQ vs RTN at 4, 3 and 2 bits, MXFP4 and NF4.

  python train.py --config=configs/shakespeare_small.py --workdir=/tmp/small   # ~30 min
  python benchmarks/ptq.py --workdir=/tmp/small [--formats=int4_g64,mxfp4,...]

Runs ``train.py --mode=ptq``'s ``quantize_checkpoint`` on the latest checkpoint of
``workdir`` (config ``configs/shakespeare_small.py`` unless ``--config``), then checks the PTQ
issue's targets and prints them:

  * at 3 bits and below, GPTQ's validation-loss increase over float is at most half of RTN's;
  * on every layer, GPTQ's relative output error (on the calibration activations of the
    quantized model) is at most RTN's.

The int formats default to groups of 64 (``int4_g64``): shakespeare_small's embed width, 192,
is not a multiple of 128.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxquant.train import ptq  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare_small.py"),
    "The config the checkpoint was trained with.",
    lock_config=False,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained run.", required=True)
_FORMATS = flags.DEFINE_list(
    "formats",
    ["int4_g64", "int3_g64", "int2_g64", "mxfp4", "nf4"],
    "Quantizers to compare (``jaxquant.get_quantizer`` names).",
)
_BATCHES = flags.DEFINE_integer("calibration_batches", 8, "Calibration batches.")
_ORDER = flags.DEFINE_enum("order", "", ["", "act", "babai"], "GPTQ's row order.")


def main(argv):
    del argv
    config = _CONFIG.value
    config.ptq.method = "hessian"
    config.ptq.num_calibration_batches = _BATCHES.value
    config.ptq.order = _ORDER.value
    config.ptq.format, config.ptq.group_size = ",".join(_FORMATS.value), 0
    res, reports = ptq.quantize_checkpoint(config, _WORKDIR.value)
    results = {r.name: r for r in res}
    base = results["float"].loss
    print("\n| format | bits/weight | RTN Δ loss | GPTQ Δ loss | GPTQ/RTN | layers GPTQ ≤ RTN |")
    print("|---|---:|---:|---:|---:|---:|")
    failures = []
    for fmt in _FORMATS.value:
        d_rtn = results[f"rtn_{fmt}"].loss - base
        d_gptq = results[f"gptq_{fmt}"].loss - base
        layers = reports[f"gptq_{fmt}"].weights
        ok_layers = sum(r.error <= r.rtn_error for r in layers)
        print(
            f"| {fmt} | {results[f'gptq_{fmt}'].bits_per_weight:.3f} | {d_rtn:+.4f} | "
            f"{d_gptq:+.4f} | {d_gptq / d_rtn:.3f} | {ok_layers}/{len(layers)} |"
        )
        bits = ptq.ptq_rules(fmt)[0].weight.format.bits
        if bits <= 3 and d_gptq > 0.5 * d_rtn:
            failures.append(f"{fmt}: GPTQ Δ {d_gptq:.4f} > half of RTN's {d_rtn:.4f}")
        if ok_layers < len(layers):
            failures.append(f"{fmt}: GPTQ error above RTN's on {len(layers) - ok_layers} layers")
    print("targets:", "met" if not failures else "MISSED: " + "; ".join(failures))


if __name__ == "__main__":
    app.run(main)
