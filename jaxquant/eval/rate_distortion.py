"""Rate-distortion of every preset on Gaussian data, against the Shannon bound.

For i.i.d. N(0, 1) samples, no quantizer spending R bits per sample (every overhead counted)
can reach a mean squared error below the distortion-rate function ``D(R) = 2**(-2R)``
(Cover & Thomas, "Elements of Information Theory", Thm. 10.3.2). The gap in bits,
``½·log2(MSE / D(R))``, is how many bits per weight a format wastes against an ideal code at
its own distortion: a vector quantizer's target is a gap near 0, scalar formats sit near 1.

Vector quantizers (``jaxquant.vq``: k-means, E8P, Pyramid VQ, trellis) are measured the same
way, each as a ``VectorQuantizer`` on the sample viewed as a weight [K, N] = [4096, 256] (one
f32 scale per column; codebooks and scales counted in the bits).

Run:
  python -m jaxquant.eval.rate_distortion               # both tables
  python -m jaxquant.eval.rate_distortion --json        # the same rows as JSON
  python -m jaxquant.eval.rate_distortion --calibration=mse --novq
  python -m jaxquant.eval.rate_distortion --shape=1024,256       # a smaller sample
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from jaxquant.numerics import PRESETS, Quantizer, get_quantizer, quantize

# Vector quantizers of the report (``get_quantizer`` names), about 2, 3 and 4 bits per weight.
VQ_METHODS = (
    "kmeans_d1_b2",
    "kmeans_d2_b4",
    "kmeans_d4_b8",
    "kmeans_d1_b3",
    "kmeans_d2_b6",
    "kmeans_d1_b4",
    "kmeans_d2_b8",
    "e8p2",
    "e8p3",
    "e8p4",
    "pvq_n8_k6_b1",
    "pvq_n8_k13_b2",
    "pvq_n8_k24_b4",
    "trellis2_t256",
    "trellis3_t256",
    "trellis4_t256",
)

# [in, out] like a weight matrix; 2**20 samples.
SAMPLE_SHAPE = (4096, 256)


def shannon_mse(bits_per_weight: float) -> float:
    """D(R) = 2**(-2R): the least MSE at rate R for unit-variance Gaussian samples."""
    return 2.0 ** (-2.0 * bits_per_weight)


def gaussian_samples(seed: int = 0, shape: tuple[int, ...] = SAMPLE_SHAPE) -> jnp.ndarray:
    """N(0, 1) samples from numpy's PCG64 (stable across numpy and JAX versions)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def rate_distortion_rows(
    presets: Iterable[Quantizer] | None = None,
    *,
    seed: int = 0,
    calibration: str = "absmax",
    shape: tuple[int, ...] = SAMPLE_SHAPE,
) -> list[dict]:
    """One row per scalar quantizer (default: every preset, with ``calibration``): format,
    bits_per_weight, mse, shannon_mse, gap_bits."""
    presets = PRESETS.values() if presets is None else presets
    quantizers = [dataclasses.replace(p, calibration=calibration) for p in presets]
    return measure_rows(gaussian_samples(seed, shape), quantizers)


def measure_rows(x: jnp.ndarray, quantizers: Iterable[Quantizer | str]) -> list[dict]:
    """One row per quantizer (a ``Quantizer`` or its registry name) on the data ``x``: format,
    bits_per_weight (exact, every overhead counted), mse, shannon_mse, gap_bits.

    The bound and the gap are the Gaussian's ``D(R)`` for unit variance: a lower bound on the
    MSE only for N(0, 1) data (for other data of unit variance the Gaussian is the hardest
    source, so a code can fall below it), a common yardstick otherwise.
    """
    rows = []
    for quantizer in quantizers:
        q = quantize(x, get_quantizer(quantizer) if isinstance(quantizer, str) else quantizer)
        mse = float(jnp.mean(jnp.square(q.dequantize() - x)))
        bound = shannon_mse(q.bits_per_weight)
        rows.append(
            {
                "format": quantizer if isinstance(quantizer, str) else quantizer.name,
                "bits_per_weight": q.bits_per_weight,
                "mse": mse,
                "shannon_mse": bound,
                "gap_bits": 0.5 * math.log2(mse / bound),
            }
        )
    return rows


def vq_rate_distortion_rows(
    methods: Iterable[str] | None = None,
    *,
    seed: int = 0,
    shape: tuple[int, ...] = SAMPLE_SHAPE,
) -> list[dict]:
    """One row per vector quantizer name (default ``VQ_METHODS``), as ``rate_distortion_rows``."""
    return measure_rows(gaussian_samples(seed, shape), VQ_METHODS if methods is None else methods)


def rate_distortion_table(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| format | bits/weight | MSE | Shannon D(R) | gap (bits) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['bits_per_weight']:.4f} | {r['mse']:.4e} | "
            f"{r['shannon_mse']:.4e} | {r['gap_bits']:.3f} |"
        )
    return "\n".join(lines)


def _define_flags():
    """The command line's flags (defined only when run as a program, so importing the module
    defines none)."""
    return (
        flags.DEFINE_bool("json", False, "Print the rows as JSON instead of a table."),
        flags.DEFINE_enum(
            "calibration", "absmax", ["absmax", "mse", "percentile"], "How block ranges are chosen."
        ),
        flags.DEFINE_integer("seed", 0, "Seed of the Gaussian sample."),
        flags.DEFINE_bool("vq", True, "Also measure the vector quantizers (VQ_METHODS)."),
        flags.DEFINE_list(
            "shape", [str(n) for n in SAMPLE_SHAPE], "Shape [in, out] of the Gaussian sample."
        ),
    )


def main(argv, flag_values):
    del argv
    as_json, calibration, seed, with_vq, shape = (f.value for f in flag_values)
    try:
        shape = tuple(int(n) for n in shape)
    except ValueError:
        raise app.UsageError(
            f"--shape={','.join(shape)}: expected integers, e.g. 4096,256."
        ) from None
    if len(shape) != 2 or min(shape) < 1:
        raise app.UsageError(f"--shape={shape}: expected two positive sizes [in, out].")
    logging.set_verbosity(logging.WARNING)  # not jax's INFO line about a missing TPU
    rows = rate_distortion_rows(seed=seed, calibration=calibration, shape=shape)
    vq_rows = vq_rate_distortion_rows(seed=seed, shape=shape) if with_vq else []
    if as_json:
        print(json.dumps(rows + vq_rows, indent=2))
    else:
        n = math.prod(shape)
        print(f"Rate-distortion on {n} i.i.d. N(0,1) samples {shape}, ", end="")
        print(f"calibration={calibration}; D(R) = 2^(-2R), gap = 0.5*log2(MSE/D(R)).\n")
        print(rate_distortion_table(rows))
        if vq_rows:
            print("\nVector quantizers (jaxquant.vq, one f32 scale per column):\n")
            print(rate_distortion_table(vq_rows))


if __name__ == "__main__":
    _FLAGS = _define_flags()
    app.run(lambda argv: main(argv, _FLAGS))
