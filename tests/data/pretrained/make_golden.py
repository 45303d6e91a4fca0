"""Writes the golden Hugging Face checkpoints that tests/models/test_pretrained.py loads.

Three tiny random-initialised models, one per family jaxquant reads, saved as Hugging Face saves
them (config.json, safetensors, tokenizer files), with logits from the reference implementation
(``transformers``) in golden.npz, so the tests never need torch. Regenerate (deterministic) with
a separate environment:

  python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 transformers==5.25.0 \
      safetensors tokenizers numpy
  /tmp/refvenv/bin/python tests/data/pretrained/make_golden.py

Produced with torch 2.13.0+cpu and transformers 5.25.0.
"""

import gzip
import json
import os

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "..", "jaxquant", "data", "shakespeare", "train.txt.gz")
VOCAB = 320
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=2,
)
FAMILIES = {
    "llama_gqa": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 48,
            },
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(head_dim=24, sliding_window=24, rope_theta=10000.0, tie_word_embeddings=False),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
    ),
}


def make_tokenizer():
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text = f.read()[:300_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def main():
    torch.manual_seed(0)
    tok = make_tokenizer()
    text = "To be, or not to be, that is the question:"
    text_ids = np.asarray(tok.encode(text).ids, np.int32)
    tokens = np.random.default_rng(0).integers(3, VOCAB, (2, 64)).astype(np.int32)
    for name, (config_cls, model_cls, extra) in FAMILIES.items():
        out = os.path.join(HERE, name)
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(out):
            os.remove(os.path.join(out, f))
        config = config_cls(**COMMON, **extra, attn_implementation="eager")
        model = model_cls(config).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.ndim == 1 and "norm" in pname:
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:  # matrices and Qwen2's q/k/v biases
                    p.copy_(0.2 * torch.randn_like(p) if p.ndim > 1 else 0.5 * torch.randn_like(p))
            logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
            if name == "mistral":  # the window must matter within 64 positions
                config2 = config_cls(**{**COMMON, **extra, "sliding_window": None})
                config2._attn_implementation = "eager"
                full = model_cls(config2).eval()
                full.load_state_dict(model.state_dict())
                diff = np.abs(full(torch.from_numpy(tokens).long()).logits.numpy() - logits)
                print(
                    "mistral: |window - no window| at positions < 24:",
                    diff[:, :24].max(),
                    ">= 24:",
                    diff[:, 24:].max(),
                )
                assert diff[:, :24].max() < 1e-5 and diff[:, 24:].max() > 1e-2
        inv_freq = model.model.rotary_emb.inv_freq.float().numpy()
        shard = "250KB" if name == "llama_gqa" else "10GB"
        model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
        tok.save(os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(
                {"bos_token": SPECIAL[0], "eos_token": SPECIAL[2], "chat_template": CHAT},
                f,
                indent=2,
            )
        np.savez(
            os.path.join(out, "golden.npz"),
            tokens=tokens,
            logits=logits.astype(np.float32),
            inv_freq=inv_freq.astype(np.float32),
            text=np.asarray(text),
            text_ids=text_ids,
        )
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(name, sorted(os.listdir(out)), f"{size / 1e3:.0f} kB")
    print("torch", torch.__version__, "transformers", transformers.__version__)


if __name__ == "__main__":
    main()
