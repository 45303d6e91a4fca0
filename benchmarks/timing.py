"""Step times of several trainers measured alike: round-robin blocks after a warm-up.

``round_robin_step_times(trainers, timing_steps)``: each trainer runs 3 compiled warm-up
steps, then blocks of 10 steps in turn, ``timing_steps // 10`` blocks each, so that a change in
the machine's load hits every trainer alike; a trainer's time is the median of its blocks'
per-step times. Shared by ``optim.py`` and ``training_recipes.py``.
"""

import statistics
import time

import jax


def round_robin_step_times(trainers: dict, timing_steps: int) -> dict[str, float]:
    """Seconds per step of each ``jaxquant.train.Trainer`` in ``trainers`` (name -> trainer)."""
    runs = {}
    for name, t in trainers.items():
        state = t.init_state()
        for _ in range(3):  # compile, warm up
            state, _ = t.step(state, next(t.data))
        jax.block_until_ready(state)
        runs[name] = [state, []]
    for _ in range(max(1, timing_steps // 10)):
        for name, t in trainers.items():
            state, blocks = runs[name]
            batches = [next(t.data) for _ in range(10)]
            t0 = time.perf_counter()
            for b in batches:
                state, _ = t.step(state, b)
            jax.block_until_ready(state)
            blocks.append((time.perf_counter() - t0) / 10)
            runs[name][0] = state
    return {name: statistics.median(blocks) for name, (_, blocks) in runs.items()}
