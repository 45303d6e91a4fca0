"""jaxquant.optim: optax transformations whose states are stored in few bits.

``adam`` / ``adamw`` with ``state_bits=8`` keep both moments as block-wise 8-bit codes on the
dynamic map (bitsandbytes' design, arXiv:2110.02861) and do the step's arithmetic in f32;
``state_nbytes`` / ``bytes_per_param`` report the state's exact memory.
"""

from jaxquant.optim.adam import ScaleByAdamState, adam, adamw, scale_by_adam
from jaxquant.optim.maps import dynamic_map
from jaxquant.optim.state import (
    QuantizedState,
    bytes_per_param,
    dequantize_state,
    quantize_state,
    state_nbytes,
)

__all__ = [
    "QuantizedState",
    "ScaleByAdamState",
    "adam",
    "adamw",
    "bytes_per_param",
    "dequantize_state",
    "dynamic_map",
    "quantize_state",
    "scale_by_adam",
    "state_nbytes",
]
