"""Hessian-aware vector quantization: GPTQ's error feedback over blocks of ``d`` rows.

Terminology (Flax layout, as ``gptq``): ``w`` [K, N] (K = inputs, the rows), ``H = Σ x xᵀ``
[K, K], a ``VectorQuantizer`` whose format cuts each column into vectors of ``d`` rows.

The algorithm (QuIP#'s BlockLDLQ, GPTVQ): with ``U`` the upper Cholesky factor of the damped
``H⁻¹`` (``H⁻¹ = Uᵀ U``), quantize the vectors of rows ``B = [jd, (j+1)d)`` of every column at
once, from the weights as updated so far, then move the block's error to the rows after it:

    E = U_BB⁻ᵀ (w_B − q_B)            (d × N; for d = 1 GPTQ's (w − q) / U_kk)
    w_L −= U_BLᵀ E                     (every later row L)

which is the optimal (OBS) update of the remaining rows for a block fixed jointly:
``−(H⁻¹)_LB ((H⁻¹)_BB)⁻¹ (w_B − q_B)`` with ``(H⁻¹)_BB = U_BBᵀ U_BB`` and
``(H⁻¹)_LB = U_BLᵀ U_BB``. Inside the block the search is the format's own (nearest codeword,
weighted by ``1 / U_kk²``, the row's error weight, where the format takes weights).

Scales are fixed up front from the (rotated) weight (group RMS), and a learned codebook is
fitted before the loop, weighted by the Hessian diagonal. Afterwards each column's scales are
refitted to minimize ``tr(Δᵀ H Δ)`` for the chosen codes (a G×G solve per column, G groups),
which can only lower the layer error.

References:
  Frantar et al., "GPTQ", arXiv:2210.17323, Alg. 1.
  Tseng et al., "QuIP#", arXiv:2402.04396, Sec. 3 (BlockLDLQ).
  van Baalen et al., "GPTVQ", arXiv:2402.15319, Alg. 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.numerics import hessian as hessian_lib
from jaxquant.numerics.qarray import check_input
from jaxquant.vq import rotation
from jaxquant.vq import vqarray as vqa
from jaxquant.vq.vqarray import VQArray


def havq(w, hessian, quantizer, *, damp: float = 0.01) -> VQArray:
    """Hessian-aware VQ of a layer ``w`` [K, N]: minimizes ``tr((w − ŵ)ᵀ H (w − ŵ))`` block by
    block (see the module docstring).

    Args:
      w: float [K, N].
      hessian: [K, K], ``Σ x xᵀ`` over calibration inputs.
      quantizer: a ``VectorQuantizer`` (any format: ``KMeans``, ``E8P``, ``PyramidVQ``,
        ``Trellis``; rotated or not).
      damp: relative damping of the Hessian diagonal (``numerics.damp_hessian``: grown tenfold
        while the Cholesky fails).

    Returns:
      A ``VQArray`` of ``w``'s shape and dtype.

    Example:
      >>> q = havq(w, hessian, VectorQuantizer(E8P(2), rotate=True))   # 2 bits per weight
    """
    w = check_input(w, "havq w")
    if w.ndim != 2:
        raise ValueError(f"havq w: expected a float [K, N] array, got shape {w.shape}.")
    k, n = w.shape
    h = hessian_lib.check_hessian(hessian, k, "havq hessian")
    if not hasattr(quantizer, "codebook_groups"):
        raise TypeError(f"havq quantizer={quantizer!r}: expected a VectorQuantizer.")
    quantizer.check_shape((k, n))
    signs_in = signs_out = None
    if quantizer.rotate:
        signs_in, signs_out = vqa.rotation_signs(quantizer.seed, k, n)
        h = _rotated_hessian(h, signs_in)
    damped = hessian_lib.damp_hessian(h, damp)
    return _havq_jit(
        w, h, damped.inverse_factor, damped.dead, signs_in, signs_out, quantizer=quantizer
    )


@jax.jit
def _rotated_hessian(h, signs_in):
    return rotation.rotate_hessian(h, rotation.unpack_signs(signs_in, h.shape[0]))


@functools.partial(jax.jit, static_argnames=("quantizer",))
def _havq_jit(w, h, u, dead, signs_in, signs_out, *, quantizer):
    k, n = w.shape
    fmt = quantizer.format
    d = fmt.vector_dim
    w2 = w.astype(jnp.float32)
    if quantizer.rotate:
        s_in = rotation.unpack_signs(signs_in, k)
        s_out = rotation.unpack_signs(signs_out, n)
        w2 = rotation.rotate_weight(w2, s_in, s_out)
    g = quantizer.group_size or k
    scale = vqa.group_rms_scale(w2, quantizer)
    full = vqa.expand_scale(scale, k, g)  # [K, N]
    diag = jnp.where(dead, 0.0, jnp.diag(h))
    codebook = vqa.fit_codebook(
        w2 / full, quantizer, jax.random.key(quantizer.seed), diag[:, None] * jnp.square(full)
    )
    row_weight = 1.0 / jnp.square(jnp.diag(u))  # GPTQ's error weight of each row
    rows = jnp.arange(k)

    def step(j, carry):
        wt, codes = carry
        r0 = j * d
        block = lax.dynamic_slice_in_dim(wt, r0, d)  # [d, N]
        fb = lax.dynamic_slice_in_dim(full, r0, d)
        weights = lax.dynamic_slice_in_dim(row_weight, r0, d)[:, None] * jnp.square(fb)
        c = vqa.encode_matrix(block / fb, codebook, quantizer, weights)  # [1, N, B]
        deq = _decode_block(c, codebook, quantizer) * fb  # [d, N]
        ub = lax.dynamic_slice(u, (r0, r0), (d, d))
        e = jax.scipy.linalg.solve_triangular(ub.T, block - deq, lower=True)  # U_BBᵀ E = Δ
        u_rows = lax.dynamic_slice_in_dim(u, r0, d)  # [d, K]
        u_rows = jnp.where(rows[None, :] >= r0 + d, u_rows, 0.0)
        wt = wt - u_rows.T @ e
        codes = lax.dynamic_update_slice_in_dim(codes, c, j, 0)
        return wt, codes

    codes0 = jnp.zeros((k // d, n, fmt.code_bytes), jnp.uint8)
    _, codes = lax.fori_loop(0, k // d, step, (w2, codes0))
    q = vqa.assemble(codes, scale, w, quantizer, codebook, signs_in, signs_out)
    if quantizer.refit_scale:
        q = q.replace(scale=hessian_refit_scale(q, w2, h))
    return q


def _decode_block(codes, codebook, quantizer):
    """f32 [d, N]: the unit-space rows of one block's codes [1, N, B]."""
    fmt = quantizer.format
    n = codes.shape[1]
    groups = quantizer.codebook_groups
    cols = n // groups
    parts = []
    for c in range(groups):
        cb = None if codebook is None else codebook[c]
        parts.append(fmt.decode(codes[0, c * cols : (c + 1) * cols], cb))  # [cols, d]
    return jnp.concatenate(parts, axis=0).T


def hessian_refit_scale(q: VQArray, w2, h) -> jax.Array:
    """Per column, the group scales minimizing ``(w − U s)ᵀ H (w − U s)`` for the decoded
    unit-space values ``U`` (a G×G system per column; the old scales where it is singular)."""
    k, n = w2.shape
    g = q.group_size or k
    groups = k // g
    unit = q.replace(scale=jnp.ones_like(q.scale)).rotated_matrix()  # [K, N]
    ug = unit.reshape(groups, g, n)
    h4 = h.reshape(groups, g, groups, g)
    hp = lax.Precision.HIGHEST
    m = jnp.einsum("apn,apbq,bqn->nab", ug, h4, ug, precision=hp)  # [N, G, G]
    hw = jnp.dot(h, w2, precision=hp).reshape(groups, g, n)
    rhs = jnp.einsum("apn,apn->na", ug, hw)  # [N, G]
    # Tikhonov-regularize by a tiny multiple of the diagonal: groups whose codes are all zero
    # make M singular; their scale then stays (its value does not matter).
    reg = 1e-9 * jnp.maximum(jnp.max(jnp.abs(m), axis=(1, 2), keepdims=True), 1e-30)
    sol = jnp.linalg.solve(m + reg * jnp.eye(groups), rhs[..., None])[..., 0]  # [N, G]
    diag = jnp.diagonal(m, axis1=1, axis2=2)
    good = jnp.isfinite(sol) & (diag > 0)
    return jnp.where(good.T, sol.T, q.scale)
