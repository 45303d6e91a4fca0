"""Encoding speed of every VQ method: ``quantize`` of a [4096, 256] Gaussian weight.

  python benchmarks/vq_encode.py [--methods=e8p2,trellis2_t256]

Times the second call (the first compiles), on whatever machine runs it, and prints weights
per second for each recipe of ``jaxquant.eval.rate_distortion.VQ_METHODS``. k-means includes
fitting its codebook (seeding and Lloyd to convergence); the others encode only.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from jaxquant.eval import rate_distortion as rd  # noqa: E402
from jaxquant.numerics import get_quantizer, quantize  # noqa: E402

_METHODS = flags.DEFINE_list("methods", None, "Vector quantizer names (default: rd.VQ_METHODS).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    x = rd.gaussian_samples(0)
    print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; weight {tuple(x.shape)}")
    print("| method | seconds | weights/s |\n|---|---:|---:|")
    for name in _METHODS.value or rd.VQ_METHODS:
        recipe = get_quantizer(name)
        jax.block_until_ready(quantize(x, recipe).codes)
        t0 = time.perf_counter()
        jax.block_until_ready(quantize(x, recipe).codes)
        dt = time.perf_counter() - t0
        print(f"| {name} | {dt:.2f} | {x.size / dt:,.0f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
