"""Low-bit matmul timings: the Pallas kernel vs dequantize-then-matmul (XLA) vs a bf16 matmul.

  python benchmarks/kernels.py [--formats=int4_g128,int8,mxfp4,nf4] [--ms=1,8,32,2048]
                               [--sizes=4096,8192] [--iters=10]

For each weight size K = N, each batch M (decode-like 1, 8, 32; prefill-like 2048) and each
format: bf16 activations [M, K] times a [K, N] weight, timed as

  kernel   ``pallas_kernels.quantized_matmul`` reading the QArray's packed codes: the Pallas
           kernel on TPU/GPU, the C++ kernel on CPU for M <= ``cpu.MAX_M`` (beyond, the CPU
           default is the reference, which would only repeat the next column: ``-``);
  deq+mm   ``x @ q.dequantize(bf16)`` jitted by XLA;
  bf16     ``x @ w`` with w stored in bf16 (the unquantized baseline, once per (K, M));
  f32      ``x @ w`` with f32 x and w (the float model's matmul on CPU; CPU only).

Each time is the median of ``--iters`` timed loops after one warm-up, each loop ``--reps`` calls
inside one jitted ``fori_loop`` (so one dispatch, ~0.1 ms on a GPU, is spread over them).
The roofline is memory: the
bytes a matmul must read are the packed weight (codes + scales: ``q.nbytes``; ``K·N·2`` for
bf16) plus the activations (``M·K·2``). ``GB/s`` = those bytes / time; ``roof`` = that over the
device's copy bandwidth, measured first (a jitted ``y = x + 1`` over 256 MiB: read + write).
Decode shapes are memory-bound, so ``roof`` near 1 is the goal there; prefill (M = 2048) is
compute-bound and its ``roof`` is only a reference point.
"""

import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

import jaxquant.numerics as jn  # noqa: E402
from pallas_kernels.quantized_matmul import cpu, quantized_matmul  # noqa: E402

_FORMATS = flags.DEFINE_list(
    "formats", ["int4_g128", "int8", "mxfp4", "nf4"], "Quantizer names (get_quantizer)."
)
_MS = flags.DEFINE_list("ms", ["1", "8", "32", "2048"], "Activation rows M.")
_SIZES = flags.DEFINE_list("sizes", ["4096", "8192"], "Weight sizes K = N.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed loops per measurement (median).")
_REPS = flags.DEFINE_integer("reps", 20, "Calls per timed loop (one jitted fori_loop).")
_KERNEL_ON_CPU = flags.DEFINE_bool(
    "kernel_on_cpu",
    False,
    "On CPU, time the kernel column at every M (beyond cpu.MAX_M the default is the reference).",
)


def _time(f, *args) -> float:
    """Seconds per call of ``f(x, *rest)``: ``--reps`` calls inside one jitted loop, the median
    over ``--iters`` such loops after one warm-up.

    One dispatch and ``block_until_ready`` cost ~0.1 ms on a GPU, more than a decode-shaped
    matmul; the loop pays it once per ``--reps`` calls. The arguments pass through an
    optimization barrier tied to the loop index (so XLA cannot hoist the dequantization or the
    call out of the loop) and the loop sums every output (so it cannot drop one) after a
    second barrier (so XLA cannot rewrite the sum of a matmul into a cheaper product).
    """
    reps = _REPS.value

    @jax.jit
    def loop(*args):
        def body(i, acc):
            args_i, _ = jax.lax.optimization_barrier((args, i))
            y = jax.lax.optimization_barrier(f(*args_i))
            return acc + jnp.sum(y.astype(jnp.float32))

        return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

    jax.block_until_ready(loop(*args))  # compile + warm up
    times = []
    for _ in range(_ITERS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(*args))
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


_ARRAY_ARGS = ("codes", "scales", "zeros", "tensor_scale", "lut")


def _kernel_matmul(x, arrays, **static):
    return quantized_matmul(x, **arrays, **static)


def copy_bandwidth() -> float:
    """Bytes per second of ``a = a + 1`` over 256 MiB (read + write), ``--reps`` times in a loop."""
    x = jnp.zeros((64, 1024, 1024), jnp.float32)
    loop = jax.jit(lambda a: jax.lax.fori_loop(0, _REPS.value, lambda i, a: a + 1, a))
    jax.block_until_ready(loop(x))
    times = []
    for _ in range(_ITERS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(x))
        times.append((time.perf_counter() - t0) / _REPS.value)
    return 2 * x.nbytes / statistics.median(times)


def main(argv):
    del argv
    backend = jax.default_backend()
    on_accelerator = backend in ("tpu", "gpu", "cuda", "rocm")
    on_cpu = backend == "cpu"
    device = jax.devices()[0]
    bandwidth = copy_bandwidth()
    print(
        f"device: {device.device_kind} ({backend}), {os.cpu_count()} host cores; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"median of {_ITERS.value} loops of {_REPS.value} calls"
    )
    f32_head = " f32 ms |" if on_cpu else ""
    print(
        "\n| K = N | M | format | bytes read | kernel ms | deq+mm ms | bf16 ms |"
        + f32_head
        + " kernel GB/s (roof) | deq+mm GB/s (roof) | bf16 GB/s (roof) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|" + ("---:|" if on_cpu else "") + "---:|---:|---:|")
    dequant_mm = jax.jit(lambda x, q: x @ q.dequantize(jnp.bfloat16))
    bf16_mm = jax.jit(lambda x, w: x @ w)
    for size in map(int, _SIZES.value):
        key = jax.random.key(size)
        w = jax.random.normal(key, (size, size), jnp.float32)
        w_bf16 = w.astype(jnp.bfloat16)
        quantized = {f: jn.quantize(w, f) for f in _FORMATS.value}
        for m in map(int, _MS.value):
            x = jax.random.normal(jax.random.key(m), (m, size), jnp.bfloat16)
            act = m * size * 2
            t_bf16 = _time(bf16_mm, x, w_bf16)
            t_f32 = _time(bf16_mm, x.astype(jnp.float32), w) if on_cpu else None
            bytes_bf16 = size * size * 2 + act
            for fmt, q in quantized.items():
                nbytes = q.nbytes + act
                t_deq = _time(dequant_mm, x, q)
                t_kernel = None
                args = q.kernel_args()
                use_kernel = on_accelerator or _KERNEL_ON_CPU.value or (on_cpu and m <= cpu.MAX_M)
                if use_kernel and args is not None:
                    arrays = {k: v for k, v in args.items() if k in _ARRAY_ARGS}
                    static = {k: v for k, v in args.items() if k not in _ARRAY_ARGS}
                    if on_cpu:  # the C++ kernel at every M (--kernel_on_cpu)
                        static["implementation"] = "cpu"
                    kernel = jax.jit(functools.partial(_kernel_matmul, **static))
                    t_kernel = _time(kernel, x, arrays)

                def rate(b, t):
                    return f"{b / t / 1e9:.1f} ({b / t / bandwidth:.2f})"

                kernel_ms = "-" if t_kernel is None else f"{t_kernel * 1e3:.3f}"
                f32_ms = "" if t_f32 is None else f" {t_f32 * 1e3:.3f} |"
                kernel_rate = "-" if t_kernel is None else rate(nbytes, t_kernel)
                print(
                    f"| {size} | {m} | {fmt} | {nbytes / 1e6:.1f} MB | {kernel_ms} | "
                    f"{t_deq * 1e3:.3f} | {t_bf16 * 1e3:.3f} |{f32_ms} {kernel_rate} | "
                    f"{rate(nbytes, t_deq)} | {rate(bytes_bf16, t_bf16)} |"
                )


if __name__ == "__main__":
    app.run(main)
