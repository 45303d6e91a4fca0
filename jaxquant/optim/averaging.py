"""Weight averaging for horizon-free ("anytime") training, and the schedules that pair with it.

A cosine schedule needs the total number of steps in advance; stop it early and the weights
are far from annealed. Meterez et al. (arXiv:2602.03702) train with a constant or a 1/√t
learning rate, which never needs a horizon, and evaluate an average of the iterates, which
removes the noise that annealing would otherwise remove: at every step the average's loss is
comparable to that of a cosine schedule tuned to end at that step.

Terminology:
  t:          updates applied so far, this one included (1 after the first ``update``).
  iterate:    θ_t, the params after update t (``params + updates`` of that step).
  average:    θ̄_t, the averaged weights after update t; θ̄_0 is the params given to ``init``.
  weight:     the coefficient of θ_s in θ̄_t (the weights of θ̄_0 … θ̄_t sum to 1).
  half-life:  how many steps back an iterate's weight is half that of the newest iterate.
  averager:   an ``Averager``: ``init(params, dtype) -> state``, ``update(iterate, state) ->
              state``; the state's ``average()`` returns θ̄_t.

Usage: wrap the whole optimizer, so that the updates it sees are the final ones::

    opt = with_averaging(optax.adamw(inverse_sqrt_schedule(3e-3, 5_000)), ema_growing())
    ...
    eval_params = averaged_params(opt_state)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = [
    "Averager",
    "EmaState",
    "LawaState",
    "WithAveragingState",
    "averaged_params",
    "constant_schedule",
    "ema",
    "ema_growing",
    "inverse_sqrt_schedule",
    "lawa",
    "with_averaging",
]

# The paper's main figure evaluates "EMA-25": old-weight coefficient 2**(-25 / t), a half-life
# of t / 25 steps (4% of the steps taken so far).
PAPER_HALF_LIFE_FRACTION = 1 / 25


class Averager(NamedTuple):
    """A weight averager: pure functions of pytrees, jittable, lax ops only.

    Attributes:
      init: ``(params, dtype) -> state``; the state's average starts at ``params`` (as
        ``dtype``).
      update: ``(iterate, state) -> state``; folds in the params after this step's update.
    """

    init: Callable[[optax.Params, Any], Any]
    update: Callable[[optax.Params, Any], Any]


class EmaState(NamedTuple):
    """State of ``ema`` / ``ema_growing``: the average itself, in the storage dtype."""

    count: jax.Array  # int32 []
    ema: optax.Params  # like params, storage dtype

    def average(self) -> optax.Params:
        return self.ema


class LawaState(NamedTuple):
    """State of ``lawa``: a ring buffer of the last k snapshots.

    Snapshot j (1-based) lives in slot ``(j − 1) % k``; before the first one, slot 0 holds the
    params given to ``init``.
    """

    count: jax.Array  # int32 []: updates seen
    num_snapshots: jax.Array  # int32 []: snapshots taken
    snapshots: optax.Params  # each leaf [k, *shape], storage dtype

    def average(self) -> optax.Params:
        """The mean of the ``min(max(num_snapshots, 1), k)`` filled slots, in f32 arithmetic,
        returned in the storage dtype."""

        def mean(buf):
            k = buf.shape[0]
            n = jnp.clip(self.num_snapshots, 1, k)
            filled = (jnp.arange(k) < n).reshape((k,) + (1,) * (buf.ndim - 1))
            total = jnp.sum(jnp.where(filled, buf.astype(jnp.float32), 0.0), axis=0)
            return (total / n.astype(jnp.float32)).astype(buf.dtype)

        return jax.tree.map(mean, self.snapshots)


class WithAveragingState(NamedTuple):
    """State of ``with_averaging``: the inner optimizer's state and the averager's."""

    inner_state: optax.OptState
    averager_state: Any


# ---------------------------------------------------------------- argument checks


def _check_real(name: str, value, expected: str = "", ok=lambda v: True) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite real number with ``ok(value)``."""
    real = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (real and ok(value)):
        raise ValueError(f"{name}={value!r}: expected a finite real number{expected}.")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}.")


def _check_dtype(dtype) -> None:
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(f"dtype={dtype!r}: expected a floating dtype such as jnp.float32.")


# ---------------------------------------------------------------- averagers


def _ema_averager(weight: Callable[[jax.Array], jax.Array]) -> Averager:
    """An EMA whose new-iterate weight at step t is ``weight(t)`` (f32 [])."""

    def init(params, dtype=jnp.float32):
        # A copy (jnp.array copies): the state must not alias params a caller may donate.
        ema = jax.tree.map(lambda p: jnp.array(p, dtype=dtype), params)
        return EmaState(count=jnp.zeros([], jnp.int32), ema=ema)

    def update(iterate, state):
        count = optax.safe_increment(state.count)
        w = weight(count)

        def step(avg, p):
            # θ̄ + w·(θ − θ̄) in f32: the increment stays accurate when w is ~1e-6.
            avg32 = avg.astype(jnp.float32)
            return (avg32 + w * (p.astype(jnp.float32) - avg32)).astype(avg.dtype)

        return EmaState(count=count, ema=jax.tree.map(step, state.ema, iterate))

    return Averager(init, update)


def ema_growing(half_life_fraction: float = PAPER_HALF_LIFE_FRACTION) -> Averager:
    """An exponential moving average whose half-life grows in proportion to the step.

    With ``f = half_life_fraction`` and t the update count (from 1)::

        β_t = 2 ** (−1 / (f · t))            (old-weight coefficient)
        θ̄_t = β_t · θ̄_{t−1} + (1 − β_t) · θ_t

    so the half-life at step t is ``−ln 2 / ln β_t = f · t`` steps: a fixed fraction of the
    run so far, whatever its length, which is what makes it horizon-free. For large t,
    ``1 − β_t ≈ ln 2 / (f · t)``: a polynomial-decay average, ``f = ln 2`` being close to the
    uniform (Polyak) average. At t = 1, β_1 = 2**(−1/f) (3·10⁻⁸ by default), so θ̄_0 hardly
    matters. The increment ``1 − β_t`` is computed as ``−expm1(−ln 2 / (f·t))``.

    Args:
      half_life_fraction: f > 0, the half-life as a fraction of t. The default 1/25 (a 4%
        half-life) is the paper's "EMA-25", used for its main results; it also evaluates
        1/6.25, 1/12.5, 1/50 and 1/100.

    Returns:
      An ``Averager`` with ``EmaState`` (one copy of the params).

    Example:
      >>> opt = with_averaging(optax.adamw(constant_schedule(3e-3, 5_000)), ema_growing())

    References:
      Meterez, Nair, Morwani, Pehlevan, Kakade, "Anytime Pretraining: Horizon-Free
      Learning-Rate Schedules with Weight Averaging", arXiv:2602.03702 (EMA coefficient
      2^(−γ/t) with γ = 1/f, as in the authors' released code).
    """
    _check_real("half_life_fraction", half_life_fraction, " > 0", lambda v: v > 0)
    rate = math.log(2) / half_life_fraction

    def weight(count):
        return -jnp.expm1(-rate / count.astype(jnp.float32))

    return _ema_averager(weight)


def ema(decay: float) -> Averager:
    """A constant-decay exponential moving average of the iterates, for comparison.

    ::

        θ̄_t = decay · θ̄_{t−1} + (1 − decay) · θ_t,      θ̄_0 = the params given to init

    Its half-life is fixed at ``−ln 2 / ln decay`` steps, so it must be tuned to the run's
    length. No bias correction: the average starts at the initial params, not at zero.

    Args:
      decay: in [0, 1); 0 tracks the last iterate.

    Returns:
      An ``Averager`` with ``EmaState`` (one copy of the params).

    Example:
      >>> opt = with_averaging(optax.sgd(1e-2), ema(0.999))

    References:
      The fixed-horizon baseline of Meterez et al., arXiv:2602.03702, which ``ema_growing``
      replaces.
    """
    _check_real("decay", decay, " in [0, 1)", lambda v: 0 <= v < 1)
    w = 1.0 - decay
    return _ema_averager(lambda count: jnp.float32(w))


def lawa(k: int, every: int) -> Averager:
    """LAWA: the uniform average of the last k snapshots, one taken every ``every`` steps.

    Snapshots are the iterates θ_t at t = every, 2·every, …; with n = ⌊t / every⌋ taken::

        θ̄_t = (1 / m) · Σ_{j = n−m+1}^{n} θ_{j·every},     m = min(n, k)

    Before the buffer is full (n < k) the average is over the n snapshots taken so far; before
    the first snapshot (t < every) it is the params given to ``init``. The snapshots sit in a
    ring buffer: **memory is k copies of the params** (in the storage dtype; the mean is taken
    in f32 when it is read). Each step reads and writes one slot
    (``lax.dynamic_update_index_in_dim``), whether or not it takes a snapshot.

    Args:
      k: snapshots averaged, >= 1.
      every: steps between snapshots, >= 1.

    Returns:
      An ``Averager`` with ``LawaState``.

    Example:
      >>> opt = with_averaging(optax.adamw(3e-3), lawa(k=5, every=1_000))

    References:
      Sanyal, Neerkaje, Kaddour, Kumar, Sanghavi, "Early Weight Averaging meets High Learning
      Rates for LLM Pre-training", arXiv:2306.03241. Meterez et al., arXiv:2602.03702
      (model merging as the averaging that makes horizon-free schedules work).
    """
    _check_int("k", k, 1)
    _check_int("every", every, 1)

    def init(params, dtype=jnp.float32):
        def buffer(p):
            return jnp.zeros((k,) + jnp.shape(p), dtype).at[0].set(jnp.asarray(p, dtype))

        return LawaState(
            count=jnp.zeros([], jnp.int32),
            num_snapshots=jnp.zeros([], jnp.int32),
            snapshots=jax.tree.map(buffer, params),
        )

    def update(iterate, state):
        count = optax.safe_increment(state.count)
        take = count % every == 0
        slot = state.num_snapshots % k

        def write(buf, p):
            # Not taking a snapshot writes the slot back unchanged: no branch on the count.
            old = lax.dynamic_index_in_dim(buf, slot, axis=0, keepdims=False)
            new = jnp.where(take, p.astype(buf.dtype), old)
            return lax.dynamic_update_index_in_dim(buf, new, slot, axis=0)

        return LawaState(
            count=count,
            num_snapshots=state.num_snapshots + take.astype(jnp.int32),
            snapshots=jax.tree.map(write, state.snapshots, iterate),
        )

    return Averager(init, update)


# ---------------------------------------------------------------- the wrapper


def with_averaging(
    inner: optax.GradientTransformation,
    averager: Averager,
    *,
    dtype=jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` unchanged and keeps an average of the params it produces.

    Each ``update(grads, state, params)`` returns exactly ``inner``'s updates ``u_t`` and
    folds the iterate ``θ_t = optax.apply_updates(params, u_t)`` (the params after this step;
    under jit XLA may keep this sum at more than a bf16 param's precision) into the averager.
    So ``params`` is required, and ``with_averaging`` must wrap the whole optimizer: chained
    after it, another transformation would change the updates after the average was taken.

    The average is stored in ``dtype``, f32 by default whatever the params' dtype: an EMA
    increment ``(1 − β_t)·(θ_t − θ̄)`` is ~10⁻⁵ of the weights late in training, below bf16's
    resolution, and a bf16 EMA would stop moving. ``dtype=jnp.bfloat16`` is reasonable only
    for ``lawa`` on bf16 params, whose snapshots are then exact copies.

    Args:
      inner: the optimizer whose updates are passed through.
      averager: ``ema_growing()``, ``ema(decay)``, ``lawa(k, every)`` or any ``Averager``.
      dtype: floating dtype of the stored average.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``WithAveragingState``; read the
      average with ``averaged_params(state)``.

    Example:
      >>> opt = with_averaging(adamw(inverse_sqrt_schedule(3e-3, 5_000), state_bits=8),
      ...                      ema_growing())
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> eval_params = averaged_params(state)           # f32, θ̄ after this step

    References:
      Meterez et al., "Anytime Pretraining", arXiv:2602.03702.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner={inner!r}: expected an optax.GradientTransformation.")
    if not isinstance(averager, Averager):
        raise TypeError(
            f"averager={averager!r}: expected an Averager (ema_growing(), ema(decay), "
            "lawa(k, every))."
        )
    _check_dtype(dtype)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return WithAveragingState(
            inner_state=inner.init(params), averager_state=averager.init(params, dtype)
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "params=None: with_averaging averages the params after each update, so "
                "update(grads, state, params) needs the current params."
            )
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        iterate = optax.apply_updates(params, updates)
        averager_state = averager.update(iterate, state.averager_state)
        return updates, WithAveragingState(inner_state, averager_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def averaged_params(opt_state) -> optax.Params:
    """The averaged weights held in an optimizer state.

    Finds the one ``WithAveragingState`` anywhere in ``opt_state`` (the state itself, or
    inside ``optax.chain`` tuples, ``inject_hyperparams`` and other nested states) and returns
    its average: a tree like the params, in the averager's storage dtype (f32 by default; cast
    to the params' dtypes for serving if needed).

    Args:
      opt_state: an optimizer state containing exactly one ``with_averaging`` state.

    Returns:
      The params tree of the average θ̄_t after the last update.

    Raises:
      ValueError: when ``opt_state`` holds no ``with_averaging`` state, or more than one.
    """
    is_avg = lambda x: isinstance(x, WithAveragingState)
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_avg) if is_avg(s)]
    if not found:
        raise ValueError(
            f"opt_state (a {type(opt_state).__name__}) holds no with_averaging state: wrap the "
            "optimizer in with_averaging(inner, averager) to keep averaged weights."
        )
    if len(found) > 1:
        raise ValueError(
            f"opt_state holds {len(found)} with_averaging states: expected exactly one."
        )
    return found[0].averager_state.average()


# ---------------------------------------------------------------- schedules


def _linear_warmup(t, init_value, peak_value, warmup_steps):
    return init_value + (peak_value - init_value) * t / max(warmup_steps, 1)


def inverse_sqrt_schedule(
    peak_value: float,
    warmup_steps: int,
    *,
    offset: float | None = None,
    init_value: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up, then a learning rate decaying like 1/√t, with no horizon.

    With ``w = warmup_steps``, ``α = offset`` and t the step count (optax's ``count``, 0 on the
    first update)::

        η_t = init_value + (peak_value − init_value) · t / w       t < w
        η_t = peak_value · sqrt(α / (t − w + α))                   t ≥ w

    continuous at t = w (η_w = peak_value). The default ``α = w`` gives ``peak_value ·
    sqrt(w / t)``; a larger α keeps the rate near its peak for longer (the paper tunes α:
    12.8k, 25.6k, 51.2k steps after a 5k-step warm-up at 400k steps, 51.2k chosen).

    Args:
      peak_value: the rate at the end of warm-up, >= 0.
      warmup_steps: steps of linear warm-up, >= 0.
      offset: α > 0, the time scale of the decay; default ``warmup_steps`` (which must then be
        positive).
      init_value: the rate at step 0 (the paper's code warms up from 10% of the peak).

    Returns:
      An optax schedule: ``count -> f32 []``; it jits and needs no total step count.

    Example:
      >>> lr = inverse_sqrt_schedule(3e-3, 5_000, offset=51_200)
      >>> opt = with_averaging(optax.adamw(lr), ema_growing())

    References:
      Meterez et al., arXiv:2602.03702 (the "inverse square root + warmup" schedule).
    """
    _check_real("peak_value", peak_value, " >= 0", lambda v: v >= 0)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_real("init_value", init_value)
    if offset is None:
        if warmup_steps == 0:
            raise ValueError(
                "offset=None with warmup_steps=0: the default offset is warmup_steps, which "
                "must then be positive; pass offset > 0."
            )
        offset = warmup_steps
    _check_real("offset", offset, " > 0", lambda v: v > 0)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = _linear_warmup(t, init_value, peak_value, warmup_steps)
        since = jnp.maximum(t - warmup_steps, 0.0)
        decay = peak_value * jnp.sqrt(offset / (since + offset))
        return jnp.where(t < warmup_steps, warm, decay).astype(jnp.float32)

    return schedule


def constant_schedule(
    peak_value: float, warmup_steps: int, *, init_value: float = 0.0
) -> optax.Schedule:
    """Linear warm-up, then a constant learning rate forever (pair it with an averager).

    ::

        η_t = init_value + (peak_value − init_value) · t / warmup_steps     t < warmup_steps
        η_t = peak_value                                                    t ≥ warmup_steps

    Args:
      peak_value: the constant rate after warm-up, >= 0.
      warmup_steps: steps of linear warm-up, >= 0 (0: constant from step 0).
      init_value: the rate at step 0.

    Returns:
      An optax schedule: ``count -> f32 []``.

    Example:
      >>> opt = with_averaging(optax.adamw(constant_schedule(3e-3, 5_000)), ema_growing())

    References:
      Meterez et al., arXiv:2602.03702 (the "constant + warmup" schedule).
    """
    _check_real("peak_value", peak_value, " >= 0", lambda v: v >= 0)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_real("init_value", init_value)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = _linear_warmup(t, init_value, peak_value, warmup_steps)
        return jnp.where(t < warmup_steps, warm, peak_value).astype(jnp.float32)

    return schedule
