"""GPTQ and Babai's nearest plane: Hessian-aware quantization of a scalar-format weight.

Terminology (Flax layout throughout):
  w:        a weight ``[in_features, out_features]``; row ``k`` holds input feature ``k`` of every
            output channel, so GPTQ's "columns" are our rows.
  hessian:  ``H = sum x xᵀ`` over calibration inputs, ``[in_features, in_features]``; the layer's
            output error for a quantized ``ŵ`` is ``tr((w − ŵ)ᵀ H (w − ŵ))``.
  order:    the order in which rows are quantized; each later row absorbs the error of the
            earlier ones through H.
  lazy batch: GPTQ's blocks of ``lazy_batch`` rows: error feedback inside a lazy batch is
            immediate, to the rows after it is applied once per batch (fewer memory passes; with
            dynamic group scales the batch size decides which updates a new group's scale sees).
  quantizer: a ``ScalarQuantizer`` (format, scaling, calibration); its scales are shared along
            the input axis 0 (per tensor, per output channel, or per group of inputs).

GPTQ (Frantar et al., arXiv:2210.17323, Alg. 1) quantizes row ``k`` to ``q_k`` and moves its
scaled error to the rows not yet quantized: ``w_j −= (w_k − q_k) · U_kj / U_kk`` with ``U`` the
upper Cholesky factor of ``H⁻¹``. It is Babai's nearest-plane algorithm on the lattice whose
Gram matrix is ``H``, run from the last basis vector to the first (Chen et al.,
arXiv:2507.18553): ``babai_nearest_plane`` implements that view directly from ``H = Rᵀ R``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.numerics import calibration as calibration_lib
from jaxquant.numerics import formats as formats_lib
from jaxquant.numerics import hessian as hessian_lib
from jaxquant.numerics import scaling as scaling_lib
from jaxquant.numerics.qarray import QArray, check_input
from pallas_kernels import packing


def matrix_recipe(quantizer) -> tuple[formats_lib.Format, scaling_lib.Scaling, object]:
    """(format, scaling, calibration) of a ``ScalarQuantizer`` for a ``[in, out]`` weight: its
    scales moved to the input axis 0 (one scale per tensor stays so)."""
    fmt = getattr(quantizer, "format", None)
    scaling = getattr(quantizer, "scaling", None)
    if not isinstance(fmt, formats_lib.Format) or not isinstance(scaling, scaling_lib.Scaling):
        raise TypeError(
            f"quantizer={quantizer!r}: expected a ScalarQuantizer (a preset such as INT4_G128, "
            "or ScalarQuantizer(format, scaling)); vector formats use jaxquant.vq.havq."
        )
    if scaling.split_sign:
        raise ValueError(
            f"{quantizer.name}: GPTQ does not support split-sign scales (their negative and "
            "positive halves change with each update); use round-to-nearest."
        )
    if scaling.axis is not None:
        scaling = dataclasses.replace(scaling, axis=0)
    return fmt, scaling, quantizer.calibration


def _check_layer(w, hessian, fn: str):
    w = check_input(w, f"{fn} w")
    if w.ndim != 2:
        raise ValueError(
            f"{fn} w: expected a float [in_features, out_features] array, got {w.shape}."
        )
    return w, hessian_lib.check_hessian(hessian, w.shape[0], f"{fn} hessian")


def _quant_row(row, stored, fmt, scaling):
    """Codes and dequantized values of one row ``[out]`` with stored scales ``[1, out]``."""
    s = scaling_lib.effective_scale(stored, scaling)[0]
    zero = None if stored.zero is None else stored.zero[0]
    v = fmt.round(scaling_lib.divide(row, s, zero, scaling))
    return fmt.encode(v), scaling_lib.multiply(v, s, zero, scaling)


def _group_scales(rows, fmt, scaling, calibration, t, axis: int = 0):
    """Stored scales of groups of rows: ``[g, out]`` -> ``[1, out]`` (or, with ``axis=1``,
    ``[groups, g, out]`` -> ``[groups, 1, out]``)."""
    lo, hi, _ = calibration_lib.calibrate(rows, (axis,), fmt, scaling, calibration)
    return scaling_lib.scales_from_range(lo, hi, fmt, scaling, t)


def _assemble(codes, stored, fmt, scaling, shape, dtype) -> QArray:
    """A QArray from unpacked codes ``[in, out]`` and stored scales ``[groups, out]``."""
    return QArray(
        codes=packing.pack(codes, fmt.bits),
        scale=stored.scale,
        shape=tuple(shape),
        dtype=np.dtype(dtype),
        format=fmt,
        scaling=scaling,
        zero=stored.zero,
        tensor_scale=stored.tensor_scale,
    )


def gptq(
    w,
    hessian,
    quantizer,
    *,
    order=None,
    static_groups: bool = False,
    lazy_batch: int = 128,
    damp: float = 0.01,
) -> QArray:
    """GPTQ: quantize ``w`` ``[in, out]`` minimizing ``tr((w − ŵ)ᵀ H (w − ŵ))`` row by row.

    Follows the reference implementation, except that dead inputs (zero Hessian diagonal) keep
    their weights, rounded to nearest, where the reference zeroes them (``hessian.py``);
    damping ``damp · mean(diag H)`` (``hessian.damp_hessian``: grown tenfold while the Cholesky
    fails); ``U`` the upper Cholesky factor of ``H⁻¹``; lazy updates in batches of
    ``lazy_batch`` rows; per-group scales computed when a group starts, from the weights as
    updated by the previous batches (or all up front with ``static_groups``; one scale per
    tensor or per channel is always computed up front). The loop is one jitted computation
    (compiled once per shape and recipe); it runs in float32, as the reference does on GPU.
    ``ScalarQuantizer.quantize(w, hessian=H)`` calls this with the defaults.

    Args:
      w: float ``[in_features, out_features]``.
      hessian: ``[in_features, in_features]``, ``sum x xᵀ`` over calibration tokens.
      quantizer: a ``ScalarQuantizer`` (int 2–8, FP4/MXFP4/NVFP4, NF4, FP8; per tensor,
        channel or group; any calibration). Its scales are shared along the input axis.
      order: the order rows are quantized in: None (input order), ``'act'`` (act-order:
        decreasing ``diag(H)``), ``'babai'`` (``babai_order``: the order that greedily lowers
        Babai's error bound), or a permutation of ``range(in_features)``. Any order but the
        input order fixes group scales up front (a QArray stores groups of consecutive inputs).
      static_groups: compute every group's scale before quantizing, in input order too.
      lazy_batch: rows per lazy update.
      damp: relative damping of the Hessian diagonal.

    Returns:
      A QArray of ``w``'s shape and dtype.

    References: Frantar et al., "GPTQ", arXiv:2210.17323, Alg. 1 and Sec. 4.
    """
    w, h = _check_layer(w, hessian, "gptq")
    fmt, scaling, calibration = matrix_recipe(quantizer)
    k, n = w.shape
    g = scaling.group_size or k
    scaling.block_view((k, n))  # a group size that does not divide in_features fails here
    if isinstance(lazy_batch, bool) or not isinstance(lazy_batch, int) or lazy_batch < 1:
        raise ValueError(f"gptq lazy_batch={lazy_batch!r}: expected an int >= 1.")
    if isinstance(order, str):
        if order == "act":
            diag = np.asarray(jnp.diag(h))
            order = np.argsort(-np.where(diag == 0, 1.0, diag), kind="stable")
        elif order == "babai":
            order = babai_order(hessian_lib.damp_hessian(h, damp).matrix)
        else:
            raise ValueError(
                f"gptq order={order!r}: expected None, 'act', 'babai' or a permutation."
            )
    if order is None:
        perm = np.arange(k)
    else:
        perm = np.asarray(order)
        if perm.shape != (k,) or sorted(perm.tolist()) != list(range(k)):
            raise ValueError(f"gptq order: expected a permutation of range({k}).")
        static_groups = True
    damped = hessian_lib.damp_hessian(h, damp, order=perm)
    codes, (scale, zero, t) = _gptq_jit(
        w,
        damped.inverse_factor,
        jnp.asarray(perm, jnp.int32),
        fmt=fmt,
        scaling=scaling,
        calibration=calibration,
        block=min(lazy_batch, k),
        group=g,
        dynamic=bool(scaling.group_size) and not static_groups,
    )
    return QArray(
        codes=codes,
        scale=scale,
        shape=tuple(w.shape),
        dtype=np.dtype(w.dtype),
        format=fmt,
        scaling=scaling,
        zero=zero,
        tensor_scale=t,
    )


@functools.partial(
    jax.jit, static_argnames=("fmt", "scaling", "calibration", "block", "group", "dynamic")
)
def _gptq_jit(w, u, perm, *, fmt, scaling, calibration, block, group, dynamic):
    """Everything numeric of ``gptq`` after damping in one compiled call: (packed codes,
    stored scales). ``u``: the inverse factor of the damped Hessian in processing order."""
    k, n = w.shape
    g = group
    w32 = w.astype(jnp.float32)
    t = None
    if scaling.axis is None:  # one scale for the tensor, fixed up front
        lo, hi, t = calibration_lib.calibrate(w32, (0, 1), fmt, scaling, calibration)
        stored = scaling_lib.scales_from_range(lo, hi, fmt, scaling, t)
        scale_rows = jnp.broadcast_to(stored.scale.reshape(1, 1), (1, n))
        zero_rows = None if stored.zero is None else jnp.broadcast_to(stored.zero, (1, n))
    else:
        if scaling.tensor_scale:
            view = w32.reshape(k // g, g, n)
            lo, hi, _ = calibration_lib.calibrate(view, (1,), fmt, scaling, calibration)
            t = scaling_lib.scales_from_range(lo, hi, fmt, scaling).tensor_scale
        stored = _group_scales(w32.reshape(k // g, g, n), fmt, scaling, calibration, t, axis=1)
        scale_rows = stored.scale.reshape(k // g, n)
        zero_rows = None if stored.zero is None else stored.zero.reshape(k // g, n)
    kp = -(-k // block) * block  # padded rows: zero weights, identity U, no feedback
    wp = jnp.zeros((kp, n), jnp.float32).at[:k].set(w32[perm])
    up = jnp.eye(kp, dtype=jnp.float32).at[:k, :k].set(u)
    row_group = jnp.zeros(kp, jnp.int32).at[:k].set(perm // g)
    codes, scale, zero = _gptq_loop(
        wp,
        up,
        row_group,
        scale_rows,
        zero_rows,
        t,
        rows=k,
        fmt=fmt,
        scaling=scaling,
        calibration=calibration,
        block=block,
        group=g,
        dynamic=dynamic,
    )
    if scaling.axis is None:
        scale, zero = stored.scale.reshape(1, 1), None if stored.zero is None else stored.zero
    codes = packing.pack(codes[:k][jnp.argsort(perm)], fmt.bits)
    return codes, (scale, zero, t)


def _segments(num_blocks: int) -> list[tuple[int, int]]:
    """Consecutive ranges of blocks; each is one loop whose trailing update covers only the
    rows from its start. Four segments make the update cost ~5/8 of a full square instead of
    all of it; small layers (under 8 blocks) take one loop, which compiles 4x faster."""
    parts = 4 if num_blocks >= 8 else 1
    edges = sorted({round(num_blocks * i / parts) for i in range(parts + 1)})
    return list(zip(edges[:-1], edges[1:], strict=True))


@functools.partial(
    jax.jit,
    static_argnames=("rows", "fmt", "scaling", "calibration", "block", "group", "dynamic"),
)
def _gptq_loop(
    wp,
    u,
    row_group,
    scale,
    zero,
    tensor_scale,
    *,
    rows,
    fmt,
    scaling,
    calibration,
    block,
    group,
    dynamic,
):
    """GPTQ's error feedback on rows in processing order, jitted.

    Args:
      wp: f32 ``[kp, n]`` weights in processing order, padded to a multiple of ``block`` rows
        (``rows`` of them are real).
      u: f32 ``[kp, kp]`` upper factor of the permuted ``H⁻¹`` (identity on padded rows).
      row_group: int32 ``[kp]`` the group (scale row) of each processed row.
      scale, zero: stored scales ``[groups, n]`` (zero may be None). With ``dynamic``, a group's
        scales are computed when its first row comes up, from the weights as of the start of
        that row's block (as the reference reads them).
      tensor_scale: f32 scalar or None.

    Returns:
      ``(codes, scale, zero)``: uint8 ``[kp, n]`` codes in processing order, final scales.
    """
    n = wp.shape[1]
    codes = []
    for b0, b1 in _segments(wp.shape[0] // block):
        r0 = b0 * block
        ut = u[r0:, r0:]  # U is upper triangular: rows from r0 on only reach columns from r0 on
        rg = row_group[r0:]
        later_than = jnp.arange(ut.shape[1])

        def quant_block(b, carry, r0=r0, ut=ut, rg=rg, later_than=later_than):
            wt, seg_codes, scale, zero = carry
            i1 = b * block - r0  # the block's first row, counted from the segment's start
            w1 = lax.dynamic_slice_in_dim(wt, i1, block)
            ub = lax.dynamic_slice(ut, (i1, i1), (block, block))

            def refresh(sz, row):
                rows = lax.dynamic_slice_in_dim(wt, row, group)
                st = _group_scales(rows, fmt, scaling, calibration, tensor_scale)
                gi = (row + r0) // group
                s = lax.dynamic_update_slice_in_dim(sz[0], st.scale.astype(sz[0].dtype), gi, 0)
                z = sz[1]
                if z is not None:
                    z = lax.dynamic_update_slice_in_dim(z, st.zero, gi, 0)
                return s, z

            def quant_row(i, c):
                err, cb, scale, zero = c
                row = i1 + i
                if dynamic and ut.shape[0] >= group:  # else no group starts in this segment
                    scale, zero = lax.cond(
                        ((row + r0) % group == 0) & (row + r0 < rows),  # not padding
                        lambda sz: refresh(sz, row),
                        lambda sz: sz,
                        (scale, zero),
                    )
                gi = rg[row]
                st = scaling_lib.StoredScales(
                    lax.dynamic_slice_in_dim(scale, gi, 1),
                    None if zero is None else lax.dynamic_slice_in_dim(zero, gi, 1),
                    tensor_scale,
                )
                x = w1[i] - ub[:, i] @ err  # the in-block feedback of rows < i (err is 0 from i)
                code, q = _quant_row(x, st, fmt, scaling)
                err = err.at[i].set((x - q) / ub[i, i])
                return err, cb.at[i].set(code), scale, zero

            init = (jnp.zeros((block, n), jnp.float32), jnp.zeros((block, n), jnp.uint8))
            err, cb, scale, zero = lax.fori_loop(0, block, quant_row, init + (scale, zero))
            # the lazy update of the rows after the block: w_later -= U[block, later]ᵀ err
            u_rows = lax.dynamic_slice_in_dim(ut, i1, block)
            u_rows = jnp.where(later_than[None, :] >= i1 + block, u_rows, 0.0)
            wt = wt - u_rows.T @ err
            seg_codes = lax.dynamic_update_slice_in_dim(seg_codes, cb, i1, 0)
            return wt, seg_codes, scale, zero

        seg_codes = jnp.zeros(((b1 - b0) * block, n), jnp.uint8)
        wt, seg_codes, scale, zero = lax.fori_loop(
            b0, b1, quant_block, (wp[r0:], seg_codes, scale, zero)
        )
        wp = wp.at[r0:].set(wt)
        codes.append(seg_codes)
    return jnp.concatenate(codes), scale, zero


def babai_nearest_plane(w, hessian, quantizer, *, scale_from=None, damp: float = 0.01) -> QArray:
    """Babai's nearest plane on the lattice with Gram matrix ``H``, last basis vector first.

    With ``H = Rᵀ R`` (R upper triangular, from the damped Hessian), the error
    ``‖R (w − q)‖²`` is a sum over rows k of ``(R_kk (w_k − q_k) + Σ_{j>k} R_kj (w_j − q_j))²``;
    going from k = in−1 down to 0, each ``q_k`` rounds ``w_k + Σ_{j>k} (R_kj / R_kk)(w_j − q_j)``
    onto the grid, which makes term k at most ``(R_kk · step_k / 2)²`` when nothing clips.
    Scales are fixed up front from ``scale_from`` (default ``w``) with the quantizer's
    calibration. A slow, obviously-correct numpy loop: the lattice view of ``gptq``.

    Args:
      w, hessian, quantizer, damp: as ``gptq``.
      scale_from: the ``[in, out]`` array whose ranges set the scales (default ``w``).

    Returns:
      A QArray like ``gptq``'s.
    """
    w, h = _check_layer(w, hessian, "babai_nearest_plane")
    fmt, scaling, calibration = matrix_recipe(quantizer)
    k, n = w.shape
    scaling.block_view((k, n))
    g = scaling.group_size or k
    damped = hessian_lib.damp_hessian(h, damp)
    r = np.linalg.cholesky(np.asarray(damped.matrix, np.float64)).T.astype(np.float32)  # H = RᵀR
    w32 = np.asarray(w, np.float32).copy()
    ref = jnp.asarray(w32 if scale_from is None else np.asarray(scale_from, np.float32))
    if scaling.axis is None:
        lo, hi, t = calibration_lib.calibrate(ref, (0, 1), fmt, scaling, calibration)
        stored = scaling_lib.scales_from_range(lo, hi, fmt, scaling, t)
        row = scaling_lib.StoredScales(
            jnp.broadcast_to(stored.scale, (1, n)),
            None if stored.zero is None else jnp.broadcast_to(stored.zero, (1, n)),
            None,
        )
        groups = [row]
    else:
        groups = [
            _group_scales(ref[i : i + g], fmt, scaling, calibration, None) for i in range(0, k, g)
        ]
        stored = scaling_lib.StoredScales(
            jnp.concatenate([s.scale for s in groups]),
            None if groups[0].zero is None else jnp.concatenate([s.zero for s in groups]),
            None,
        )
    q = np.zeros((k, n), np.float32)
    codes = np.zeros((k, n), np.uint8)
    for row in reversed(range(k)):
        shift = (r[row, row + 1 :] / r[row, row]) @ (w32[row + 1 :] - q[row + 1 :])
        c, v = _quant_row(jnp.asarray(w32[row] + shift), groups[row // g], fmt, scaling)
        codes[row], q[row] = np.asarray(c), np.asarray(v)
    return _assemble(jnp.asarray(codes), stored, fmt, scaling, w.shape, w.dtype)


def babai_error_bound(hessian, scale, *, damp: float = 0.01) -> jax.Array:
    """Per output channel, ``(step² / 4) Σ_k R_kk²`` for a uniform grid of step ``scale``
    (``[1, out]``) and ``H = Rᵀ R``: Babai's error bound when nothing clips."""
    damped = hessian_lib.damp_hessian(hessian, damp)
    r_diag = np.diag(np.linalg.cholesky(np.asarray(damped.matrix, np.float64)))
    return jnp.asarray(np.asarray(scale, np.float64) ** 2 / 4 * np.sum(r_diag**2))


def babai_order(hessian) -> np.ndarray:
    """A GPTQ row order that makes Babai's error bound ``(step²/4) Σ_k R_kk²`` small.

    ``R_kk²`` is the variance of input k left after conditioning on the inputs before it in the
    basis order (a Schur complement), and Babai decides the last basis vector first. Choosing
    the basis greedily, each time the input with the smallest remaining conditional variance
    (pivoted Cholesky with the minimum pivot), and processing it back to front gives GPTQ's order.
    It refines act-order (largest ``diag(H)`` first, i.e. unconditional variances). Measured in
    BENCHMARKS.md (``benchmarks/gptq_order.py``).

    Args:
      hessian: ``[in, in]`` positive definite (damped) Hessian.

    Returns:
      int ``[in]``: the rows in the order GPTQ should quantize them.
    """
    h = np.asarray(hessian, np.float64)
    k = h.shape[0]
    remaining = np.diag(h).copy()  # conditional variances given the chosen inputs
    factor = np.zeros((k, k))
    free = np.ones(k, bool)
    basis = []
    for i in range(k):
        j = int(np.argmin(np.where(free, remaining, np.inf)))
        col = (h[:, j] - factor[:, :i] @ factor[j, :i]) / np.sqrt(remaining[j])
        factor[:, i] = col
        remaining -= col**2
        free[j] = False
        basis.append(j)
    return np.asarray(basis[::-1])
