"""How a quantized tensor's ``dot_general`` calls the Pallas kernels.

``QArray.dot_general`` and ``VQArray.dot_general`` read the options of the innermost
``kernel_options(...)`` block while they are traced, so enter it inside the jitted function (or
around the first call of a fresh jit): a cached compilation keeps the options it was traced
with.

Example:
  >>> with kernel_options(interpret=True):     # the Pallas kernels on CPU, in interpret mode
  ...     logits = served_model.apply(variables, tokens)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

IMPLEMENTATIONS = (None, "xla", "tpu", "gpu", "cpu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelOptions:
    """Attributes:
    enabled: False always dequantizes, then multiplies (no Pallas kernel).
    implementation: None picks by backend; ``'xla'`` (the kernel's reference), ``'tpu'``,
      ``'gpu'`` or ``'cpu'`` (the C++ kernel of ``quantized_matmul``, which serves decoding
      on CPU; ops without one run their reference) force one.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    """

    enabled: bool = True
    implementation: str | None = None
    interpret: bool = False

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"kernel_options implementation={self.implementation!r}: expected one of "
                f"{IMPLEMENTATIONS}."
            )


# KernelOptions is frozen, so one shared default is safe.
_OPTIONS = contextvars.ContextVar(
    "jaxquant_kernel_options",
    default=KernelOptions(),  # noqa: B039
)


@contextlib.contextmanager
def kernel_options(**kwargs):
    """Overrides ``KernelOptions`` fields inside the block, e.g. ``interpret=True``."""
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **kwargs))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def current_kernel_options() -> KernelOptions:
    """The options in effect (those of the innermost ``kernel_options`` block)."""
    return _OPTIONS.get()
