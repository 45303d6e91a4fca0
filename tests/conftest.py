"""Every test sees 8 fake CPU devices, so sharding is always exercised."""

import os

# Each pytest-xdist worker on its own CPUs (worker i of n: every n-th CPU this process may use),
# before jax starts its thread pools: two multi-threaded XLA processes sharing two cores
# preempt each other's pool threads at every handoff, and small jitted steps in a loop run
# several times slower than with a core each. Threads and subprocesses inherit the mask.
_worker, _workers = (
    os.environ.get("PYTEST_XDIST_WORKER"),
    os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
)
if _worker and _workers and hasattr(os, "sched_getaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    if int(_workers) <= len(_cpus):
        os.sched_setaffinity(0, _cpus[int(_worker.removeprefix("gw")) :: int(_workers)])

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS, which jax reads at backend start)
import pytest  # noqa: E402


def pytest_configure(config):
    del config
    assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"


@pytest.fixture
def mesh8():
    """A 1-D mesh over the 8 devices, axis name 'x'."""
    return jax.make_mesh((8,), ("x",))


@pytest.fixture(scope="session")
def llama():
    """(model, params, tokens): a one-layer Llama (embed 64, 4 heads, 2 KV heads, MLP 128)
    with unboxed params and [2, 8] tokens, shared by the serving tests."""
    import flax.linen as nn

    from jaxquant.models import Llama, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=32, embed_dim=64, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=128
    )
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
    return model, params, tokens
