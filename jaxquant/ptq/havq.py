"""Hessian-aware vector quantization: GPTQ's error feedback over blocks of ``d`` rows.

Terminology (Flax layout, as ``gptq``): ``w`` [K, N] (K = inputs, the rows), ``H = Σ x xᵀ``
[K, K], a recipe ``VQ`` whose format cuts each column into vectors of ``d`` rows.

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
import numpy as np
from jax import lax

from jaxquant.ptq.gptq import _check_layer, _damped_inverse_factor
from jaxquant.vq import VQ, VQArray, rotation
from jaxquant.vq import vqarray as vqa

_MAX_DAMP_TRIES = 6


def havq(w, hessian, recipe: VQ, *, damp: float = 0.01) -> VQArray:
    """Hessian-aware VQ of a layer ``w`` [K, N]: minimizes ``tr((w − ŵ)ᵀ H (w − ŵ))`` block by
    block (see the module docstring).

    Args:
      w: float [K, N].
      hessian: [K, K], ``Σ x xᵀ`` over calibration inputs.
      recipe: a ``VQ`` (any format: ``KMeans``, ``E8P``, ``PyramidVQ``, ``Trellis``; rotated or
        not).
      damp: relative damping of the Hessian diagonal (grown tenfold on a failed Cholesky).

    Returns:
      A ``VQArray`` of ``w``'s shape and dtype.

    Example:
      >>> q = havq(w, hessian, VQ(format=E8P(2), rotate=True))   # 2 bits per weight
    """
    w, h = _check_layer(w, hessian)
    if not isinstance(recipe, VQ):
        raise TypeError(f"havq recipe={recipe!r}: expected a VQ.")
    k, n = w.shape
    recipe.check_shape(k, n)
    if not damp >= 0:
        raise ValueError(f"havq damp={damp!r}: expected >= 0.")
    for attempt in range(_MAX_DAMP_TRIES):
        lam = damp * 10**attempt
        q, ok = _havq_jit(w, h, jnp.float32(lam), recipe=recipe)
        if bool(ok):
            return q
    raise ValueError(
        f"hessian: not positive definite even with damping {lam:.3g} x mean diagonal; check "
        "the calibration data."
    )


@functools.partial(jax.jit, static_argnames=("recipe",))
def _havq_jit(w, h, lam, *, recipe: VQ):
    k, n = w.shape
    fmt = recipe.format
    d = fmt.vector_dim
    w2 = w.astype(jnp.float32)
    signs_in = signs_out = None
    if recipe.rotate:
        signs_in, signs_out = vqa.rotation_signs(recipe, k, n)
        s_in = rotation.unpack_signs(signs_in, k)
        s_out = rotation.unpack_signs(signs_out, n)
        w2 = rotation.rotate_weight(w2, s_in, s_out)
        h = rotation.rotate_hessian(h, s_in)
    u, dead = _damped_inverse_factor(h, lam)
    ok = jnp.all(jnp.isfinite(u))
    u = jnp.where(ok, u, jnp.eye(k, dtype=u.dtype))
    w2 = jnp.where(dead[:, None], 0.0, w2)
    g = recipe.group_size or k
    scale = vqa.group_rms_scale(w2, recipe)
    full = vqa.expand_scale(scale, k, g)  # [K, N]
    diag = jnp.where(dead, 0.0, jnp.diag(h))
    codebook = vqa.fit_codebook(
        w2 / full, recipe, jax.random.key(recipe.seed), diag[:, None] * jnp.square(full)
    )
    row_weight = 1.0 / jnp.square(jnp.diag(u))  # GPTQ's error weight of each row
    rows = jnp.arange(k)

    def step(j, carry):
        wt, codes = carry
        r0 = j * d
        block = lax.dynamic_slice_in_dim(wt, r0, d)  # [d, N]
        fb = lax.dynamic_slice_in_dim(full, r0, d)
        weights = lax.dynamic_slice_in_dim(row_weight, r0, d)[:, None] * jnp.square(fb)
        c = vqa.encode_matrix(block / fb, codebook, recipe, weights)  # [1, N, B]
        deq = _decode_block(c, codebook, recipe) * fb  # [d, N]
        ub = lax.dynamic_slice(u, (r0, r0), (d, d))
        e = jax.scipy.linalg.solve_triangular(ub.T, block - deq, lower=True)  # U_BBᵀ E = Δ
        u_rows = lax.dynamic_slice_in_dim(u, r0, d)  # [d, K]
        u_rows = jnp.where(rows[None, :] >= r0 + d, u_rows, 0.0)
        wt = wt - u_rows.T @ e
        codes = lax.dynamic_update_slice_in_dim(codes, c, j, 0)
        return wt, codes

    codes0 = jnp.zeros((k // d, n, fmt.code_bytes), jnp.uint8)
    _, codes = lax.fori_loop(0, k // d, step, (w2, codes0))
    q = VQArray(
        codes=vqa.pack_codes(codes, fmt),
        scale=scale,
        shape=(k, n),
        dtype=np.dtype(w.dtype),
        recipe=recipe,
        codebook=codebook,
        signs_in=signs_in,
        signs_out=signs_out,
    )
    if recipe.refit_scale:
        q = q.replace(scale=hessian_refit_scale(q, w2, h))
    return q, ok


def _decode_block(codes, codebook, recipe: VQ):
    """f32 [d, N]: the unit-space rows of one block's codes [1, N, B]."""
    fmt = recipe.format
    n = codes.shape[1]
    groups = recipe.codebook_groups
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
    g = q.recipe.group_size or k
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
