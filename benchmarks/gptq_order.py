"""GPTQ row orders compared: identity, act-order, and the Babai-bound order.

  python benchmarks/gptq_order.py [--problems=8] [--k=256] [--n=64]

Random layers with correlated inputs of unequal scale (x = z·diag(e^g)·(I + 0.3·A), z, g, A
Gaussian), per-channel int2/int3/int4 GPTQ (``jaxquant.numerics.gptq``); prints the mean
relative layer error tr(ΔᵀHΔ)/tr(WᵀHW) of each order, and the mean of Babai's bound sum
Σ R_kk² relative to act-order's.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import jaxquant.numerics as jn  # noqa: E402
from jaxquant.numerics import babai_order, gptq, layer_error  # noqa: E402

_PROBLEMS = flags.DEFINE_integer("problems", 8, "Random layers per bit width.")
_K = flags.DEFINE_integer("k", 256, "in_features.")
_N = flags.DEFINE_integer("n", 64, "out_features.")


def _problem(seed, k, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k)) * np.exp(rng.normal(0, 1, k))
    x = x @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    return rng.standard_normal((k, n)).astype(np.float32), (x.T @ x).astype(np.float32)


def _bound_sum(hd, gptq_order):
    basis = np.asarray(gptq_order)[::-1]
    return np.sum(np.diag(np.linalg.cholesky(hd[np.ix_(basis, basis)])) ** 2)


def main(argv):
    del argv
    k, n = _K.value, _N.value
    print(f"{_PROBLEMS.value} random layers [{k}, {n}] per width; mean relative layer error")
    print("| bits | identity | act-order | babai order | babai vs act | bound sum vs act |")
    print("|---:|---:|---:|---:|---:|---:|")
    for bits in (2, 3, 4):
        fmt = jn.ScalarQuantizer(jn.IntFormat(bits), jn.Scaling(axis=0))  # per channel
        errs = {"identity": [], "act": [], "babai": []}
        bound_ratio = []
        for seed in range(_PROBLEMS.value):
            w, h = _problem(seed, k, n)
            hd = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(k)
            errs["identity"].append(float(layer_error(w, gptq(w, h, fmt), h)))
            errs["act"].append(float(layer_error(w, gptq(w, h, fmt, order="act"), h)))
            errs["babai"].append(float(layer_error(w, gptq(w, h, fmt, order="babai"), h)))
            act = np.argsort(-np.diag(hd), kind="stable")
            bound_ratio.append(_bound_sum(hd, babai_order(hd)) / _bound_sum(hd, act))
        m = {key: np.mean(v) for key, v in errs.items()}
        print(
            f"| {bits} | {m['identity']:.5f} | {m['act']:.5f} | {m['babai']:.5f} | "
            f"{m['babai'] / m['act']:.3f} | {np.mean(bound_ratio):.3f} |"
        )


if __name__ == "__main__":
    app.run(main)
