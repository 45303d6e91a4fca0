"""jaxquant.models: models built from jaxquant.nn layers, with logical sharding axes."""

from jaxquant.models.llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
