"""jaxquant.optim: optax transformations whose states are stored in few bits.

``adam`` / ``adamw`` / ``lion`` / ``sgd`` with ``state_bits=8`` or ``4`` keep their moments
quantized between steps (bitsandbytes' 8-bit block-wise dynamic map, arXiv:2110.02861; FP8
E4M3; 4-bit NF4 first moments with factored or rank-1 second moments, after 4-bit Adam,
arXiv:2309.01507) and do the step's arithmetic in f32; ``quantized_state`` does the same
for any optax transformation; ``state_nbytes`` / ``bytes_per_param`` report the state's
exact memory. ``dct_low_rank`` projects gradients onto DCT columns (arXiv:2505.17967);
``with_averaging`` keeps a growing-half-life EMA or LAWA average of the weights for
horizon-free training (arXiv:2602.03702).
"""

from jaxquant.optim.adam import ScaleByAdamState, adam, adamw, scale_by_adam
from jaxquant.optim.averaging import (
    averaged_params,
    constant_schedule,
    ema,
    ema_growing,
    inverse_sqrt_schedule,
    lawa,
    with_averaging,
)
from jaxquant.optim.dct import dct_basis, dct_low_rank
from jaxquant.optim.maps import dynamic_map, linear_map
from jaxquant.optim.momentum import MomentumState, lion, scale_by_lion, sgd, trace
from jaxquant.optim.shampoo import ScaleByShampooState, scale_by_shampoo, shampoo
from jaxquant.optim.state import (
    QuantizedMoment,
    StateQuantizer,
    bytes_per_param,
    dequantize_state,
    quantize_state,
    state_nbytes,
)
from jaxquant.optim.storage import (
    RECIPES,
    STATIC_ARGS,
    FactoredMoment,
    MomentStorage,
    moment_storage,
)
from jaxquant.optim.wrap import CompressedState, quantized_state

__all__ = [
    "RECIPES",
    "STATIC_ARGS",
    "FactoredMoment",
    "MomentStorage",
    "MomentumState",
    "CompressedState",
    "QuantizedMoment",
    "ScaleByAdamState",
    "StateQuantizer",
    "adam",
    "adamw",
    "averaged_params",
    "constant_schedule",
    "dct_basis",
    "dct_low_rank",
    "ema",
    "ema_growing",
    "inverse_sqrt_schedule",
    "lawa",
    "with_averaging",
    "bytes_per_param",
    "dequantize_state",
    "dynamic_map",
    "linear_map",
    "lion",
    "moment_storage",
    "quantize_state",
    "quantized_state",
    "scale_by_adam",
    "scale_by_lion",
    "scale_by_shampoo",
    "shampoo",
    "ScaleByShampooState",
    "sgd",
    "state_nbytes",
    "trace",
]
