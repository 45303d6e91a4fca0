"""GPTQ speed: the jitted ``jaxquant.numerics.gptq`` against a straightforward numpy GPTQ.

  python benchmarks/gptq_speed.py [--k=4096] [--n=4096] [--tokens=8192] [--group=128]

One layer ``[k, n]`` with its Hessian from ``tokens`` correlated calibration rows, int4 with
per-group scales, lazy batches of 128 rows, in the same run: the numpy implementation (float32, the
reference algorithm written plainly: Cholesky, inverse, Cholesky, then the row loop with
in-block outer-product updates and one matmul per block) and jaxquant's (one jitted loop;
timed once cold, compilation included, and once warm). Prints both times, the speedup and the
two layer errors (they agree to float32 rounding).
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import jaxquant.numerics as jn  # noqa: E402
from jaxquant.numerics import gptq, layer_error  # noqa: E402

_K = flags.DEFINE_integer("k", 4096, "in_features.")
_N = flags.DEFINE_integer("n", 4096, "out_features.")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Calibration rows behind the Hessian.")
_GROUP = flags.DEFINE_integer("group", 128, "Group size along the input axis.")
_BLOCK = 128


def numpy_gptq(w, h, bits, group, block=_BLOCK, damp=0.01):
    """The reference algorithm in float32 numpy (Flax layout: rows are input features)."""
    w = w.astype(np.float32).copy()
    h = h.astype(np.float32).copy()
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    h += np.float32(damp * np.mean(np.diag(h))) * np.eye(k, dtype=np.float32)
    t0 = time.perf_counter()
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = Uᵀ U
    numpy_gptq.factor_seconds = time.perf_counter() - t0
    qmax = 2 ** (bits - 1) - 1
    q = np.zeros_like(w)
    scale = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[i1:i2].copy(), np.zeros((i2 - i1, w.shape[1]), np.float32)
        for i in range(i2 - i1):
            row = i1 + i
            if row % group == 0:
                scale = np.abs(w[row : row + group]).max(axis=0) / qmax
                scale[scale == 0] = 1
            q[row] = np.clip(np.round(w1[i] / scale), -qmax - 1, qmax) * scale
            e = (w1[i] - q[row]) / u[row, row]
            w1[i:] -= np.outer(u[row, row:i2], e)
            err[i] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    return q


def main(argv):
    del argv
    k, n, g = _K.value, _N.value, _GROUP.value
    rng = np.random.default_rng(0)
    x = rng.standard_normal((_TOKENS.value, k), dtype=np.float32)
    x = x + 0.5 * np.roll(x, 1, axis=1) + 0.25 * x[:, :1]  # correlated inputs
    h = x.T @ x
    w = rng.standard_normal((k, n), dtype=np.float32)
    print(
        f"layer [{k}, {n}], Hessian from {_TOKENS.value} tokens, int4 groups of {g}, "
        f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} cores"
    )

    t0 = time.perf_counter()
    q_np = numpy_gptq(w, h, 4, g)
    t_np = time.perf_counter() - t0

    preset = jn.INT4_G128.with_group_size(g)
    times = []
    for _ in range(2):  # cold (compiles), then warm
        t0 = time.perf_counter()
        q = gptq(w, h, preset, lazy_batch=_BLOCK)
        jax.block_until_ready(q.codes)
        times.append(time.perf_counter() - t0)
    e_np = float(layer_error(w, q_np, h))
    e_jq = float(layer_error(w, q, h))
    print(
        f"numpy GPTQ:            {t_np:8.2f} s   layer error {e_np:.5f}   "
        f"(inverse + Cholesky {numpy_gptq.factor_seconds:.2f} s, row loop "
        f"{t_np - numpy_gptq.factor_seconds:.2f} s)"
    )
    print(f"jaxquant gptq (cold):  {times[0]:8.2f} s   (compilation included)")
    print(f"jaxquant gptq (warm):  {times[1]:8.2f} s   layer error {e_jq:.5f}")
    print(f"speedup: {t_np / times[1]:.2f}x warm, {t_np / times[0]:.2f}x cold")


if __name__ == "__main__":
    app.run(main)
