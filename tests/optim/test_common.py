"""The shared suite: every jaxquant optimizer and state format passes the same checks.

In the spirit of optax's ``contrib/_common_test.py``: ``CASES`` registers each optimizer a user
would pass to a training loop (``adam``/``adamw`` at every ``state_bits``/``state_format`` and
both roundings, ``lion``, ``sgd`` with momentum, ``shampoo`` with f32 or 4-bit preconditioners
or 8-bit moments, ``quantized_state`` of ``optax.adam``, ``dct_low_rank`` and
``with_averaging`` around an 8-bit ``adamw``), each with its f32 counterpart and a learning rate
that fits the test problem; every property below is one test parametrized over the registry:

1. the jitted update compiles once, and a step keeps the state's structure, shapes and dtypes;
2. updates have the gradients' dtype and applied params keep theirs (bf16 and f32);
3. ``jax.eval_shape(opt.init, ...)`` matches the concrete state, ``state_nbytes`` included;
4. it works under ``optax.inject_hyperparams``, whose learning rate then scales its steps
   (and the public factories themselves, ``test_public_factories_under_inject_hyperparams``);
5. a state initialized and stepped under jit with params and state split over 8 devices gives
   the unsharded run's params;
6. an orbax round trip of the state mid-run changes nothing, bit for bit;
7. it converges on an ill-conditioned quadratic (condition number 100);
8. its first steps match the f32 counterpart within bounds derived from the stored format's
   resolution (read from the state objects it produces, so a new recipe is checked as is).

The params ``{"w": (64, 96), "b": (96,), "v": (7, 5, 3)}`` are all quantized
(``min_quantized_size=0`` wherever the factory takes it), so a 1-D and a 3-D leaf and lengths
that are no multiple of a block go through the quantized paths.

Compiling is most of this file's time. Each worker builds a case's jitted init and step once
(``_compiled``; tests 4 and 5 share ``_sharded``) and the tests share them; a test that counts
compilations counts only its own. ``scope="module"`` on the case parameter makes pytest run
each case's tests one after the other, so that pytest-xdist, which hands out consecutive
tests, mostly compiles a case on one worker.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant import optim
from jaxquant.optim import (
    FactoredMoment,
    MomentumState,
    QuantizedMoment,
    ScaleByAdamState,
    adam,
    adamw,
    dct_low_rank,
    ema_growing,
    lion,
    quantized_state,
    sgd,
    state_nbytes,
    with_averaging,
)
from jaxquant.optim.shampoo import (
    STATIC_ARGS,
    EigenFactor,
    MatrixFactor,
    ScaleByShampooState,
    bjorck,
    dequantize_eigenvectors,
    shampoo,
)

SHAPES = {"w": (64, 96), "b": (96,), "v": (7, 5, 3)}


def _tree(seed: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), len(SHAPES))
    return {
        n: jax.random.normal(k, s, jnp.float32).astype(dtype)
        for k, (n, s) in zip(keys, SHAPES.items(), strict=True)
    }


def _params(dtype=jnp.float32):
    return _tree(0, dtype)


def _grads(step: int, dtype=jnp.float32):
    return _tree(100 + step, dtype)


# ---------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer as a user would build it.

    Attributes:
      id: the test id.
      make: ``learning_rate -> optax.GradientTransformation``.
      f32: the same optimizer with f32 states (its counterpart in test 8), or None when
        ``make`` is that already.
      lr: the learning rate every test uses; one under which the case converges on the
        quadratic of test 7.
      rule: the update rule test 8 bounds: ``'adam'`` (``m̂ / (sqrt(v̂) + eps)``, b1 0.9, b2
        0.999, eps 1e-8), ``'quantized_state'`` (Adam, whose factored second moment enters
        the next step, not this one), ``'lion'`` (b1 0.9, b2 0.99), ``'sgd'`` (momentum 0.9),
        ``'shampoo'`` (Adam's moments, f32 preconditioners) or ``'shampoo4'`` (4-bit
        preconditioners).
      xfail: (test name, reason) pairs, for a known library bug (strict: a fix makes it fail).
    """

    id: str
    make: Callable[..., optax.GradientTransformation]
    f32: Callable[..., optax.GradientTransformation] | None
    lr: float
    rule: str
    xfail: tuple[tuple[str, str], ...] = ()

    @property
    def rounding(self) -> str | None:
        """The ``rounding`` the factory passes: the resolution of its quantized states is half
        a map gap for ``'nearest'`` and a whole gap otherwise (``'stochastic'``, or None, the
        recipe's default, which the state does not record: the bound valid for both). The map
        and the normalizers come from the state itself (``_rounding_bound``)."""
        return getattr(self.make, "kwargs", {}).get("rounding")


def _factory(fn, *args, **kwargs):
    """``learning_rate -> fn(learning_rate, *args, **kwargs)``.

    The learning rate is the factory's only parameter, so ``optax.inject_hyperparams`` (which
    turns every numeric argument it binds, defaults included, into an array) injects only it:
    ``state_bits`` and ``min_quantized_size`` must stay Python ints, and ``adamw`` and the
    others bind them itself (see ``test_public_factories_under_inject_hyperparams``).
    """

    def make(learning_rate):
        return fn(learning_rate, *args, **kwargs)

    make.kwargs = kwargs
    return make


def _wrapped(wrap, bits):
    """``learning_rate -> wrap(adamw(learning_rate, state_bits=bits))``."""

    def make(learning_rate):
        return wrap(adamw(learning_rate, state_bits=bits, min_quantized_size=0))

    return make


def _quantized_adam(bits):
    """``quantized_state(optax.adam(learning_rate), state_bits=bits)``; at 32 bits the identity
    wrapper, the f32 counterpart with the same state layout."""

    def make(learning_rate):
        return quantized_state(optax.adam(learning_rate), state_bits=bits, min_quantized_size=0)

    return make


B8 = {"state_bits": 8, "min_quantized_size": 0}  # every leaf quantized
B4 = {"state_bits": 4, "min_quantized_size": 0}
# Small intervals, so that five steps cross both (statistics at steps 1, 3, 5; roots at 1, 5),
# and step 4 (test 4's) is neither: on 8 fake CPU devices a replicated eigh or QR takes seconds.
SHAMPOO = {"statistics_interval": 2, "preconditioner_interval": 4}
ADAM_LR, LION_LR, SGD_LR = 0.1, 0.07, 0.3
# The f32 optimizers, shared by their case and as counterparts (so compiled once per worker).
ADAMW, ADAM, LION, SGD = _factory(adamw), _factory(adam), _factory(lion), _factory(sgd, 0.9)
SHAMPOO32 = _factory(shampoo, **SHAMPOO)
E4M3_NU_ZERO = (
    "8-bit 'e4m3' stores Adam's second moment in E4M3, which rounds values below 2**-10 / 448 "
    "(2.2e-6) of their block's absmax to 0: the next step's v is then (1 - b2)·g² alone, and "
    "m̂ / sqrt(v̂) of an element whose gradient just shrank reaches ~1e3 (f32 Adam's stays "
    "near 1 or below): the zero-point problem that 4-bit's linear map without 0 avoids (the "
    "8-bit dynamic map's 0 sits 14 times lower, at 1.6e-7: see test 7's Shampoo note). On the "
    "quadratic the loss stalls at 0.18 of its start after 200 steps at lr 0.1 (f32 and 8-bit "
    "'dynamic': 2e-9) and rises to 3.6 times its start at lr 0.05."
)
_dct = functools.partial(dct_low_rank, rank=48, update_interval=5)
_avg = functools.partial(with_averaging, averager=ema_growing())

CASES = [
    Case("adamw-32", ADAMW, None, ADAM_LR, "adam"),
    Case("adam-32", ADAM, None, ADAM_LR, "adam"),
    # The 8-bit recipes' default rounding is nearest; passed explicitly for the tight bound.
    Case("adamw-8-dynamic", _factory(adamw, **B8, rounding="nearest"), ADAMW, ADAM_LR, "adam"),
    Case(
        "adamw-8-dynamic-stochastic",
        _factory(adamw, **B8, rounding="stochastic"),
        ADAMW,
        ADAM_LR,
        "adam",
    ),
    Case(
        "adamw-8-e4m3",
        _factory(adamw, **B8, state_format="e4m3", rounding="nearest"),
        ADAMW,
        ADAM_LR,
        "adam",
        xfail=(("converges", E4M3_NU_ZERO),),
    ),
    # The 4-bit default recipe, whatever it is (its map and rounding), then each format.
    Case("adam-4", _factory(adam, **B4), ADAM, ADAM_LR, "adam"),
    Case(
        "adamw-4-factorized",
        _factory(adamw, **B4, state_format="factorized"),
        ADAMW,
        ADAM_LR,
        "adam",
    ),
    Case(
        "adamw-4-rank1",
        _factory(adamw, **B4, state_format="rank1"),
        ADAMW,
        ADAM_LR,
        "adam",
    ),
    Case(
        "adamw-4-rank1-nearest",
        _factory(adamw, **B4, state_format="rank1", rounding="nearest"),
        ADAMW,
        ADAM_LR,
        "adam",
    ),
    Case(
        "adamw-4-rank1_dynamic",
        _factory(adamw, **B4, state_format="rank1_dynamic"),
        ADAMW,
        ADAM_LR,
        "adam",
    ),
    Case("lion-32", LION, None, LION_LR, "lion"),
    Case("lion-8", _factory(lion, **B8, rounding="nearest"), LION, LION_LR, "lion"),
    Case("lion-4", _factory(lion, **B4), LION, LION_LR, "lion"),
    Case("sgd-32", SGD, None, SGD_LR, "sgd"),
    Case("sgd-8", _factory(sgd, 0.9, **B8, rounding="nearest"), SGD, SGD_LR, "sgd"),
    Case("sgd-4", _factory(sgd, 0.9, **B4), SGD, SGD_LR, "sgd"),
    Case("shampoo-32", SHAMPOO32, None, ADAM_LR, "shampoo"),
    Case(
        "shampoo-4",
        _factory(shampoo, state_bits=4, min_quantized_size=0, **SHAMPOO),
        SHAMPOO32,
        ADAM_LR,
        "shampoo4",
    ),
    Case(
        "shampoo-moments-8",
        _factory(shampoo, moment_bits=8, **SHAMPOO),
        SHAMPOO32,
        ADAM_LR,
        "shampoo",
    ),
    Case(
        "quantized_state-adam-8",
        _quantized_adam(8),
        _quantized_adam(32),
        ADAM_LR,
        "quantized_state",
    ),
    Case(
        "quantized_state-adam-4",
        _quantized_adam(4),
        _quantized_adam(32),
        ADAM_LR,
        "quantized_state",
    ),
    # The projected leaf sees 48 of 96 DCT columns at a time: a larger step than Adam's.
    Case("dct_low_rank-adamw-8", _wrapped(_dct, 8), _wrapped(_dct, 32), 0.3, "adam"),
    Case("with_averaging-adamw-8", _wrapped(_avg, 8), _wrapped(_avg, 32), ADAM_LR, "adam"),
]


# Cases whose code a sibling case runs (the same transform with another map, rounding or
# recipe name): the mesh and inject_hyperparams tests, which compile a sharded executable per
# case, run them only in the slow run (-m slow), to keep the default run inside CI's budget.
SIBLINGS = {
    "adam-32": "adamw-32",
    "adamw-4-factorized": "adam-4",
    "adamw-4-rank1-nearest": "adamw-4-rank1",
    "adamw-4-rank1_dynamic": "adamw-4-rank1",
    "adamw-8-dynamic-stochastic": "adam-4",
    "lion-32": "lion-8",
    "sgd-32": "sgd-8",
    "quantized_state-adam-8": "quantized_state-adam-4",
}
_SLOW_FOR_SIBLINGS = ("inject_hyperparams", "sharded")


def _cases(test: str, where=lambda case: True):
    """The registry as pytest params of ``test``, with the cases' xfail marks for it."""
    out = []
    for case in CASES:
        if not where(case):
            continue
        reason = dict(case.xfail).get(test)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        if test in _SLOW_FOR_SIBLINGS and case.id in SIBLINGS:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


# ---------------------------------------------------------------- shared jitted functions


@dataclasses.dataclass
class Compiled:
    opt: optax.GradientTransformation
    init: Callable  # jitted opt.init
    step: Callable  # jitted (params, state, grads) -> (params, state, updates)
    traces: list  # one entry per trace of ``step``


def _jit_step(opt):
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step, traces


@functools.cache
def _compiled(make, lr: float) -> Compiled:
    """``make(lr)`` with its jitted init and step, built once per worker and shared by the
    tests."""
    opt = make(lr)
    step, traces = _jit_step(opt)
    return Compiled(opt, jax.jit(opt.init), step, traces)


def _run(c: Compiled, params, steps: int, first: int = 0, state=None):
    """``steps`` steps from ``params`` (and ``state``, else a fresh one) with the gradients
    of steps ``first`` ... Returns (params, state, the updates of each step)."""
    state = c.init(params) if state is None else state
    updates = []
    for t in range(first, first + steps):
        params, state, u = c.step(params, state, _grads(t))
        updates.append(u)
    return params, state, updates


def _avals(tree):
    """(shape, dtype, weak type) of each leaf: what jit keys its executables on."""

    def weak(x):
        return x.weak_type if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).weak_type

    return [(x.shape, x.dtype, weak(x)) for x in jax.tree.leaves(tree)]


def _np(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------- 1. compiles once


@pytest.mark.parametrize("case", _cases("compiles_once"), scope="module")
def test_update_compiles_once_and_keeps_the_state_layout(case):
    """Five jitted steps (crossing Shampoo's intervals, a new stochastic-rounding key at each)
    trace the update at most once, on the first (not at all if another test traced it); each
    step returns a state with the structure, shapes, dtypes and weak types of the initial one,
    which is what lets jit reuse the executable."""
    c = _compiled(case.make, case.lr)
    params = _params()
    state = state0 = c.init(params)
    traces = len(c.traces)
    for t in range(5):
        params, state, _ = c.step(params, state, _grads(t))
        assert jax.tree.structure(state) == jax.tree.structure(state0)
        assert _avals(state) == _avals(state0)
        if t == 0:
            assert len(c.traces) - traces <= 1
            traces, size = len(c.traces), c.step._cache_size()
    assert len(c.traces) == traces and c.step._cache_size() == size
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


# ---------------------------------------------------------------- 2. dtypes


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", _cases("dtypes"), scope="module")
def test_updates_have_the_gradient_dtype_and_params_keep_theirs(case, dtype):
    """A step on params and gradients of ``dtype``: each update leaf has the gradient's dtype
    (the arithmetic is f32 inside; a bf16 update must not come back as f32, which
    ``optax.apply_updates`` would silently cast), the applied params have the params' dtype,
    and the new state has the initial state's dtypes (moments are f32 or codes whatever the
    params). Dtypes are fixed when the step is traced, so the step is evaluated abstractly
    (``jax.eval_shape``): exactly the dtypes a run gets, without compiling a bf16 step."""
    opt = case.make(case.lr)
    params, grads = _params(jnp.dtype(dtype)), _grads(0, jnp.dtype(dtype))
    state = jax.eval_shape(opt.init, params)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    new_params, new_state, updates = jax.eval_shape(step, params, state, grads)
    assert [x.dtype for x in jax.tree.leaves(updates)] == [jnp.dtype(dtype)] * len(SHAPES)
    assert [x.dtype for x in jax.tree.leaves(new_params)] == [jnp.dtype(dtype)] * len(SHAPES)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert _avals(new_state) == _avals(state)


# ---------------------------------------------------------------- 3. eval_shape


@pytest.mark.parametrize("case", _cases("eval_shape"), scope="module")
def test_eval_shape_of_init_matches_the_concrete_state(case):
    """``jax.eval_shape(opt.init, params)`` (how a trainer allocates a state or an orbax
    target without building one) has the concrete state's tree, shapes and dtypes, and
    ``state_nbytes`` counts both the same."""
    c = _compiled(case.make, case.lr)
    params = _params()
    abstract = jax.eval_shape(c.opt.init, params)
    concrete = c.init(params)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(concrete)
    ]
    assert state_nbytes(abstract) == state_nbytes(concrete) > 0


# ------------------------------------------------------------ 4, 5. inject_hyperparams, sharding


def _zero_style(mesh, w_sharding):
    """The state's shardings as the trainer lays them out (``trainer._opt_state_shardings``):
    leaves shaped like ``w`` take its sharding, other leaves whose leading axis the 8 devices
    divide (quantized codes and block scales, rank-1 maxima, factored rows) are split along it,
    the rest (counts, the learning rate, small leaves) is replicated."""

    def sharding(x):
        if x.shape == SHAPES["w"]:
            return w_sharding
        if x.ndim and x.shape[0] % mesh.size == 0:
            return NamedSharding(mesh, P("x", *[None] * (x.ndim - 1)))
        return NamedSharding(mesh, P())

    return sharding


@dataclasses.dataclass
class Sharded:
    params: dict  # the params put on the mesh
    shardings: dict  # the params' shardings
    init: Callable  # jitted opt.init, its state split ZeRO-style
    step: Callable  # jitted (params, state, grads) -> (params, state, updates), keeping them so
    traces: list


@functools.cache
def _sharded(make, lr: float, mesh8) -> Sharded:
    """``optax.inject_hyperparams(make)(learning_rate=lr)`` on mesh8's 8 devices: ``w`` split by
    columns, ``b`` and ``v`` replicated, the state split by ``_zero_style``. Tests 4 and 5 share
    it (one compile per case and worker: compiling is most of this file's time).

    The mesh has mesh8's devices and axis with Auto axes, as ``jaxquant.nn.partitioning``'s
    meshes (the compiler propagates shardings): with mesh8's own Explicit axes the low-bit
    updates do not trace (ShardingTypeError on the flattening reshape, Shampoo's ``G Gᵀ``)."""
    mesh = jax.sharding.Mesh(mesh8.devices, mesh8.axis_names, axis_types=(AxisType.Auto,))
    cols, replicated = NamedSharding(mesh, P(None, "x")), NamedSharding(mesh, P())
    shardings = {"w": cols, "b": replicated, "v": replicated}
    opt = optax.inject_hyperparams(make)(learning_rate=lr)
    params = jax.device_put(_params(), shardings)
    state_shardings = jax.tree.map(_zero_style(mesh, cols), jax.eval_shape(opt.init, params))
    traces = []

    @functools.partial(jax.jit, out_shardings=(shardings, state_shardings, shardings))
    def step(params, state, grads):
        traces.append(1)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    init = jax.jit(opt.init, out_shardings=state_shardings)
    return Sharded(params, shardings, init, step, traces)


def _sharded_grads(s: Sharded, step: int):
    return jax.device_put(_grads(step), s.shardings)


@pytest.mark.parametrize("case", _cases("inject_hyperparams"), scope="module")
def test_works_under_inject_hyperparams(case, mesh8):
    """``optax.inject_hyperparams(case.make)(learning_rate=lr)`` (``_sharded``: on the mesh of
    test 5) keeps the learning rate as an f32 array in the state; the factories take only the
    learning rate (see ``_factory``). Three jitted steps move the params; from the third
    step's state, the update with the learning rate doubled is exactly twice the update (every
    case ends its chain with −lr, and a power of two scales f32 exactly), and with
    ``hyperparams['learning_rate']`` set to 0 it is exactly 0 and leaves the params as they
    are; changing it retraces nothing."""
    s = _sharded(case.make, case.lr, mesh8)
    params, state = s.params, s.init(s.params)
    for t in range(3):
        params, state, _ = s.step(params, state, _sharded_grads(s, t))
    assert float(state.hyperparams["learning_rate"]) == np.float32(case.lr)
    traces = len(s.traces)

    def with_lr(lr):
        return state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})

    lr, grads = state.hyperparams["learning_rate"], _sharded_grads(s, 3)
    _, _, u = s.step(params, with_lr(lr), grads)
    _, _, u2 = s.step(params, with_lr(2 * lr), grads)
    new_params, _, u0 = s.step(params, with_lr(jnp.zeros_like(lr)), grads)
    for a, b, zero in zip(*map(jax.tree.leaves, (u, u2, u0)), strict=True):
        assert bool(jnp.all(jnp.isfinite(a))) and bool(jnp.any(a != 0))
        np.testing.assert_array_equal(b, 2 * a)
        assert bool(jnp.all(zero == 0))
    for a, b in zip(*map(jax.tree.leaves, (new_params, params)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(s.traces) == traces <= 1


@pytest.mark.parametrize(
    "factory, static_args, kwargs",
    [
        pytest.param(optax.adamw, (), {}, id="optax.adamw"),
        pytest.param(shampoo, STATIC_ARGS, {}, id="shampoo-STATIC_ARGS"),
        *[pytest.param(f, (), {}, id=f.__name__) for f in (adam, adamw, lion, sgd)],
        *[
            pytest.param(f, optim.STATIC_ARGS, {"state_bits": 4}, id=f"{f.__name__}-4bit")
            for f in (adam, adamw, lion)
        ],
        pytest.param(sgd, optim.STATIC_ARGS, {"momentum": 0.9, "state_bits": 8}, id="sgd-8bit"),
    ],
)
def test_public_factories_under_inject_hyperparams(factory, static_args, kwargs):
    """The registry's factories take only the learning rate; this is the public factory itself
    under ``optax.inject_hyperparams(factory)(learning_rate=...)``, the usual way to change an
    optax optimizer's learning rate during training. It is traced abstractly: the factory
    runs inside init and update, so a failure shows there, without compiling anything. The
    storage options default to None, so the plain call needs nothing; setting them needs
    ``static_args=optim.STATIC_ARGS`` (inject_hyperparams would make them arrays)."""
    opt = optax.inject_hyperparams(factory, static_args=static_args)(learning_rate=1e-3, **kwargs)
    state = jax.eval_shape(opt.init, _params())
    _, new_state = jax.eval_shape(opt.update, _grads(0), state, _params())
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_storage_options_as_arrays_name_static_args():
    """Without static_args a set ``state_bits`` arrives as an array: a clear error names the fix."""
    opt = optax.inject_hyperparams(adamw)(learning_rate=1e-3, state_bits=4)
    with pytest.raises(ValueError, match="STATIC_ARGS"):
        jax.eval_shape(opt.init, _params())


@pytest.mark.parametrize("case", _cases("sharded"), scope="module")
def test_sharded_state_gives_the_unsharded_run(case, mesh8):
    """The state built by ``jax.jit(opt.init, out_shardings=...)`` from params on 8 devices is
    split over them (``_sharded``: ``w`` by columns, the state ZeRO-style), and two jitted steps
    that keep it so, with sharded gradients, give the unsharded run's params (test 1's
    executable, without inject_hyperparams).

    Tolerance: XLA splits sums over the sharded axis (Adafactor's row means, Shampoo's
    ``G Gᵀ``, the DCT projections) into per-device partial sums and may fuse the weight decay
    and the learning rate (an f32 array here, a constant there) differently, so results differ
    in the last bits: rtol 1e-5 and atol 1e-6 of the leaf's largest param (measured: at most
    1e-6 of it, Shampoo included). Absmax scales and rank-1 maxima are maxima, exact in any
    order, and the rest is elementwise, so a code flips only where such a last-bit difference
    sits on a rounding boundary; none does here, and a flip (a moment moved by a map gap)
    would exceed the tolerance. ``w`` is split by columns, not rows: with rows, Shampoo's right
    factor ``Gᵀ G`` (rank 64 of 96 after one gradient) is a split sum, and its 32-dimensional
    null space gets an arbitrary ``eigh`` basis from any last-bit difference, whose damped root
    (32 times the top one) amplifies f32 noise: the runs then differ by 8e-4 (f32) and 8e-2
    (4-bit, a different basis quantized) of the params' scale, a property of rank-deficient
    statistics, not of sharding."""
    s = _sharded(case.make, case.lr, mesh8)
    params, state = s.params, s.init(s.params)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    for t in range(2):
        params, state, _ = s.step(params, state, _sharded_grads(s, t))
    assert params["w"].sharding.is_equivalent_to(s.shardings["w"], 2)
    expected, _, _ = _run(_compiled(case.make, case.lr), _params(), 2)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


# ---------------------------------------------------------------- 6. orbax


@pytest.mark.parametrize("case", _cases("orbax"), scope="module")
def test_orbax_round_trip_mid_run_is_bit_exact(case, tmp_path):
    """The state after 3 steps, saved with orbax and restored onto ``jax.eval_shape(opt.init,
    params)``, equals the saved one leaf for leaf (codes, scales, counts), runs on the jitted
    step without recompiling it, and two more steps from it equal two more steps from the state
    that never left memory, bit for bit (stochastic rounding draws its keys from the step
    count, so a resumed run draws the same ones)."""
    c = _compiled(case.make, case.lr)
    params, state, _ = _run(c, _params(), 3)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
    abstract = jax.eval_shape(c.opt.init, _params())
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "state", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    # As uncommitted arrays, like the state that never left memory: orbax's come back
    # committed to a device, which jit keys apart (a recompile, not a property of the state).
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    traces, size = len(c.traces), c.step._cache_size()
    p_kept, s_kept, _ = _run(c, params, 2, first=3, state=state)
    p_restored, s_restored, _ = _run(c, params, 2, first=3, state=restored)
    assert len(c.traces) == traces and c.step._cache_size() == size
    for a, b in zip(*map(jax.tree.leaves, (p_restored, p_kept)), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(*map(jax.tree.leaves, (s_restored, s_kept)), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- 7. convergence


@functools.cache
def _quadratic():
    """``f(x) = ½ Σ d ⊙ (x − x*)²`` over the params tree: x* ~ N(0, 1); the curvatures d of each
    leaf log-spaced over [0.01, 1] (condition number 100) and scattered over its elements, so
    every block of a quantized state holds the whole range."""
    target = _tree(7)
    rng = np.random.default_rng(7)
    curv = {
        n: jnp.asarray(
            rng.permutation(np.geomspace(0.01, 1.0, x.size)).reshape(x.shape), jnp.float32
        )
        for n, x in target.items()
    }

    def loss(p):
        return sum(0.5 * jnp.sum(curv[n] * (p[n] - target[n]) ** 2) for n in p)

    return jax.jit(loss), jax.jit(jax.grad(loss))


@pytest.mark.parametrize("case", _cases("converges"), scope="module")
def test_converges_on_an_ill_conditioned_quadratic(case):
    """From x = 0, 200 steps at ``case.lr`` bring the quadratic below 1% of its start.

    Measured final loss / start: Adam 2e-9 (f32, 8-bit nearest) to 2e-4 (8-bit stochastic,
    4-bit) and 2e-3 (4-bit 'rank1_dynamic'); Lion 2e-3 (its sign steps hover at ~lr); SGD
    4e-10 to 2e-9; Shampoo 1e-9 (f32, 4-bit preconditioners) and 7e-5 with 8-bit moments,
    whose run spikes on the way (9e-4 at step 80, 0.3 at step 120: an 8-bit second moment
    rounded to 0 inflates Adam's step at its element 3000-fold, and the layer-wise graft
    scales the whole layer's step by its norm); DCT rank 48 2.5e-4."""
    loss, grad = _quadratic()
    c = _compiled(case.make, case.lr)
    x = jax.tree.map(jnp.zeros_like, _params())
    start = float(loss(x))
    state = c.init(x)
    for _ in range(200):
        x, state, _ = c.step(x, state, grad(x))
    final = float(loss(x))
    assert final < 1e-2 * start, final / start


# ---------------------------------------------------------------- 8. first steps vs f32
#
# The low-bit optimizers do each step's arithmetic in f32 from the dequantized stored state
# and quantize only what they store for the next step. So from a zero state (stored exactly)
# step 1 is the f32 step, and at step 2 the only difference is the stored moments' rounding,
# whose size the format fixes. With ``s`` an element's normalizer (its block's absmax over the
# map's largest value; for rank-1 normalization ``min(rowmax, colmax, ...)``) and ``m_k`` the
# map value its code stands for, nearest rounding put it there from within half the gap to
# either neighbouring map value, times ``s`` (stochastic rounding: the whole gap, as it picks
# either neighbour); at the map's ends, from up to the end of the normalized range (the 4-bit
# linear map has no 0: up to ``s / 16``); and a signed map's sign nudge moves a negative value
# rounded to 0 to the largest negative map value (the whole gap to 0). ``_rounding_bound``
# reads the map, the codes and the normalizers from the stored ``QuantizedMoment``. Step 2's
# moments then differ from f32's by at most ``decay · bound_1 + bound_2``, and its update by
# what those moment errors can do through the update rule (for Adam an interval bound).

MOMENT_STATES = (ScaleByAdamState, optax.ScaleByAdamState, MomentumState, ScaleByShampooState)
DECAYS = {  # the EMA decay of each stored moment, by update rule
    "adam": {"mu": 0.9, "nu": 0.999},
    "quantized_state": {"mu": 0.9, "nu": 0.999},
    "shampoo": {"mu": 0.9, "nu": 0.999},
    "shampoo4": {"mu": 0.9, "nu": 0.999},
    "lion": {"mu": 0.99},
    "sgd": {"mu": 0.9},
}
B1, B2, EPS = 0.9, 0.999, 1e-8  # Adam's and Shampoo's graft (every case uses the defaults)


def _is_stored(x):
    return isinstance(x, (QuantizedMoment, FactoredMoment))


def _moments(state) -> dict:
    """``{'mu': tree, 'nu': tree}`` of the one moment-holding node in ``state``."""
    is_node = lambda x: isinstance(x, MOMENT_STATES)  # noqa: E731
    (node,) = [x for x in jax.tree.leaves(state, is_leaf=is_node) if is_node(x)]
    return {k: getattr(node, k) for k in ("mu", "nu") if hasattr(node, k)}


def _flat_moments(state):
    """``[((field, leaf name), stored leaf)]`` with stored moments kept whole."""
    flat = jax.tree_util.tree_flatten_with_path(_moments(state), is_leaf=_is_stored)[0]
    return [((path[0].key, path[-1].key), leaf) for path, leaf in flat]


def _rank1_normalizer(axis_max) -> np.ndarray:
    n = None
    for d, m in enumerate(axis_max):
        m = _np(m).reshape((1,) * d + (-1,) + (1,) * (len(axis_max) - d - 1))
        n = m if n is None else np.minimum(n, m)
    return n


def _codes(q: QuantizedMoment) -> np.ndarray:
    """The codes of ``q`` as ints: its packed bytes read as a little-endian bit stream along
    the last axis (``pallas_kernels.packing``'s layout), ``bits`` per code."""
    packed, bits, n = np.asarray(q.q.codes), q.q.format.bits, q.q.shape[-1]
    stream = np.unpackbits(packed[..., None], axis=-1, bitorder="little")
    stream = stream.reshape(*packed.shape[:-1], -1)[..., : n * bits]
    return stream.reshape(*packed.shape[:-1], n, bits) @ (1 << np.arange(bits))


def _normalizer(q: QuantizedMoment) -> np.ndarray:
    """Each element's normalizer: its block's f32 scale (the stored scales are plain f32, one
    per ``group_size`` elements along the flat axis, or one for the tensor), times rank-1's
    ``min(rowmax, colmax, ...)``."""
    scaling = q.q.scaling
    assert scaling.scale_dtype == "float32", scaling  # a new scaling: extend this helper
    assert not (scaling.zero_point or scaling.tensor_scale or scaling.split_sign), scaling
    scale = _np(q.q.scale)
    if scaling.group_size:
        s = np.repeat(scale.reshape(-1), scaling.group_size)[: q.size].reshape(q.shape)
    else:
        s = np.broadcast_to(scale, q.shape)
    return s * _rank1_normalizer(q.axis_max) if q.axis_max else s


def _rounding_bound(q: QuantizedMoment, stochastic: bool) -> np.ndarray:
    """The largest ``|dequantized − stored value|`` of each element, read from ``q``: its code's
    map value ``m_k``, the neighbours ``m_k±1`` and the element's normalizer ``s``. The value
    that was stored lies within half the gap to either neighbour (nearest) or the whole gap
    (stochastic: it was rounded from between the two); past the map's ends, up to the range's
    end (the normalized range is [−max, max], or [0, max] for an unsigned map); and the sign
    nudge may have moved a negative value rounded to 0 to the largest negative map value
    (the whole gap to 0). f32 slack: 1e-5 relative and 1e-7 of ``s · max``."""
    fmt = q.q.format
    grid, top = np.asarray(fmt.grid, np.float64), fmt.max_value
    low = -top if grid[0] < 0 else 0.0
    gaps = np.diff(grid) * (1.0 if stochastic else 0.5)
    below = np.concatenate([[grid[0] - low], gaps])
    above = np.concatenate([gaps, [top - grid[-1]]])
    if grid[0] < 0 and 0.0 in grid:
        j = np.flatnonzero(grid < 0)[-1]
        above[j] = grid[j + 1] - grid[j]
    unit = np.maximum(below, above)
    codes = _codes(q)
    k = np.searchsorted(grid, fmt.table()[codes] + 0.0)  # + 0.0: -0 is the grid's 0
    if not q.axis_max:
        k = k.reshape(-1)[: q.size].reshape(q.shape)
    s = _normalizer(q)
    return unit[k] * s * (1 + 1e-5) + 1e-7 * s * top


def _adafactor(nu: np.ndarray) -> np.ndarray:
    """Adafactor's rank-1 reconstruction from the row and column means of ``nu``."""
    row, col = nu.mean(-1), nu.mean(-2)
    mean = row.mean(-1)[..., None, None]
    return row[..., :, None] * col[..., None, :] / np.where(mean > 0, mean, 1.0)


def _check_moments(q_state, f_state, prev_bounds, case, t):
    """Each stored moment of step ``t`` is within ``decay · prev_bound + bound`` of the f32
    moment (``prev_bounds``: step t − 1's, {} at step 1, whose start is exact); a factored one
    holds exactly the f32 moment's row and column means (the EMA commutes with the mean);
    unquantized ones equal f32's. Returns this step's bounds."""
    decays = DECAYS[case.rule]
    f_leaves = dict(_flat_moments(f_state))
    bounds = {}
    for key, q in _flat_moments(q_state):
        f = _np(f_leaves[key])
        prev = prev_bounds.get(key, 0.0)
        if isinstance(q, QuantizedMoment):
            bound = _rounding_bound(q, case.rounding != "nearest")
            err = np.abs(_np(q.dequantize()) - f)
            allowed = decays[key[0]] * prev + bound
            assert np.all(err <= allowed), (key, t, float(np.max(err / allowed)))
            bounds[key] = bound
        elif isinstance(q, FactoredMoment):
            np.testing.assert_allclose(q.row, f.mean(-1), rtol=1e-5, err_msg=str(key))
            np.testing.assert_allclose(q.col, f.mean(-2), rtol=1e-5, err_msg=str(key))
        else:
            np.testing.assert_allclose(q, f, rtol=1e-6, atol=1e-30, err_msg=str(key))
    return bounds


def _adam_interval(mu, nu, dmu, dnu, t):
    """(lower end, centre, upper end) of Adam's ``m̂ / (sqrt(v̂) + eps)`` over
    ``|m − mu| <= dmu``, ``|v − nu| <= dnu``, ``v >= 0``: it increases with m, and |it|
    decreases with v, so the ends are at the corners."""

    def adam(m, v):
        return (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)

    m_lo, m_hi, v_lo, v_hi = mu - dmu, mu + dmu, np.maximum(nu - dnu, 0.0), nu + dnu
    hi = np.where(m_hi >= 0, adam(m_hi, v_lo), adam(m_hi, v_hi))
    lo = np.where(m_lo >= 0, adam(m_lo, v_hi), adam(m_lo, v_lo))
    return lo, adam(mu, nu), hi


def _check_adam_updates(
    u_q, u_f, q_prev, f_prev, f_state, grads, prev_bounds, case, t, names=tuple(SHAPES)
):
    """Step t's update from moments within ``prev_bounds`` of f32's: ``u = −lr (a + wd p)``
    with the same params in both runs, so ``a_q = a_f − (u_q − u_f) / lr`` must lie in
    ``_adam_interval``. A factored second moment changes the rule: ``scale_by_adam``'s step
    uses Adafactor's reconstruction of this step's ``nu``, ``quantized_state``'s wraps
    ``optax.adam`` on the reconstruction of the previous one (``b2 · rec(nu_prev) + (1 − b2)
    g²``). A projected leaf (``dct_low_rank``: moments [64, 48], update [64, 96]) is checked
    in Frobenius norm, which the orthonormal back projection keeps."""

    def moments(state, field):
        return {k[1]: _np(x) for k, x in _flat_moments(state) if k[0] == field}

    mu, nu, nu_prev = moments(f_state, "mu"), moments(f_state, "nu"), moments(f_prev, "nu")
    factored = {k[1] for k, x in _flat_moments(q_prev) if isinstance(x, FactoredMoment)}
    for name in names:
        nu_ref = nu[name]
        if name in factored and case.rule == "quantized_state":
            nu_ref = B2 * _adafactor(nu_prev[name]) + (1 - B2) * _np(grads[name]) ** 2
        elif name in factored:
            nu_ref = _adafactor(nu[name])
        dmu = B1 * prev_bounds.get(("mu", name), 0.0)
        dnu = B2 * prev_bounds.get(("nu", name), 0.0)
        lo, a_ref, hi = _adam_interval(mu[name], nu_ref, dmu, dnu, t)
        _, a_f, _ = _adam_interval(mu[name], nu[name], 0.0, 0.0, t)
        du = (_np(u_q[name]) - _np(u_f[name])) / case.lr
        # Slack: f32 rounding of a, u and their difference (~1e-6 relative), and f32's bias
        # correction: 1 − 0.999**t cancels three digits, so both runs' a are off by up to
        # ~1e-4 relative (measured 6e-6), which the difference a_q − a_f carries too.
        dev = np.maximum(hi - a_f, a_f - lo)
        if du.shape == a_ref.shape:
            a_q = a_f - du
            tol = 2e-6 * (np.abs(a_f) + np.abs(a_q) + np.abs(_np(u_f[name])) / case.lr)
            tol += 1e-4 * dev
            assert np.all(a_q >= lo - tol) and np.all(a_q <= hi + tol), (name, t)
        else:
            # The low-rank Adam step a_q − a_f, back-projected with weight decay cancelling.
            dev = dev + np.abs(a_ref - a_f)
            tol = 2e-6 * (np.linalg.norm(a_f) + np.linalg.norm(_np(u_f[name])) / case.lr)
            tol += 1e-4 * np.linalg.norm(dev)
            assert np.linalg.norm(du) <= np.linalg.norm(dev) + tol, (name, t)


def _check_lion_updates(u_q, u_f, f_prev, grads, prev_bounds, case, t):
    """``u = −lr (sign(b1 · mu + (1 − b1) · g) + wd p)``: where f32's ``b1 · mu + (1 − b1) · g``
    is farther from 0 than the stored momentum's error can move it (``b1 · bound``), both
    signs and so both updates agree; elsewhere they differ by at most 2 lr."""
    mu = {k[1]: _np(x) for k, x in _flat_moments(f_prev)}
    for name in SHAPES:
        g = _np(grads[name])
        c = B1 * mu[name] + (1 - B1) * g
        margin = B1 * prev_bounds.get(("mu", name), 0.0) + 1e-6 * (
            B1 * np.abs(mu[name]) + np.abs(g)
        )
        du = np.abs(_np(u_q[name]) - _np(u_f[name]))
        sure = np.abs(c) > margin
        assert np.all(du[sure] <= 1e-6 * np.abs(_np(u_f[name]))[sure]), (name, t)
        assert np.all(du <= 2 * case.lr * (1 + 1e-6)), (name, t)


def _check_sgd_updates(u_q, u_f, prev_bounds, case, t):
    """``u = −lr (g + 0.9 · mu)``: off by at most ``lr · 0.9 · bound`` of the stored momentum."""
    for name in SHAPES:
        du = np.abs(_np(u_q[name]) - _np(u_f[name]))
        allowed = case.lr * DECAYS["sgd"]["mu"] * prev_bounds.get(("mu", name), 0.0)
        assert np.all(du <= allowed + 1e-6 * np.abs(_np(u_f[name]))), (name, t)


def _shampoo_state(state) -> ScaleByShampooState:
    is_node = lambda x: isinstance(x, ScaleByShampooState)  # noqa: E731
    (node,) = [x for x in jax.tree.leaves(state, is_leaf=is_node) if is_node(x)]
    return node


def _check_shampoo_graft(u_q, u_f, q_state, f_state, prev_bounds, case, t):
    """Moments stored in 8 bits, f32 preconditioners (which see only the gradients, so both
    runs hold the same roots ``L̂``, ``R̂``). ``u = ‖a‖ d / ‖d‖`` with ``d = L̂ m̂ R̂`` and ``a``
    Adam's step, so ``‖u_q − u_f‖ <= ‖a_q − a_f‖ + ‖a_f‖ · 2 ‖d_q − d_f‖ / ‖d_f‖`` and
    ``‖d_q − d_f‖ <= ‖L̂‖₂ ‖R̂‖₂ ‖m̂_q − m̂_f‖``: the moments' bounds through both."""
    pre_q, pre_f = _shampoo_state(q_state).preconditioners, _shampoo_state(f_state).preconditioners
    moments = {k: _np(x) for k, x in _flat_moments(f_state)}
    for name in SHAPES:
        if not pre_f[name]:
            continue
        roots = []
        for fq, ff in zip(pre_q[name], pre_f[name], strict=True):
            np.testing.assert_array_equal(fq.inverse_root, ff.inverse_root)
            roots.append(_np(ff.inverse_root))
        mu, nu = moments[("mu", name)], moments[("nu", name)]
        dmu = B1 * prev_bounds.get(("mu", name), 0.0)
        dnu = B2 * prev_bounds.get(("nu", name), 0.0)
        lo, a_f, hi = _adam_interval(mu, nu, dmu, dnu, t)
        d_f = roots[0] @ (mu / (1 - B1**t)) @ roots[1]
        d_dev = np.linalg.norm(roots[0], 2) * np.linalg.norm(roots[1], 2)
        d_dev *= np.linalg.norm(dmu / (1 - B1**t) * np.ones_like(mu))
        bound = np.linalg.norm(np.maximum(hi - a_f, a_f - lo))
        bound += np.linalg.norm(a_f) * 2 * d_dev / np.linalg.norm(d_f)
        du = np.linalg.norm(_np(u_q[name]) - _np(u_f[name])) / case.lr
        # f32 matmuls (HIGHEST precision) and norms: ~1e-6 of the step.
        assert du <= bound * (1 + 1e-5) + 1e-5 * np.linalg.norm(a_f), (name, t, du, bound)


def _check_shampoo4_roots(q_state, f_state):
    """Step 1's 4-bit inverse roots against f32's. Both factor the same statistics with the
    same ``eigh`` (the 4-bit factor starts cold), so a 4-bit root differs only by one
    quantize → dequantize → Björck rectification of exact eigenvectors, which
    tests/optim/test_shampoo.py measures at 5.3% (Frobenius) and bounds by 7%. The left
    factor ``G Gᵀ`` [64, 64] is full rank: 7% (measured 3.8–4.0% over four gradient seeds).
    The right one ``Gᵀ G`` [96, 96] has rank 64: its 32-dimensional null space, with an
    arbitrary ``eigh`` basis, carries the damped root's largest eigenvalues (16, against 0.5–1.5
    on the range), so its eigenvectors' quantization error dominates the root's: 10% (measured
    8.4–8.6%)."""
    pre_q, pre_f = _shampoo_state(q_state).preconditioners, _shampoo_state(f_state).preconditioners
    for fq, ff, bound in zip(pre_q["w"], pre_f["w"], (0.07, 0.10), strict=True):
        assert isinstance(fq, EigenFactor) and isinstance(ff, MatrixFactor)
        dim = ff.inverse_root.shape[0]
        v = _np(bjorck(dequantize_eigenvectors(fq.root_eigenvectors, dim), 1))
        approx = (v * _np(fq.root_eigenvalues)) @ v.T
        exact = _np(ff.inverse_root)
        assert np.linalg.norm(approx - exact) / np.linalg.norm(exact) < bound, dim


@pytest.mark.parametrize(
    "case", _cases("matches_f32", where=lambda case: case.f32 is not None), scope="module"
)
def test_first_steps_match_f32_within_the_formats_resolution(case):
    """Two steps of the case and of its f32 counterpart from the same params and gradients
    (both runs take f32's params after step 1, so weight decay cancels in the difference):

    * moments, both steps: within the stored format's resolution (``_check_moments``);
    * step 1's update: f32's to f32 rounding (the start is exact zeros, the step is f32's),
      except where the format changes the rule itself: a factored second moment's step uses
      Adafactor's reconstruction of f32's ``nu``, and 4-bit Shampoo's roots are compared to
      f32's (``_check_shampoo4_roots``);
    * step 2's update: within what step 1's stored-moment bounds allow through the update
      rule (``_check_adam_updates``, ``_check_lion_updates``, ``_check_sgd_updates``,
      ``_check_shampoo_graft``; 4-bit Shampoo: its unpreconditioned leaves only, whose
      moments are f32).
    """
    q, f = _compiled(case.make, case.lr), _compiled(case.f32, case.lr)
    params = _params()
    q_state, f_state = q.init(params), f.init(params)
    bounds = {}
    for t in (1, 2):
        grads = _grads(t - 1)
        q_prev, f_prev = q_state, f_state
        _, q_state, u_q = q.step(params, q_state, grads)
        params, f_state, u_f = f.step(params, f_state, grads)
        new_bounds = _check_moments(q_state, f_state, bounds, case, t)
        adam_args = (u_q, u_f, q_prev, f_prev, f_state, grads, bounds, case, t)
        if case.rule in ("adam", "quantized_state"):
            _check_adam_updates(*adam_args)
        elif case.rule == "lion":
            _check_lion_updates(u_q, u_f, f_prev, grads, bounds, case, t)
        elif case.rule == "sgd":
            _check_sgd_updates(u_q, u_f, bounds, case, t)
        else:
            assert case.rule in ("shampoo", "shampoo4")
            if case.rule == "shampoo":
                _check_shampoo_graft(u_q, u_f, q_state, f_state, bounds, case, t)
            elif t == 1:
                _check_shampoo4_roots(q_state, f_state)
            _check_adam_updates(*adam_args, names=("b", "v"))  # Adam's leaves
        bounds = new_bounds
