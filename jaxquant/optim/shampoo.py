"""Shampoo whose Kronecker-factor preconditioners can be stored in 4 bits between steps.

Terminology:
  statistics:    the Kronecker factors of a 2-D gradient ``G [m, n]``: ``L = EMA(G Gᵀ) [m, m]``
                 and ``R = EMA(Gᵀ G) [n, n]``.
  inverse root:  ``(A + damping · I) ** exponent`` of a factor ``A``; exponent −1/4 per side.
  eigenvectors:  ``U`` of ``A = U diag(λ) Uᵀ``. With ``state_bits=4`` a factor and its inverse root
                 are each kept as f32 eigenvalues and ``U`` in 4-bit block-wise codes on the
                 Linear-2 map (``linear2_format``), never as the matrix itself.
  rectify:       Björck orthonormalization of dequantized eigenvectors,
                 ``V ← 1.5 V − 0.5 V Vᵀ V``.
  grafting:      the step of each preconditioned leaf has Shampoo's direction and the Frobenius
                 norm of Adam's (layer-wise grafting).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxquant.numerics.formats import LookupFormat
from jaxquant.numerics.qarray import QArray
from jaxquant.optim import storage as storage_lib
from jaxquant.optim.adam import AdamLeafStep
from jaxquant.optim.state import QuantizedMoment, StateQuantizer, linear_format

STATE_BITS = (32, 4)
GRAFTINGS = ("adam",)
# The options that fix the state's structure: ``optax.inject_hyperparams(shampoo,
# static_args=STATIC_ARGS)`` keeps them Python ints instead of turning them into arrays.
STATIC_ARGS = (
    "state_bits",
    "moment_bits",
    "moment_format",
    "statistics_interval",
    "preconditioner_interval",
    "max_preconditioner_dim",
    "block_size",
    "min_quantized_size",
    "bjorck_iterations",
    "grafting",
)

# The statistics, roots and rectification are sums of many products: XLA's default matmul
# precision on GPU/TPU (TF32 / bf16 passes) would cost the small eigenvalues their accuracy.
_matmul = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)


@functools.cache
def linear2_format(bits: int = 4) -> LookupFormat:
    """The signed Linear-2 map as a ``LookupFormat`` (``state.linear_format(True, bits, 2)``,
    label ``linear4s_p2``): the values ``sign(t) · t²``, ``t = −1 + 2j / (2**bits − 1)``,
    ``j = 0 .. 2**bits − 1`` (no 0, ±1 included). See ``maps.linear_map``."""
    return linear_format(True, bits, 2)


def quantize_eigenvectors(u: jax.Array, block_size: int = 64) -> QArray:
    """Quantizes a matrix block-wise onto the 4-bit Linear-2 map.

    ``u`` is flattened (row-major), zero-padded to whole blocks of ``block_size`` and quantized
    with one f32 absmax scale per block: ``code = argmin_i |m_i − x / s|``, ``s = max |x|``
    (``StateQuantizer(linear2_format(), block_size)``'s codes). The map has no 0, so an exact
    0 reads back as ``−(1/15)² · s`` (ties go to the lower code); padding never raises a
    block's scale and is dropped by ``dequantize_eigenvectors``.

    Args:
      u: float [d, d] (any shape works), cast to f32.
      block_size: elements per absmax scale.

    Returns:
      A 1-D QArray of ``ceil(u.size / block_size) * block_size`` 4-bit codes (half as many
      bytes) and as many f32 scales as blocks.

    Example:
      >>> q = quantize_eigenvectors(jnp.linalg.eigh(a)[1])      # a: [96, 96]
      >>> q.nbytes                                              # 144 · (32 + 4) = 5184
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"quantize_eigenvectors block_size={block_size!r}: expected an int >= 1.")
    return StateQuantizer(linear2_format(), block_size).quantize(u).q


def dequantize_eigenvectors(q: QArray, dim: int) -> jax.Array:
    """f32 [dim, dim] from ``quantize_eigenvectors``' codes (padding dropped)."""
    return q.dequantize(jnp.float32)[: dim * dim].reshape(dim, dim)


def bjorck(v: jax.Array, iterations: int = 1) -> jax.Array:
    """``iterations`` Björck steps ``V ← 1.5 V − 0.5 V (Vᵀ V)`` toward the nearest orthogonal
    matrix (each step maps a singular value ``σ`` to ``1.5 σ − 0.5 σ³``; it converges for
    ``0 < σ < √3``).

    References:
      Björck & Bowie, "An iterative algorithm for computing the best estimate of an orthogonal
      matrix", SIAM J. Numer. Anal. 8(2), 1971. Wang et al., arXiv:2405.18144, Sec. 4.
    """
    for _ in range(iterations):
        v = 1.5 * v - 0.5 * _matmul(v, _matmul(v.T, v))
    return v


class MatrixFactor(NamedTuple):
    """One Kronecker factor kept in f32."""

    statistics: jax.Array  # f32 [d, d]
    inverse_root: jax.Array  # f32 [d, d]


class EigenFactor(NamedTuple):
    """One Kronecker factor and its inverse root, each as f32 eigenvalues and 4-bit
    eigenvectors (``quantize_eigenvectors``): ``A ≈ V diag(eigenvalues) Vᵀ`` with ``V`` the
    rectified dequantized ``eigenvectors``, likewise the root."""

    eigenvalues: jax.Array  # f32 [d], descending
    eigenvectors: QArray  # 4-bit [ceil(d² / block_size) · block_size]
    root_eigenvalues: jax.Array  # f32 [d]
    root_eigenvectors: QArray  # 4-bit, as eigenvectors


class ScaleByShampooState(NamedTuple):
    """State of ``scale_by_shampoo``. ``mu`` and ``nu`` mirror the params' tree (f32, or as
    ``moment_bits`` stores them);
    ``preconditioners`` has, per leaf, ``(left, right)`` factors (``MatrixFactor`` or
    ``EigenFactor`` each) or ``()`` for a leaf that Adam alone updates."""

    count: jax.Array  # int32 []
    mu: optax.Updates
    nu: optax.Updates
    preconditioners: optax.Updates


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_args(
    beta_precond,
    matrix_eps,
    exponent,
    statistics_interval,
    preconditioner_interval,
    max_preconditioner_dim,
    state_bits,
    block_size,
    min_quantized_size,
    bjorck_iterations,
    grafting,
) -> None:
    if not _is_int(state_bits) or state_bits not in STATE_BITS:
        raise ValueError(f"state_bits={state_bits!r}: expected 32 or 4.")
    for name, value, low in (
        ("statistics_interval", statistics_interval, 1),
        ("preconditioner_interval", preconditioner_interval, 1),
        ("max_preconditioner_dim", max_preconditioner_dim, 1),
        ("block_size", block_size, 1),
        ("min_quantized_size", min_quantized_size, 0),
        ("bjorck_iterations", bjorck_iterations, 0),
    ):
        if not _is_int(value) or value < low:
            raise ValueError(f"{name}={value!r}: expected an int >= {low}.")
    if grafting not in GRAFTINGS:
        raise ValueError(f"grafting={grafting!r}: expected one of {GRAFTINGS}.")
    # Floats are checked when they are Python numbers; optax.inject_hyperparams may pass arrays.
    if _is_number(beta_precond) and not 0 <= beta_precond < 1:
        raise ValueError(f"beta_precond={beta_precond!r}: expected 0 <= beta_precond < 1.")
    if _is_number(matrix_eps) and not matrix_eps > 0:
        raise ValueError(f"matrix_eps={matrix_eps!r}: expected a positive float.")
    if _is_number(exponent) and not exponent < 0:
        raise ValueError(f"exponent={exponent!r}: expected a negative float such as -0.25.")


def scale_by_shampoo(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    beta_precond: float = 0.95,
    matrix_eps: float = 1e-6,
    exponent: float = -0.25,
    statistics_interval: int = 1,
    preconditioner_interval: int = 10,
    max_preconditioner_dim: int = 1024,
    state_bits: int = 32,
    block_size: int = 64,
    min_quantized_size: int = 4096,
    bjorck_iterations: int = 1,
    grafting: str = "adam",
    moment_bits: int = 32,
    moment_format: str | None = None,
) -> optax.GradientTransformation:
    """Shampoo's Kronecker-factored direction with Adam's layer-wise step size; 32- or 4-bit
    preconditioners.

    With ``g`` the gradient [m, n] and ``t`` the step (from 1), every leaf keeps Adam's moments
    (f32, diagonal)::

        mu = b1 · mu + (1 − b1) · g,      nu = b2 · nu + (1 − b2) · g²
        m̂ = mu / (1 − b1**t),             a = m̂ / (sqrt(nu / (1 − b2**t)) + eps)

    A 2-D leaf with ``2 <= m, n <= max_preconditioner_dim`` also keeps its Kronecker factors::

        L = β · L + (1 − β) · g gᵀ,  R = β · R + (1 − β) · gᵀ g     when (t − 1) % T1 == 0
        L̂ = (L + ε λmax(L) I) ** exponent, likewise R̂              when (t − 1) % T2 == 0
        d = L̂ m̂ R̂,                       u = d · ‖a‖_F / ‖d‖_F

    with ``β = beta_precond``, ``ε = matrix_eps`` (damping relative to the largest eigenvalue,
    so it is invariant to the gradient's scale), ``T1 = statistics_interval`` and
    ``T2 = preconditioner_interval``. Every other leaf (1-D, >= 3-D, a dimension of 1 or above
    ``max_preconditioner_dim``) gets Adam's ``u = a``, exactly ``optax.scale_by_adam``. The
    factors start at 0 and the roots at the identity; both are first computed at step 1, so
    every step of a preconditioned leaf uses Shampoo's direction (its first step is the
    orthogonalized momentum ``U Vᵀ`` of ``m̂ = U S Vᵀ``, at Adam's norm).

    Momentum: 4-bit Shampoo grafts the preconditioned gradient to the gradient's norm and
    hands it to a first-order optimizer ``F`` (SGDM or AdamW), whose momentum averages the
    preconditioned directions. Here, as in distributed Shampoo (arXiv:2309.06497, Sec. 3.1),
    the graft is Adam's and so is the first moment: ``m̂``, the momentum of the gradient, is
    what is preconditioned. One ``mu`` serves both directions, and between two root
    recomputations ``L̂ m̂ R̂`` is exactly the momentum of the preconditioned gradients. The
    statistics use the raw gradient.

    ``state_bits=32`` keeps ``L``, ``R``, ``L̂``, ``R̂`` as f32 matrices; roots by ``eigh``.
    ``state_bits=4`` (the paper's method, Sec. 4) keeps each factor and each root as f32
    eigenvalues plus eigenvectors in 4 bits (``quantize_eigenvectors``: Linear-2 map, one f32
    absmax per ``block_size`` elements). Each use dequantizes and rectifies the eigenvectors
    with ``bjorck_iterations`` Björck steps (``V``). A statistics step rebuilds
    ``A = V diag(λ) Vᵀ``, adds ``(1 − β) g gᵀ`` to ``β A``, and refreshes the eigenbasis by one
    step of subspace iteration warm-started from ``V``: ``Q = qr(A V)``,
    ``λ = diag(Qᵀ A Q)`` (Rayleigh quotients), columns sorted by descending ``λ``, then ``Q``
    is requantized. The first statistics step (all ``λ`` still 0, no basis to start from)
    takes ``eigh`` instead. A root step stores ``(max(λ, 0) + ε λmax) ** exponent`` with a
    copy of the factor's eigenvector codes; the root applied is
    ``V diag(root eigenvalues) Vᵀ``. (The paper stores the root as its f32 diagonal and 4-bit
    off-diagonal; eigenvalues plus codes take the same memory and add no second rounding.) A
    factor with fewer than ``min_quantized_size`` elements (``d²``) stays f32.

    Measured costs of the 4 bits (tests/optim/test_shampoo.py): one quantize-rectify of exact
    eigenvectors puts the inverse root 5% (Frobenius) from f32's; re-quantizing the basis at
    every statistics update lets it drift to 12–14%, since only the ``(1 − β)`` share of each
    new gradient pulls it back. One Björck step leaves all singular values of ``V`` at or below
    1, so each rebuild shrinks ``A`` slightly (the statistics forget as with a smaller ``β``;
    two steps remove it). An exact 0 in an eigenvector matrix (e.g. of a diagonal ``A``) reads
    back as ``−0.0044 · s``: the map has no 0.

    The intervals are ``lax.cond`` on the step count, so one jitted update serves every step.
    Arithmetic is f32 with full-precision matmuls; the update has the gradient's dtype.

    Args:
      b1: decay of Adam's first moment (the momentum that is preconditioned).
      b2: decay of Adam's second moment (the graft).
      eps: added to Adam's denominator outside the square root.
      beta_precond: decay ``β`` of the Kronecker statistics.
      matrix_eps: damping ``ε`` of ``L`` and ``R``, relative to their largest eigenvalue.
      exponent: the inverse root of each side, −1/4 for a 2-D leaf (Shampoo's ``−1 / (2k)``).
      statistics_interval: ``T1``, steps between updates of ``L`` and ``R`` (and, at 4 bits,
        of their eigenbases).
      preconditioner_interval: ``T2``, steps between recomputations of the inverse roots.
      max_preconditioner_dim: larger dimensions fall back to Adam.
      state_bits: 32 or 4.
      block_size: elements per absmax scale of 4-bit eigenvectors.
      min_quantized_size: factors with fewer elements stay f32 at ``state_bits=4``.
      bjorck_iterations: Björck steps after each dequantization (0 turns rectification off).
      grafting: ``'adam'``.
      moment_bits: storage of Adam's ``mu`` and ``nu`` (the momentum and the graft): 32, or 8
        / 4 with ``moment_format`` as ``adam.scale_by_adam``'s ``state_bits`` /
        ``state_format`` (``storage.RECIPES``); independent of ``state_bits``, which is the
        preconditioners'.
      moment_format: the recipe at ``moment_bits`` (None: its default).

    Returns:
      An ``optax.GradientTransformation`` with ``ScaleByShampooState``.

    Example:
      >>> opt = scale_by_shampoo(state_bits=4, min_quantized_size=0)
      >>> state = opt.init({"w": jnp.zeros((96, 128))})
      >>> state.preconditioners["w"][0].eigenvectors.bits_per_weight   # 4 + 32 / 64 = 4.5

    References:
      Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization",
      arXiv:1802.09568, Alg. 1. Wang, Zhou, Li & Huang, "4-bit Shampoo for Memory-Efficient
      Network Training", arXiv:2405.18144, Sec. 3 (Shampoo with grafting, intervals T1 and
      T2) and Sec. 4 (quantizing the eigenvector matrix, orthogonal rectification by Björck
      iterations, the linear square map).
      Shi et al., "A Distributed Data-Parallel PyTorch Implementation of the Distributed
      Shampoo Optimizer", arXiv:2309.06497, Sec. 3.1 (Adam grafting, first moment).
    """
    _check_args(
        beta_precond,
        matrix_eps,
        exponent,
        statistics_interval,
        preconditioner_interval,
        max_preconditioner_dim,
        state_bits,
        block_size,
        min_quantized_size,
        bjorck_iterations,
        grafting,
    )

    try:
        moments = storage_lib.moment_storage(moment_bits, moment_format)
    except ValueError as e:
        raise ValueError(
            f"scale_by_shampoo moment_bits={moment_bits!r}, moment_format={moment_format!r} "
            f"(the Adam moments' storage): {e}"
        ) from e

    adam_step = AdamLeafStep(moments, b1, b2, eps)

    def preconditioned(shape) -> bool:
        return len(shape) == 2 and 2 <= min(shape) and max(shape) <= max_preconditioner_dim

    def quantized(dim: int) -> bool:
        return state_bits == 4 and dim * dim >= min_quantized_size

    def init_factor(dim: int):
        eye = jnp.eye(dim, dtype=jnp.float32)
        if quantized(dim):
            q = quantize_eigenvectors(eye, block_size)
            ones = jnp.ones([dim], jnp.float32)
            return EigenFactor(jnp.zeros([dim], jnp.float32), q, ones, q)
        return MatrixFactor(jnp.zeros([dim, dim], jnp.float32), eye)

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        pre = [
            (init_factor(p.shape[0]), init_factor(p.shape[1])) if preconditioned(p.shape) else ()
            for p in leaves
        ]
        return ScaleByShampooState(
            count=jnp.zeros([], jnp.int32),
            mu=adam_step.init_first(params),
            nu=adam_step.init_second(params),
            preconditioners=treedef.unflatten(pre),
        )

    def damped_root(eigenvalues):
        lam = jnp.maximum(eigenvalues, 0.0)
        top = jnp.max(lam)
        # An all-zero factor (no gradient yet) gets the identity, not an infinite root.
        damping = matrix_eps * jnp.where(top > 0, top, 1.0)
        return (lam + damping) ** exponent

    def rectified(q: QArray, dim: int):
        return bjorck(dequantize_eigenvectors(q, dim), bjorck_iterations)

    def update_matrix_factor(f: MatrixFactor, outer, do_stats, do_root):
        stats = jnp.where(
            do_stats, beta_precond * f.statistics + (1 - beta_precond) * outer, f.statistics
        )

        def root(stats):
            lam, v = jnp.linalg.eigh(stats)
            return _matmul(v * damped_root(lam), v.T)

        inverse_root = lax.cond(do_root, root, lambda _: f.inverse_root, stats)
        return MatrixFactor(stats, inverse_root), inverse_root

    def update_eigen_factor(f: EigenFactor, outer, do_stats, do_root):
        dim = f.eigenvalues.shape[0]

        def subspace_iteration(a, v):
            # One step from the stored basis; sorting by descending Rayleigh quotient keeps
            # the dominant directions first, where QR leaves them.
            q, _ = jnp.linalg.qr(_matmul(a, v))
            return jnp.sum(q * _matmul(a, q), axis=0), q

        def statistics(f):
            v = rectified(f.eigenvectors, dim)
            a = beta_precond * _matmul(v * f.eigenvalues, v.T) + (1 - beta_precond) * outer
            # A factor that is still 0 has no basis to warm-start from: take eigh once.
            cold = jnp.all(f.eigenvalues == 0)
            lam, q = lax.cond(
                cold, lambda a, v: tuple(jnp.linalg.eigh(a)), subspace_iteration, a, v
            )
            order = jnp.argsort(-lam)
            return f._replace(
                eigenvalues=lam[order],
                eigenvectors=quantize_eigenvectors(q[:, order], block_size),
            )

        def root(f):
            return f._replace(
                root_eigenvalues=damped_root(f.eigenvalues), root_eigenvectors=f.eigenvectors
            )

        f = lax.cond(do_stats, statistics, lambda f: f, f)
        f = lax.cond(do_root, root, lambda f: f, f)
        v = rectified(f.root_eigenvectors, dim)
        return f, _matmul(v * f.root_eigenvalues, v.T)

    def update_factor(f, outer, do_stats, do_root):
        if isinstance(f, EigenFactor):
            return update_eigen_factor(f, outer, do_stats, do_root)
        return update_matrix_factor(f, outer, do_stats, do_root)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        do_stats = (count - 1) % statistics_interval == 0
        do_root = (count - 1) % preconditioner_interval == 0

        grads, treedef = jax.tree.flatten(updates)
        is_stored = lambda x: isinstance(x, (QuantizedMoment, storage_lib.FactoredMoment))  # noqa: E731
        mus = jax.tree.leaves(state.mu, is_leaf=is_stored)
        nus = jax.tree.leaves(state.nu, is_leaf=is_stored)
        pres = treedef.flatten_up_to(state.preconditioners)
        out_u, out_mu, out_nu, out_pre = [], [], [], []
        keys = jax.tree.leaves(moments.keys(updates, count), is_leaf=lambda x: x is None)
        for g, mu, nu, pre, key in zip(grads, mus, nus, pres, keys, strict=True):
            g32 = g.astype(jnp.float32)
            # Adam's step (the graft) and its first moment m̂, which Shampoo preconditions.
            u, m_hat, mu_stored, nu_stored = adam_step(g32, mu, nu, count, key)
            if pre:
                left, root_l = update_factor(pre[0], _matmul(g32, g32.T), do_stats, do_root)
                right, root_r = update_factor(pre[1], _matmul(g32.T, g32), do_stats, do_root)
                d = _matmul(_matmul(root_l, m_hat), root_r)
                d_norm = jnp.linalg.norm(d)
                # Grafting: Shampoo's direction at Adam's Frobenius norm (0 for a zero d).
                u = d * jnp.where(d_norm > 0, jnp.linalg.norm(u) / d_norm, 0.0)
                pre = (left, right)
            out_u.append(u.astype(g.dtype))
            out_mu.append(mu_stored)
            out_nu.append(nu_stored)
            out_pre.append(pre)
        new_state = ScaleByShampooState(
            count=count,
            mu=treedef.unflatten(out_mu),
            nu=treedef.unflatten(out_nu),
            preconditioners=treedef.unflatten(out_pre),
        )
        return treedef.unflatten(out_u), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    state_bits: int = 32,
    mask=None,
    beta_precond: float = 0.95,
    matrix_eps: float = 1e-6,
    exponent: float = -0.25,
    statistics_interval: int = 1,
    preconditioner_interval: int = 10,
    max_preconditioner_dim: int = 1024,
    block_size: int = 64,
    min_quantized_size: int = 4096,
    bjorck_iterations: int = 1,
    grafting: str = "adam",
    moment_bits: int = 32,
    moment_format: str | None = None,
) -> optax.GradientTransformation:
    """Shampoo with Adam grafting and decoupled weight decay: ``scale_by_shampoo``,
    ``optax.add_decayed_weights``, −lr.

    ``p ← p − lr_t · (u + weight_decay · p)`` with ``u`` from ``scale_by_shampoo``; the
    arguments shared with ``jaxquant.optim.adamw`` have its names and defaults, so a trainer
    swaps one for the other. The options are spelled out (no ``**kwargs``) so that
    ``optax.inject_hyperparams(shampoo, static_args=STATIC_ARGS)`` can bind them (the int
    options fix the state's structure, so they must stay Python ints).

    Args:
      learning_rate: a float or an optax schedule of the step.
      b1, b2, eps: Adam's decays and denominator constant (the momentum and the graft).
      weight_decay: decoupled weight decay.
      state_bits: 32 (f32 preconditioners) or 4 (4-bit eigenvectors, f32 eigenvalues).
      mask: as ``optax.add_decayed_weights``: which leaves decay.
      beta_precond, matrix_eps, exponent, statistics_interval, preconditioner_interval,
        max_preconditioner_dim, block_size, min_quantized_size, bjorck_iterations, grafting,
        moment_bits, moment_format: as ``scale_by_shampoo``.

    Returns:
      An ``optax.GradientTransformation``; its state is a tuple whose first element is the
      ``ScaleByShampooState``.

    Example:
      >>> opt = shampoo(optax.cosine_decay_schedule(1e-3, 10_000), state_bits=4)
      >>> state = opt.init(params)

    References:
      Wang et al., "4-bit Shampoo for Memory-Efficient Network Training", arXiv:2405.18144.
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101.
    """
    return optax.chain(
        scale_by_shampoo(
            b1,
            b2,
            eps,
            beta_precond=beta_precond,
            matrix_eps=matrix_eps,
            exponent=exponent,
            statistics_interval=statistics_interval,
            preconditioner_interval=preconditioner_interval,
            max_preconditioner_dim=max_preconditioner_dim,
            state_bits=state_bits,
            block_size=block_size,
            min_quantized_size=min_quantized_size,
            bjorck_iterations=bjorck_iterations,
            grafting=grafting,
            moment_bits=moment_bits,
            moment_format=moment_format,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
