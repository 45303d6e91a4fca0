"""The CPU kernel of ``quantized_matmul``: a C++ XLA FFI custom call, built on first use.

XLA's CPU backend does not fuse a weight's decoding into its dot, so the reference path
(dequantize the whole weight to float32, then multiply) reads and writes more bytes than the
float32 model does, and a served int4 model decodes tokens slower than the float one. This
kernel (``cpu_kernel.cc``) reads the packed codes once and never writes the decoded weight: per
group of ``group_size`` rows it accumulates ``x @ codes`` in float32 registers and scales the
group's partial sums (minus the zero point times the group's sum of ``x``), with the columns
split over XLA's intra-op thread pool.

It serves small M (token-by-token decoding, short prompts: ``M <= MAX_M`` rows), where the
matmul is bound by reading the weight; at larger M a float32 GEMM on the dequantized weight is
faster, and ``supports`` sends those calls to the reference.

Building: the first call compiles ``cpu_kernel.cc`` with the C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``) against jaxlib's FFI headers, ``-O3 -march=native``, into
``$JAXQUANT_CACHE_DIR`` (default ``~/.cache/jaxquant``), named by a hash of the source, the
compiler, jaxlib's version and the CPU, so a machine builds it once (about 5 s) and a shared
home directory never hands one CPU another's build. Without a compiler, or with
``JAXQUANT_CPU_KERNEL=0``, ``unavailable_reason`` says why and the dispatcher uses the
reference (with a warning, once, unless the variable disabled it on purpose).

This module imports only jax, numpy and the standard library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul.reference import Problem, code_table, decode_scales

# Calls with more rows than this go to the reference (dequantize + float32 GEMM): on SmolLM2's
# 210 layer shapes (2 cores) the kernel takes 0.4x the reference's time at M = 32 and 1.1x at
# M = 128, where the compute-bound GEMM wins (benchmarks/pretrained.py --what=matmuls).
MAX_M = 64
TARGET = "jaxquant_quantized_matmul_cpu"
SOURCE = pathlib.Path(__file__).with_name("cpu_kernel.cc")
ENV_DISABLE = "JAXQUANT_CPU_KERNEL"
ENV_CACHE = "JAXQUANT_CACHE_DIR"
# How each fmt decodes in the kernel: 0 sign-extends two's complement codes, 1 reads unsigned
# codes, 2 looks the code up in a float32 table (reference.code_table or the lut argument).
_KIND = {"int": 0, "uint": 1, "e2m1": 2, "e4m3": 2, "lut": 2}


def find_compiler() -> str | None:
    """The C++ compiler the kernel is built with: ``$CXX``, else the first of c++, g++, clang++
    on the PATH; None without one."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    # The ISA the build targets (-march=native): the CPU's model and flags.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> pathlib.Path:
    """The path of the built library (compiled now unless a matching build is cached)."""
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-isystem", include]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    import jaxlib

    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), cxx, version, jaxlib.__version__, _cpu_id(), " ".join(flags)]
        ).encode()
    ).hexdigest()[:16]
    cache = pathlib.Path(
        os.environ.get(ENV_CACHE) or pathlib.Path.home() / ".cache" / "jaxquant"
    ).expanduser()
    lib = cache / f"quantized_matmul_cpu_{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name, then rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        r = subprocess.run(
            [cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300
        )
        if r.returncode:
            raise RuntimeError(f"{cxx} failed on {SOURCE.name}:\n{r.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernel once; None when it works, else why not."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return f"disabled by {ENV_DISABLE}=0"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(
            TARGET, jax.ffi.pycapsule(lib.JaxquantQuantizedMatmulCpu), platform="cpu"
        )
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason() -> str | None:
    """None when the kernel is built and registered (building it on the first call), else a
    sentence saying why not (no compiler, a failed build, ``JAXQUANT_CPU_KERNEL=0``)."""
    return _load()


_warned: set[str] = set()


def available(stacklevel: int = 2) -> bool:
    """Whether the kernel is built and registered (building it on the first call). When it is
    not, warns once per reason, unless ``JAXQUANT_CPU_KERNEL=0`` chose that on purpose."""
    reason = _load()
    if reason is None:
        return True
    if os.environ.get(ENV_DISABLE, "1") != "0" and reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"quantized_matmul: the CPU kernel is unavailable ({reason}), so served quantized "
            "matmuls on CPU dequantize the whole weight, then multiply (slower than the float "
            "model when decoding). Install a C++ compiler, or set "
            f"{ENV_DISABLE}=0 to choose the reference without this warning.",
            stacklevel=stacklevel + 1,
        )
    return False


def reset() -> None:
    """Forgets the loaded kernel and the warnings given, so the next call looks again (after
    changing ``$CXX``, ``JAXQUANT_CPU_KERNEL`` or ``JAXQUANT_CACHE_DIR``)."""
    _load.cache_clear()
    _warned.clear()


def supports(p: Problem) -> bool:
    """Whether the kernel serves this call: at most ``MAX_M`` rows (decoding)."""
    return p.m <= MAX_M


def quantized_matmul_cpu(
    x, codes, scales, zeros=None, *, p: Problem, tensor_scale=None, lut=None
) -> jax.Array:
    """``x @ w`` by the C++ kernel (``api.quantized_matmul``'s arguments, checked into ``p``).

    Scales are decoded to float32 (times ``tensor_scale``) and the zero points widened to
    float32 here, outside the kernel (they are ``1 / group_size`` of the weight's elements),
    and put in the kernel's plane-major column order (``cpu_kernel.cc``), as y is put back.
    """
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"quantized_matmul implementation='cpu' is unavailable: {reason}")
    per = 8 // p.bits
    width = per * p.packed_n  # N padded to whole bytes

    def plane_major(a):  # [rows, N] -> [rows, per * packed_n]: column per * j + c at c, j
        a = jnp.pad(a, ((0, 0), (0, width - p.n)))
        return a.reshape(a.shape[0], p.packed_n, per).transpose(0, 2, 1).reshape(-1, width)

    s = decode_scales(jnp.asarray(scales), p.scale_dtype)
    if tensor_scale is not None:
        s = s * jnp.asarray(tensor_scale, jnp.float32).reshape(())
    z = (
        jnp.zeros((0,), jnp.float32)
        if zeros is None
        else plane_major(jnp.asarray(zeros).astype(jnp.float32))
    )
    table = (
        jnp.asarray(lut, jnp.float32)
        if p.fmt == "lut"
        else jnp.asarray(code_table(p.fmt, p.bits), jnp.float32)
    )
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((p.m, width), jnp.float32), vmap_method="sequential"
    )
    y = call(
        jnp.asarray(x).astype(jnp.float32),
        jnp.asarray(codes, jnp.uint8),
        plane_major(s),
        z,
        table,
        bits=np.int64(p.bits),
        kind=np.int64(_KIND[p.fmt]),
        group_size=np.int64(p.group_size or 0),
        has_zeros=zeros is not None,
    )
    y = y.reshape(p.m, per, p.packed_n).transpose(0, 2, 1).reshape(p.m, width)[:, : p.n]
    return y.astype(p.out_dtype)
