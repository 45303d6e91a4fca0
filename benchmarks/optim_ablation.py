"""Ablations behind the 4-bit optimizer-state default (BENCHMARKS.md, "Low-bit optimizer
states on converging fits"): which stored moment costs what, and how a stored second moment
drifts from the true one.

  python benchmarks/optim_ablation.py ablate STEPS VARIANTS SCHEDULE DINxHxTH [SEEDS]
      e.g. LR=1e-2 python benchmarks/optim_ablation.py ablate 3000 f32,mu4,nu4,nu4_sr cos 32x256x64
  python benchmarks/optim_ablation.py drift STEPS          (DIN, H, TH from the environment)

``ablate``: Adam (``AdamLeafStep``, the step ``scale_by_adam`` runs) with a hand-built
``MomentStorage`` per variant (``STORES``: ``mu4`` = only the first moment on the 4-bit DE map,
``nu4`` = only the second on the rank-1 linear map, ``_sr`` stochastic rounding, ``_nf`` the NF4
map, ``_bN`` blocks of N, ...), trained on a tanh teacher regression (inputs DIN, student
hidden H, teacher hidden TH, batch 128) with ``SCHEDULE`` ``cos`` (warmup + cosine) or
``const`` at peak ``$LR`` (default 3e-3); prints the final population loss and its change
against the first variant, per seed. ``drift``: runs f32 ``optax.adamw(3e-3)`` and, fed the same
gradients, shadow second moments of the hidden kernel stored by each recipe; prints the
quantiles of ``sqrt(stored nu / true nu)``.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from optim_fits import mlp, mlp_init  # noqa: E402  (the same tanh MLP as the grid's)

from jaxquant.numerics import formats as F  # noqa: E402
from jaxquant.optim import storage as S  # noqa: E402
from jaxquant.optim.adam import AdamLeafStep, ScaleByAdamState  # noqa: E402
from jaxquant.optim.maps import dynamic_map  # noqa: E402
from jaxquant.optim.state import StateQuantizer, dynamic_format, linear_format  # noqa: E402


def make_adam(store, lr, wd=1e-4, b1=0.9, b2=0.999):
    step = AdamLeafStep(store, b1, b2, 1e-8)

    def init(params):
        return ScaleByAdamState(
            jnp.zeros([], jnp.int32), step.init_first(params), step.init_second(params)
        )

    def update(g, state, params=None):
        count = optax.safe_increment(state.count)
        keys = store.keys(g, count)
        out = jax.tree.map(
            lambda g, m, v, k: (lambda r: (r[0], r[2], r[3]))(step(g, m, v, count, k)),
            g,
            state.mu,
            state.nu,
            keys,
            is_leaf=lambda x: x is None,
        )
        td = jax.tree.structure(g)
        parts = td.flatten_up_to(out)
        u, mu, nu = (td.unflatten([p[i] for p in parts]) for i in range(3))
        return u, ScaleByAdamState(count, mu, nu)

    return optax.chain(
        optax.GradientTransformation(init, update),
        optax.add_decayed_weights(wd),
        optax.scale_by_learning_rate(lr),
    )


_d = list(dynamic_map(True, 4))
_d.remove(min(v for v in _d if v > 0))
_d.append(-1.0)
SYM = F.LookupFormat(tuple(sorted(_d)), label="dyn4sym")
NF4 = F.NF4
M4 = StateQuantizer(dynamic_format(True, 4), 128)
NU_R1 = StateQuantizer(linear_format(False, 4), 128, "rank1")


def st(first, second, sr=False, factored=False):
    return S.MomentStorage(first, second, factored, 4096, sr)


STORES = {
    "f32": st(None, None),
    "mu4": st(M4, None),
    "nu4": st(None, NU_R1),
    "nu4_sr": st(None, NU_R1, True),
    "4bit": st(M4, NU_R1),
    "4bit_sr": st(M4, NU_R1, True),
    "fact": st(M4, None, factored=True),
    "nu8": st(None, S.moment_storage(8, "dynamic").second),
    "mu8": st(S.moment_storage(8, "dynamic").first, None),
    "mu4_sr": st(M4, None, True),
    "mu4_b32": st(StateQuantizer(dynamic_format(True, 4), 32), None),
    "mu4_lin": st(StateQuantizer(linear_format(True, 4), 128), None),
    "mu4_lin_sr": st(StateQuantizer(linear_format(True, 4), 128), None, True),
    "8bit": S.moment_storage(8, "dynamic"),
    "mu4_sym": st(StateQuantizer(SYM, 128), None),
    "mu4_sym_sr": st(StateQuantizer(SYM, 128), None, True),
    "mu4_sym_b32": st(StateQuantizer(SYM, 32), None),
    "A": st(StateQuantizer(NF4, 128), NU_R1),
    "B": st(StateQuantizer(NF4, 128), NU_R1, True),
    "D": st(StateQuantizer(NF4, 128), None, factored=True),
    "E": st(StateQuantizer(NF4, 128), None, True, factored=True),
    "U": st(
        StateQuantizer(F.LookupFormat(tuple(k / 7 for k in range(-7, 8)), label="u4"), 128), None
    ),
    "U_sr": st(
        StateQuantizer(F.LookupFormat(tuple(k / 7 for k in range(-7, 8)), label="u4"), 128),
        None,
        True,
    ),
    "mu4_nf_b64": st(StateQuantizer(NF4, 64), None),
    "mu4_nf_b32": st(StateQuantizer(NF4, 32), None),
    "C128": st(StateQuantizer(NF4, 128), NU_R1, True),
    "C64": st(StateQuantizer(NF4, 64), NU_R1, True),
    "C32": st(StateQuantizer(NF4, 32), NU_R1, True),
    "mu64sr": st(StateQuantizer(NF4, 64), None, True),
    "M8F": st(S.moment_storage(8, "dynamic").first, None, factored=True),
    "F32sr": st(StateQuantizer(NF4, 32), None, True, factored=True),
    "nuF": st(None, None, factored=True),
    "mu4_nf": st(StateQuantizer(NF4, 128), None),
    "mu4_nf_sr": st(StateQuantizer(NF4, 128), None, True),
}


def run(store, steps, seed, cfg, sched):
    din, h, th = cfg
    teacher = mlp_init(jax.random.key(100 + seed), [din, th, th, 1])
    params = mlp_init(jax.random.key(seed), [din, h, h, 1])
    peak = float(__import__("os").environ.get("LR", 3e-3))
    lr = (
        peak
        if sched == "const"
        else optax.warmup_cosine_decay_schedule(0.0, peak, steps // 20, steps, 0.0)
    )
    opt = make_adam(store, lr)
    state = opt.init(params)

    def loss_fn(p, x):
        return jnp.mean((mlp(p, x) - mlp(teacher, x)) ** 2)

    @jax.jit
    def many(p, s, i0):
        def body(i, c):
            p, s = c
            x = jax.random.normal(jax.random.fold_in(jax.random.key(1000 + seed), i), (128, din))
            g = jax.grad(loss_fn)(p, x)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(i0, i0 + 100, body, (p, s))

    for i0 in range(0, steps, 100):
        params, state = many(params, state, i0)
    xv = jax.random.normal(jax.random.key(7), (8192, din))
    return float(loss_fn(params, xv))


def drift(steps):
    din, h, th = (
        int(os.environ.get("DIN", 32)),
        int(os.environ.get("H", 256)),
        int(os.environ.get("TH", 64)),
    )
    steps = steps
    teacher = mlp_init(jax.random.key(100), [din, th, th, 1])
    params = mlp_init(jax.random.key(0), [din, h, h, 1])
    opt = optax.adamw(3e-3, weight_decay=1e-4)
    state = opt.init(params)

    def loss_fn(p, x):
        return jnp.mean((mlp(p, x) - mlp(teacher, x)) ** 2)

    stores = {
        "rank1_nearest": S.moment_storage(4, "rank1", rounding="nearest"),
        "rank1_sr": S.moment_storage(4, "rank1", rounding="stochastic"),
        "8bit": S.moment_storage(8, "dynamic"),
    }
    b2 = 0.999

    @jax.jit
    def step(p, s, qs, key, count):
        x = jax.random.normal(key, (128, din))
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        u, s = opt.update(g, s, p)
        W = g[1]["w"]  # the h x h hidden kernel
        nu_true = s[0].nu[1]["w"]
        out = {}
        new_qs = {}
        for name, st in stores.items():
            k = jax.random.fold_in(jax.random.key(3), count) if st.stochastic else None
            v, stored = st.update_second(qs[name], W * W, b2, k)
            new_qs[name] = stored
            out[name] = S.load(stored)
        return optax.apply_updates(p, u), s, new_qs, out, nu_true, loss

    qs = {n: st.init_second((h, h)) for n, st in stores.items()}
    key = jax.random.key(1000)
    for i in range(steps):
        params, state, qs, out, nu_true, loss = step(
            params, state, qs, jax.random.fold_in(key, i), i + 1
        )
        if (i + 1) in (100, 300, 1000, 2000, 4000, 8000):
            line = f"step {i + 1} loss {float(loss):.2e}"
            for n, v in out.items():
                r = np.sqrt(np.asarray(v) / np.asarray(nu_true))
                q10, q50, q90 = np.percentile(r, [10, 50, 90])
                line += f" | {n}: med {q50:.2f} p10 {q10:.2f} p90 {q90:.2f}"
            nt = np.asarray(nu_true)
            rm = nt.max(1, keepdims=True)
            cm = nt.max(0, keepdims=True)
            n1 = np.minimum(rm, cm)
            line += f" | frac below n/32: {np.mean(nt < n1 / 32):.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "drift":
        drift(int(sys.argv[2]))
        sys.exit()
    del sys.argv[1]
    steps = int(sys.argv[1])
    names = sys.argv[2].split(",")
    sched = sys.argv[3]
    cfg = tuple(int(v) for v in sys.argv[4].split("x"))
    seeds = range(int(sys.argv[5]) if len(sys.argv) > 5 else 3)
    res = {}
    for n in names:
        t = time.time()
        res[n] = np.array([run(STORES[n], steps, s, cfg, sched) for s in seeds])
        r = res[n] / res[names[0]] - 1
        per_seed = " ".join(f"{100 * x:+.0f}" for x in r)
        print(
            f"{n:8s} loss {res[n].mean():.3e}  Δ {100 * r.mean():+.1f}% (seeds {per_seed})  "
            f"{time.time() - t:.0f}s",
            flush=True,
        )
