"""Layer-wise post-training quantization: RTN, GPTQ, and Babai's nearest plane.

Terminology (Flax layout throughout):
  w:        a weight ``[in_features, out_features]``; row ``k`` holds input feature ``k`` of every
            output channel, so GPTQ's "columns" are our rows.
  hessian:  ``H = sum x xᵀ`` over calibration inputs, ``[in_features, in_features]``; the layer's
            output error for a quantized ``ŵ`` is ``tr((w − ŵ)ᵀ H (w − ŵ))``.
  order:    the order in which rows are quantized; each later row absorbs the error of the
            earlier ones through H.
  block:    GPTQ's lazy-batch size: error feedback inside a block of rows is immediate, to the
            rows after it is applied once per block (same result, fewer memory passes).

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

from jaxquant.numerics import Preset, QArray, QuantizedTensor
from jaxquant.numerics import calibration as calibration_lib
from jaxquant.numerics import formats as formats_lib
from jaxquant.numerics import scaling as scaling_lib
from jaxquant.numerics.qarray import resolve
from pallas_kernels import packing


def layer_scaling(fmt, group_size: int | None | str = "preset"):
    """(format, scaling) for a ``[in, out]`` weight: scales shared along the input axis (0).

    ``group_size`` overrides the preset's grouping (None: per output channel).
    """
    fmt, scaling = resolve(fmt, None)
    if scaling.axis is None and group_size == "preset":
        scaling = dataclasses.replace(scaling, axis=0)
    if group_size != "preset":
        scaling = dataclasses.replace(scaling, axis=0, group_size=group_size)
    if scaling.axis not in (0, (0,)) or scaling.split_sign:
        raise ValueError(
            f"{fmt.name}: PTQ quantizes [in, out] weights with scales along axis 0 and no "
            f"split-sign scales, got {scaling}."
        )
    return fmt, dataclasses.replace(scaling, axis=0)


def _check_layer(w, hessian):
    w = jnp.asarray(w)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(
            f"w: expected a float [in_features, out_features] array, got {w.shape} {w.dtype}."
        )
    if hessian is None:
        return w, None
    h = jnp.asarray(hessian, jnp.float32)
    if h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(
            f"hessian: expected shape {(w.shape[0], w.shape[0])} (in_features squared) for w of "
            f"shape {w.shape}, got {h.shape}."
        )
    if not isinstance(h, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(h))):
        raise ValueError("hessian: contains NaN or Inf.")
    return w, h


def rtn(w, fmt, *, group_size: int | None | str = "preset", calibration="absmax") -> QArray:
    """Round-to-nearest: ``quantize`` with scales along the input axis (the PTQ baseline)."""
    from jaxquant.numerics import quantize

    w, _ = _check_layer(w, None)
    fmt, scaling = layer_scaling(fmt, group_size)
    return quantize(w, fmt, scaling, calibration=calibration)


def layer_error(w, q, hessian) -> jax.Array:
    """``tr((w − ŵ)ᵀ H (w − ŵ)) / tr(wᵀ H w)``: the layer's relative output error."""
    w, h = _check_layer(w, hessian)
    quantized = isinstance(q, QuantizedTensor)
    w_hat = q.dequantize(jnp.float32) if quantized else jnp.asarray(q, jnp.float32)
    d = w.astype(jnp.float32) - w_hat
    w = w.astype(jnp.float32)
    return jnp.sum(d * (h @ d)) / jnp.sum(w * (h @ w))


def _stable_hessian(h, damp: float, max_tries: int = 6):
    """Dead inputs fixed, damping ``damp · mean(diag H)`` added; on a failed Cholesky the damping
    grows tenfold, up to ``max_tries`` times, then a ValueError. Returns (H, dead, damp used)."""
    h = np.asarray(h, np.float64)
    dead = np.diag(h) == 0
    h = h.copy()
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    for attempt in range(max_tries):
        lam = damp * 10**attempt * mean_diag
        hd = h + lam * np.eye(h.shape[0])
        try:
            np.linalg.cholesky(hd)
            return hd, dead, lam
        except np.linalg.LinAlgError:
            continue
    raise ValueError(
        f"hessian: not positive definite even with damping {lam:.3g} "
        f"({damp} x 10^{max_tries - 1} x mean diagonal); check the calibration data."
    )


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
    fmt: formats_lib.Format | Preset,
    *,
    group_size: int | None | str = "preset",
    act_order: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    static_groups: bool = False,
    order=None,
    calibration="absmax",
) -> QArray:
    """GPTQ: quantize ``w`` ``[in, out]`` minimizing ``tr((w − ŵ)ᵀ H (w − ŵ))`` row by row.

    Follows the reference implementation: dead inputs (zero Hessian diagonal) get weight 0;
    damping ``damp · mean(diag H)`` (grown tenfold on a failed Cholesky); ``U`` the upper
    Cholesky factor of ``H⁻¹``; lazy updates in blocks of ``block_size`` rows; per-group scales
    computed when a group starts, from the weights as updated by the previous blocks (or all
    up front with ``static_groups``); ``act_order`` processes inputs by decreasing ``diag(H)``.
    The whole loop is one jitted computation (compiled once per shape and recipe); it runs in
    float32, as the reference does on GPU.

    Args:
      w: float ``[in_features, out_features]``.
      hessian: ``[in_features, in_features]``, ``sum x xᵀ`` over calibration tokens.
      fmt: any scalar format or preset (int 2–8, FP4/MXFP4/NVFP4, NF4, FP8).
      group_size: overrides the preset's grouping along the input axis (None: per channel).
      act_order: order rows by decreasing Hessian diagonal. With groups it needs
        ``static_groups=True`` (a QArray stores groups of consecutive inputs).
      block_size: rows per lazy-update block.
      damp: relative damping of the Hessian diagonal.
      static_groups: compute every group's scale before quantizing.
      order: an explicit permutation of the rows (overrides ``act_order``), e.g.
        ``np.arange(in)[::-1]`` for back-to-front; or ``'babai'``: the order that greedily
        minimizes Babai's error bound (``babai_order``).
      calibration: how each group's (or channel's) range is chosen.

    Returns:
      A QArray of ``w``'s shape and dtype.

    References: Frantar et al., "GPTQ", arXiv:2210.17323, Alg. 1 and Sec. 4.
    """
    w, h = _check_layer(w, hessian)
    fmt, scaling = layer_scaling(fmt, group_size)
    k, n = w.shape
    g = scaling.group_size or k
    if k % g:
        raise ValueError(f"group_size={g} does not divide in_features={k}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: expected an int >= 1.")
    if order is None and act_order and scaling.group_size and not static_groups:
        raise ValueError(
            "act_order=True with group_size needs static_groups=True: groups of consecutive "
            "inputs are what a QArray stores, so their scales must be fixed before reordering."
        )
    if isinstance(order, str):
        if order != "babai":
            raise ValueError(f"order={order!r}: expected 'babai', a permutation, or None.")
        order = babai_order(_stable_hessian(h, damp)[0])
    if order is not None:
        perm = np.asarray(order)
        if perm.shape != (k,) or sorted(perm.tolist()) != list(range(k)):
            raise ValueError(f"order: expected a permutation of range({k}).")
        if scaling.group_size and not static_groups:
            raise ValueError("order= with group_size needs static_groups=True (see act_order).")
    elif act_order:
        diag = np.asarray(jnp.diag(h))
        perm = np.argsort(-np.where(diag == 0, 1.0, diag), kind="stable")
    else:
        perm = np.arange(k)
    dynamic = bool(scaling.group_size) and not static_groups
    recipe = dict(
        fmt=fmt,
        scaling=scaling,
        calibration=calibration_lib.as_calibration(calibration),
        block=min(block_size, k),
        group=g,
        dynamic=dynamic,
    )
    perm = jnp.asarray(perm, jnp.int32)
    for attempt in range(_MAX_DAMP_TRIES):
        lam = damp * 10**attempt
        codes, (scale, zero, t), ok = _gptq_jit(w, h, perm, jnp.float32(lam), **recipe)
        if bool(ok):
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
    raise ValueError(
        f"hessian: not positive definite even with damping {lam:.3g} x mean diagonal "
        f"({damp} x 10^{_MAX_DAMP_TRIES - 1}); check the calibration data."
    )


_MAX_DAMP_TRIES = 6


@functools.partial(
    jax.jit, static_argnames=("fmt", "scaling", "calibration", "block", "group", "dynamic")
)
def _gptq_jit(w, h, perm, lam, *, fmt, scaling, calibration, block, group, dynamic):
    """Everything numeric of ``gptq`` in one compiled call: (packed codes, scales, ok).

    ``ok`` is False when the damped Hessian's Cholesky failed (the caller retries with more
    damping)."""
    k, n = w.shape
    g = group
    u, dead = _damped_inverse_factor(h[perm][:, perm], lam)
    ok = jnp.all(jnp.isfinite(u))
    u = jnp.where(ok, u, jnp.eye(k, dtype=u.dtype))  # keep the loop finite; the result is unused
    inv = jnp.argsort(perm)
    w32 = jnp.where(dead[inv][:, None], 0.0, w.astype(jnp.float32))
    t = None
    if scaling.tensor_scale:
        view = w32.reshape(k // g, g, n)
        lo, hi, _ = calibration_lib.calibrate(view, (1,), fmt, scaling, calibration)
        t = scaling_lib.scales_from_range(lo, hi, fmt, scaling).tensor_scale
    scales = _group_scales(w32.reshape(k // g, g, n), fmt, scaling, calibration, t, axis=1)
    kp = -(-k // block) * block  # padded rows: zero weights, identity U, no feedback
    wp = jnp.zeros((kp, n), jnp.float32).at[:k].set(w32[perm])
    up = jnp.eye(kp, dtype=jnp.float32).at[:k, :k].set(u)
    row_group = jnp.zeros(kp, jnp.int32).at[:k].set(perm // g)
    codes, scale, zero = _gptq_loop(
        wp,
        up,
        row_group,
        scales.scale.reshape(k // g, n),
        None if scales.zero is None else scales.zero.reshape(k // g, n),
        t,
        rows=k,
        fmt=fmt,
        scaling=scaling,
        calibration=calibration,
        block=block,
        group=g,
        dynamic=dynamic,
    )
    codes = packing.pack(codes[:k][inv], fmt.bits)
    return codes, (scale, zero, t), ok


@jax.jit
def _damped_inverse_factor(h, lam):
    """``(U, dead)``: dead inputs of ``h`` set to 1 on the diagonal, ``lam · mean(diag H)`` added,
    and ``U`` upper with ``H⁻¹ = Uᵀ U`` (NaN where the Cholesky fails).

    The reference computes ``chol(H)``, then ``H⁻¹``, then ``chol(H⁻¹)``. We take one Cholesky
    factor of the reversed matrix instead: with ``J`` the reversal, ``J H J = M Mᵀ`` (M lower)
    gives ``H = V Vᵀ`` with ``V = J M J`` upper, so ``H⁻¹ = V⁻ᵀ V⁻¹`` and ``U = V⁻¹ = J M⁻¹ J``
    is that same upper factor, for a Cholesky and a triangular inverse: ``2k³/3`` flops
    against ``4k³/3`` for the reference's three steps, and no explicit inverse to lose
    precision in float32.
    """
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    h = h + lam * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    m = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    m_inv = jax.scipy.linalg.solve_triangular(m, eye, lower=True)
    return m_inv[::-1, ::-1], dead


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


def babai_nearest_plane(w, hessian, fmt, *, group_size=None, scale_from=None, damp: float = 0.01):
    """Babai's nearest plane on the lattice with Gram matrix ``H``, last basis vector first.

    With ``H = Rᵀ R`` (R upper triangular, from the damped Hessian), the error
    ``‖R (w − q)‖²`` is a sum over rows k of ``(R_kk (w_k − q_k) + Σ_{j>k} R_kj (w_j − q_j))²``;
    going from k = in−1 down to 0, each ``q_k`` rounds ``w_k + Σ_{j>k} (R_kj / R_kk)(w_j − q_j)``
    onto the grid, which makes term k at most ``(R_kk · step_k / 2)²`` when nothing clips.
    Scales are fixed up front from ``scale_from`` (default ``w``), per channel or per group.

    Returns:
      A QArray like ``gptq``'s.
    """
    w, h = _check_layer(w, hessian)
    fmt, scaling = layer_scaling(fmt, group_size)
    k, n = w.shape
    g = scaling.group_size or k
    hd, dead, _ = _stable_hessian(h, damp)
    r = np.linalg.cholesky(hd).T.astype(np.float32)  # H = Rᵀ R
    w32 = np.asarray(w, np.float32).copy()
    w32[dead, :] = 0.0
    ref = jnp.asarray(w32 if scale_from is None else np.asarray(scale_from, np.float32))
    cal = calibration_lib.as_calibration("absmax")
    groups = [_group_scales(ref[i : i + g], fmt, scaling, cal, None) for i in range(0, k, g)]
    r = np.asarray(r)
    q = np.zeros((k, n), np.float32)
    codes = np.zeros((k, n), np.uint8)
    for row in reversed(range(k)):
        shift = (r[row, row + 1 :] / r[row, row]) @ (w32[row + 1 :] - q[row + 1 :])
        c, v = _quant_row(jnp.asarray(w32[row] + shift), groups[row // g], fmt, scaling)
        codes[row], q[row] = np.asarray(c), np.asarray(v)
    stored = scaling_lib.StoredScales(
        jnp.concatenate([s.scale for s in groups]),
        None if groups[0].zero is None else jnp.concatenate([s.zero for s in groups]),
        None,
    )
    return _assemble(jnp.asarray(codes), stored, fmt, scaling, w.shape, w.dtype)


def babai_error_bound(hessian, scale, *, damp: float = 0.01) -> jax.Array:
    """Per output channel, ``(step² / 4) Σ_k R_kk²`` for a uniform grid of step ``scale``
    (``[1, out]``) and ``H = Rᵀ R``: Babai's error bound when nothing clips."""
    hd, _, _ = _stable_hessian(np.asarray(hessian), damp)
    r_diag = np.diag(np.linalg.cholesky(hd))  # R = Lᵀ has the same diagonal
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
