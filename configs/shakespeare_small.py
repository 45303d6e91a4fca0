"""shakespeare_small: the quality recipe, a larger byte-level Llama on the bundled Shakespeare.

Run:
  python train.py --config=configs/shakespeare_small.py --workdir=/tmp/small
  python train.py --config=configs/shakespeare_small.py:qat_int8 --workdir=/tmp/small_int8
  python train.py --config=configs/shakespeare_small.py:qat_int4 --workdir=/tmp/small_int4

Arguments as in shakespeare_tiny (``qat_int8``, ``qat_int4``, ``runlocal``).
"""

import ml_collections

from configs import shakespeare_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = {a for a in (arg or "").split(",") if a}
    c = shakespeare_tiny.get_config(",".join(sorted(options - {"runlocal"})))
    c.model.embed_dim = 192
    c.model.num_layers = 6
    c.model.num_heads = 6
    c.model.num_kv_heads = 2
    c.model.mlp_dim = 512
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.num_steps = 2000
    c.train.checkpoint_every = 250
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 200
    if "runlocal" in options:
        local = shakespeare_tiny.get_config("runlocal")
        c.model, c.train = local.model, local.train
        c.optim.warmup_steps, c.eval, c.ptq = local.optim.warmup_steps, local.eval, local.ptq
    return c
