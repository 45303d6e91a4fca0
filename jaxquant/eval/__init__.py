"""jaxquant.eval: measurement.

``rate_distortion``: the MSE of every preset and vector quantizer on Gaussian data against the
Shannon bound D(R) = 2^(−2R) at its exact rate (``python -m jaxquant.eval.rate_distortion``).
The float-vs-quantized evaluation of trained models is ``jaxquant.train.Evaluator``.
"""

from jaxquant.eval.rate_distortion import (
    VQ_METHODS,
    gaussian_samples,
    rate_distortion_rows,
    rate_distortion_table,
    shannon_mse,
    vq_rate_distortion_rows,
)

__all__ = [
    "VQ_METHODS",
    "gaussian_samples",
    "rate_distortion_rows",
    "rate_distortion_table",
    "shannon_mse",
    "vq_rate_distortion_rows",
]
