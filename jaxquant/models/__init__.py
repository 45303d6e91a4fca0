"""jaxquant.models: models built from jaxquant.nn layers, with logical sharding axes.

``Llama`` (and its ``LlamaConfig``) is the decoder; ``load_pretrained`` reads Llama-family
checkpoints (Hugging Face safetensors directories, GGUF files) into it; ``generate`` continues
prompts with a ``KVCache`` (float, bf16, int8 or int4); ``save_safetensors`` writes a float
model back in Hugging Face's layout; ``save_quantized`` / ``load_quantized`` keep a served
quantized model (params, ``'quant'``, config and rules, tokenizer) as one directory.
"""

from jaxquant.models.generate import KV_FORMATS, Generation, KVCache, generate, sample_logits
from jaxquant.models.llama import Llama, LlamaConfig, RopeScaling
from jaxquant.models.pretrained import (
    Pretrained,
    Quantized,
    load_pretrained,
    load_quantized,
    save_quantized,
    save_safetensors,
    smollm2_gguf,
)

__all__ = [
    "KV_FORMATS",
    "Generation",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "Pretrained",
    "Quantized",
    "RopeScaling",
    "generate",
    "load_pretrained",
    "load_quantized",
    "sample_logits",
    "save_quantized",
    "save_safetensors",
    "smollm2_gguf",
]
