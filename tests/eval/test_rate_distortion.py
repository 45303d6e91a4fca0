"""The rate-distortion report: its numbers follow from quantize, and the CLI prints them."""

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.numerics as jn
from jaxquant.eval import rate_distortion as rd


def test_rows_recompute_from_quantize_and_the_shannon_bound():
    shape = (256, 64)
    rows = rd.rate_distortion_rows([jn.INT4_G128, jn.NVFP4], shape=shape)
    x = rd.gaussian_samples(0, shape)
    for row, preset in zip(rows, [jn.INT4_G128, jn.NVFP4], strict=True):
        assert set(row) == {"format", "bits_per_weight", "mse", "shannon_mse", "gap_bits"}
        q = jn.quantize(x, preset)
        assert row["format"] == preset.name
        assert row["bits_per_weight"] == q.bits_per_weight
        assert row["mse"] == pytest.approx(float(jnp.mean((q.dequantize() - x) ** 2)), rel=1e-6)
        assert row["shannon_mse"] == pytest.approx(2 ** (-2 * q.bits_per_weight))
        assert row["gap_bits"] == pytest.approx(0.5 * math.log2(row["mse"] / row["shannon_mse"]))


def test_measure_rows_takes_any_data_and_quantizers_or_their_names():
    # a skewed, non-Gaussian matrix with an awkward column count; a name and a Quantizer
    x = jnp.asarray(np.random.default_rng(3).exponential(size=(96, 7)), jnp.float32)
    rows = rd.measure_rows(x, ["int4_g32", jn.INT8])
    assert [r["format"] for r in rows] == ["int4_g32", jn.INT8.name]
    for row, quantizer in zip(rows, [jn.get_quantizer("int4_g32"), jn.INT8], strict=True):
        q = jn.quantize(x, quantizer)
        mse = float(np.mean((np.asarray(q.dequantize(), np.float64) - np.asarray(x)) ** 2))
        assert row["bits_per_weight"] == q.bits_per_weight
        assert row["mse"] == pytest.approx(mse, rel=1e-5)
        assert row["gap_bits"] == pytest.approx(
            0.5 * math.log2(mse / 2 ** (-2 * q.bits_per_weight)), rel=1e-5
        )


def test_no_scalar_format_beats_the_shannon_bound():
    for row in rd.rate_distortion_rows(shape=(256, 64)):
        assert row["mse"] > row["shannon_mse"], row  # a quantizer below D(R) would be a bug
        assert 0.5 < row["gap_bits"] < 5, row


def test_cli_prints_json_for_every_preset():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxquant.eval.rate_distortion",
            "--json",
            "--novq",
            "--shape=256,64",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    rows = json.loads(out)
    assert [r["format"] for r in rows] == list(jn.PRESETS)
    by_name = {r["format"]: r for r in rows}
    assert by_name["mxfp4"]["bits_per_weight"] == 4.25
    assert by_name["nvfp4"]["mse"] < by_name["mxfp4"]["mse"]
