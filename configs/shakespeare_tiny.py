"""shakespeare_tiny: a byte-level Llama on the bundled Shakespeare, trained on 2 CPU cores.

Run:
  python train.py --config=configs/shakespeare_tiny.py --workdir=/tmp/tiny
  python train.py --config=configs/shakespeare_tiny.py:qat_int8 --workdir=/tmp/tiny_int8
  python train.py --config=configs/shakespeare_tiny.py:qat_int4 --workdir=/tmp/tiny_int4
  python train.py --config=configs/shakespeare_tiny.py --config.quant.train=nvfp4 \
      --workdir=/tmp/tiny_nvfp4
  python train.py --config=configs/shakespeare_tiny.py --workdir=/tmp/tiny --mode=eval
  python train.py --config=configs/shakespeare_tiny.py --workdir=/tmp/tiny --mode=generate
  python train.py --config=configs/shakespeare_tiny.py --workdir=/tmp/tiny --mode=ptq \
      --config.ptq.format=int4_g128,mxfp4 --config.ptq.num_calibration_batches=16

The argument (after ':') is a comma-separated list of: ``qat_int8`` (int8 weights and
activations in QAT), ``qat_int4`` (int4 weights), ``runlocal`` (a few steps of a smaller model,
for tests). Any field can be overridden: ``--config.optim.lr=3e-3``.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = {a for a in (arg or "").split(",") if a}
    unknown = options - {"qat_int8", "qat_int4", "runlocal"}
    if unknown:
        raise ValueError(f"shakespeare_tiny: unknown config argument(s) {sorted(unknown)}.")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # a text file of your own; empty: the bundled corpus
    c.data.tokenizer = "byte"  # or "sentencepiece"
    c.data.vocab_size = 0  # sentencepiece only

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # a HF checkpoint dir or .gguf: its architecture, weights, tokenizer
    c.model.embed_dim = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.mlp_dim = 384
    c.model.tie_embeddings = True
    c.model.dtype = "float32"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32
    c.train.seq_len = 128
    c.train.num_steps = 1500
    c.train.grad_accum_steps = 1
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 100
    c.optim.final_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.name = "adamw"  # adamw | lion | sgd | shampoo
    c.optim.state_bits = 32  # 8 or 4: moments stored in 8 or 4 bits (jaxquant.optim)
    c.optim.state_format = (
        ""  # '': the bits' default; 8: dynamic|e4m3; 4: rank1|factorized|rank1_dynamic
    )
    c.optim.state_rounding = (
        ""  # '': the recipe's default (4-bit: stochastic); nearest | stochastic
    )
    c.optim.schedule = "cosine"  # cosine | inverse_sqrt | constant (horizon-free)
    c.optim.averaging = ""  # '' | ema (half-life grows with t) | lawa
    c.optim.ema_half_life_fraction = 0.04
    c.optim.lawa_k = 5
    c.optim.lawa_every = 100
    c.optim.shampoo_statistics_interval = 10  # name=shampoo: steps between L, R updates
    c.optim.shampoo_preconditioner_interval = 10  # and between inverse roots
    c.optim.shampoo_moment_bits = 32  # its Adam (graft, momentum) moments: 32, 8 or 4

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.quant = ml_collections.ConfigDict()
    c.quant.qat = "int8" if "qat_int8" in options else "int4" if "qat_int4" in options else ""
    # fully quantized training (all three matmuls of every linear layer): '' | fp8 |
    # fp8_rowwise | fp8_delayed | mxfp4_quartet | nvfp4 (jaxquant.numerics.training)
    c.quant.train = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32
    c.eval.max_batches = 0  # 0: the whole validation split
    c.eval.variants = "int8,int4"

    # --mode=ptq: quantize the trained checkpoint (jaxquant.train.ptq)
    c.ptq = ml_collections.ConfigDict()
    c.ptq.method = "hessian"  # GPTQ / block LDLQ, with the RTN baseline; or "rtn"
    c.ptq.format = "int4_g128,int3_g128,int2_g128"  # jaxquant.get_quantizer names
    c.ptq.group_size = 0  # 0: each quantizer's grouping; N > 0: groups of N inputs
    c.ptq.num_calibration_batches = 8  # of train.batch_size x train.seq_len tokens
    c.ptq.damp = 0.01
    c.ptq.order = ""  # GPTQ row order: "" (input order), "act" or "babai"

    # --mode=generate (jaxquant.train.trainer.generate_text)
    c.generate = ml_collections.ConfigDict()
    c.generate.prompt = "ROMEO:"
    c.generate.chat = False  # wrap the prompt in the tokenizer's chat template
    c.generate.max_new_tokens = 128
    c.generate.temperature = 0.8  # 0: greedy
    c.generate.top_k = 0
    c.generate.top_p = 0.95
    c.generate.seed = 0
    c.generate.kv_cache = "bfloat16"  # float32 | bfloat16 | int8 | int4 | none
    c.generate.quant = ""  # '' (float) or a quantizer name (RTN-frozen, served)

    if "runlocal" in options:
        c.model.embed_dim, c.model.num_layers, c.model.mlp_dim = 32, 1, 64
        c.train.batch_size, c.train.seq_len, c.train.num_steps = 8, 32, 6
        c.train.log_every, c.train.checkpoint_every = 1, 3
        c.optim.warmup_steps = 2
        c.eval.batch_size, c.eval.max_batches = 8, 4
        c.ptq.format, c.ptq.group_size, c.ptq.num_calibration_batches = "int4_g128", 16, 2
        c.generate.max_new_tokens = 8
    return c
