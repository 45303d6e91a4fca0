"""Input Hessians of a layer: checking, damping, and the output error they measure.

Terminology (Flax layout: a weight ``w`` is ``[K, N]``, K inputs contracted, N outputs):
  hessian:     ``H = Σ x xᵀ`` over calibration inputs, f32 ``[K, K]``. A quantized ``ŵ``
               changes the layer's outputs by ``tr((w − ŵ)ᵀ H (w − ŵ))`` in total.
  dead input:  an input with ``H_kk = 0`` (always zero in calibration): the calibration data
               says nothing about its weights. Its diagonal entry is set to 1 (it stays
               uncoupled from the other inputs, so its weights are rounded to nearest and
               no error is pushed onto them) and ``damp_hessian`` warns. GPTQ's reference
               zeroes those weights; we keep them, since an input that calibration never
               exercised can still be nonzero in use.
  damping:     ``λ = damp · 10^i · mean(diag H)`` added to the diagonal, for the smallest
               ``i < max_tries`` that makes the float32 Cholesky factorization succeed (GPTQ's
               reference damps by ``damp · mean(diag H)``; the retries cover Hessians that are
               singular in float32, e.g. from fewer calibration tokens than inputs).

``damp_hessian`` is the one place that damping happens: GPTQ, Babai's nearest plane and
Hessian-aware VQ all start from its result.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

MAX_DAMP_TRIES = 6


@dataclasses.dataclass(frozen=True)
class DampedHessian:
    """A Hessian made positive definite, and GPTQ's factor of it.

    Attributes:
      revived: f32 ``[K, K]``, the Hessian with dead inputs set to 1 on the diagonal.
      dead: bool ``[K]``, the inputs with a zero diagonal in the original Hessian.
      damping: the absolute amount ``λ`` added to the diagonal.
      inverse_factor: f32 ``[K, K]``, ``U`` upper triangular with ``P⁻¹ = Uᵀ U`` for
        ``P = matrix[order][:, order]`` (the order ``damp_hessian`` was given, the input
        order by default).
    """

    revived: jax.Array
    dead: jax.Array
    damping: float
    inverse_factor: jax.Array

    @property
    def matrix(self) -> jax.Array:
        """f32 ``[K, K]``: ``revived`` with ``damping`` added to the diagonal (computed on
        use: GPTQ needs only the factor)."""
        return _add_diagonal(self.revived, jnp.float32(self.damping))


def check_hessian(hessian, k: int, name: str = "hessian") -> jax.Array:
    """f32 ``[k, k]`` from ``hessian``; a ValueError for another shape or for NaN/Inf (concrete
    arrays only)."""
    h = jnp.asarray(hessian, jnp.float32)
    if h.shape != (k, k):
        raise ValueError(f"{name}: expected shape {(k, k)} (inputs squared), got {h.shape}.")
    if not isinstance(h, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(h))):
        raise ValueError(f"{name}: contains NaN or Inf.")
    return h


@jax.jit
def _revive(h):
    """Dead inputs (zero diagonal) set to 1 on the diagonal; the mean of the new diagonal."""
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    return h, dead, jnp.mean(jnp.diag(h))


@jax.jit
def _reversed_cholesky(h, lam, order):
    """The lower Cholesky factor of ``J (P + λI) J`` for ``P = h[order][:, order]`` (NaN where
    ``P + λI`` is not positive definite in float32), and whether it is finite."""
    hp = h if order is None else h[order][:, order]
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    m = jnp.linalg.cholesky((hp + lam * eye)[::-1, ::-1])
    return m, jnp.all(jnp.isfinite(m))


@jax.jit
def _inverse_factor(m):
    """``U = J M⁻¹ J`` from the reversed Cholesky factor ``M`` (``damp_hessian``)."""
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    return jax.scipy.linalg.solve_triangular(m, eye, lower=True)[::-1, ::-1]


@jax.jit
def _add_diagonal(h, lam):
    return h + lam * jnp.eye(h.shape[0], dtype=h.dtype)


def damp_hessian(
    hessian, damp: float = 0.01, *, order=None, max_tries: int = MAX_DAMP_TRIES
) -> DampedHessian:
    """Dead inputs fixed and the smallest damping of ``damp · 10^i · mean(diag H)``,
    ``i = 0 .. max_tries − 1``, that makes ``H`` positive definite in float32; with GPTQ's
    inverse factor of it, reordered by ``order``.

    Args:
      hessian: f32 ``[K, K]``, symmetric positive semi-definite.
      damp: relative damping, ≥ 0.
      order: a permutation of ``range(K)``: the factor is of ``H[order][:, order]`` (GPTQ's
        row order); default the input order.
      max_tries: how many tenfold increases to try.

    GPTQ's reference computes ``chol(H)``, then ``H⁻¹``, then ``chol(H⁻¹)`` for ``U``. One
    Cholesky factor of the reversed matrix does it: with ``J`` the reversal, ``J H J = M Mᵀ``
    (M lower) gives ``H = V Vᵀ`` with ``V = J M J`` upper, so ``H⁻¹ = V⁻ᵀ V⁻¹`` and
    ``U = V⁻¹ = J M⁻¹ J``: a Cholesky (the same that tests definiteness) and a triangular
    inverse, ``2k³/3`` flops against ``4k³/3``, and no explicit inverse to lose precision in
    float32.

    Returns:
      A ``DampedHessian``.

    Raises:
      ValueError: when even the largest damping leaves ``H`` indefinite (NaN or negative
        eigenvalues: the calibration data is broken).
    """
    if not (isinstance(damp, (int, float, np.floating)) and damp >= 0):
        raise ValueError(f"damp={damp!r}: expected a number >= 0.")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries={max_tries!r}: expected an int >= 1.")
    h = jnp.asarray(hessian, jnp.float32)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian: expected a square [K, K] matrix, got shape {h.shape}.")
    k = h.shape[0]
    if order is not None:
        order = np.asarray(order)
        if order.shape != (k,) or not np.array_equal(np.sort(order), np.arange(k)):
            raise ValueError(f"order: expected a permutation of range({k}), got {order!r}.")
        # the input order needs no [K, K] gather
        order = None if np.array_equal(order, np.arange(k)) else jnp.asarray(order, jnp.int32)
    h, dead, mean_diag = _revive(h)
    num_dead = int(jnp.sum(dead))
    if num_dead:
        which = np.flatnonzero(np.asarray(dead))
        shown = ", ".join(str(i) for i in which[:8]) + (", ..." if num_dead > 8 else "")
        warnings.warn(
            f"hessian: {num_dead} of {k} inputs are dead (zero diagonal: always zero in the "
            f"calibration data; inputs {shown}); their weights are kept and rounded to "
            "nearest. "
            + (
                "The Hessian is all zero: nothing was learned from calibration; check that "
                "the calibration inputs reach this layer."
                if num_dead == k
                else "Calibrate on data that exercises them to quantize them Hessian-aware."
            ),
            stacklevel=2,
        )
    # The Cholesky factor that tests positive definiteness is the one GPTQ needs (of the
    # reversed, reordered matrix): one factorization per try, none repeated. The retries run
    # from Python (the common case is one try; a traced loop would copy [K, K] state).
    for i in range(max_tries):
        lam = jnp.float32(damp * 10.0**i) * mean_diag
        m, ok = _reversed_cholesky(h, lam, order)
        if bool(ok):
            return DampedHessian(h, dead, float(lam), _inverse_factor(m))
    raise ValueError(
        f"hessian: not positive definite even with damping {float(lam):.3g} ({damp} x "
        f"10^{max_tries - 1} x mean diagonal); check the calibration data."
    )


def layer_error(w, w_hat, hessian) -> jax.Array:
    """``tr((w − ŵ)ᵀ H (w − ŵ)) / tr(wᵀ H w)``: a layer's relative output error.

    Args:
      w: float ``[K, N]``.
      w_hat: the quantized weight: an array ``[K, N]`` or anything with ``dequantize()`` (a
        ``QArray`` or ``VQArray`` of that shape).
      hessian: ``[K, K]``.

    Returns:
      f32 scalar.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"layer_error w: expected [K, N], got shape {w.shape}.")
    h = check_hessian(hessian, w.shape[0])
    w_hat = w_hat.dequantize(jnp.float32) if hasattr(w_hat, "dequantize") else w_hat
    w_hat = jnp.asarray(w_hat, jnp.float32).reshape(w.shape)
    d = w - w_hat
    return jnp.sum(d * (h @ d)) / jnp.sum(w * (h @ w))
