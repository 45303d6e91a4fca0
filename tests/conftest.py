"""Every test sees 8 fake CPU devices, so sharding is always exercised."""

import os

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
