"""Train, evaluate, quantize or generate with a jaxquant model.

  python train.py --config=configs/shakespeare_tiny.py --workdir=/tmp/tiny \
      [--mode=train|eval|ptq|generate]
  python train.py --config=configs/smollm2_135m.py --workdir=/tmp/smol --mode=generate \
      --config.generate.prompt="The capital of France is"

--mode=ptq quantizes the latest checkpoint by round-to-nearest and from calibration Hessians
(GPTQ for scalar formats, block LDLQ for vector ones; config.ptq), saves each variant under
workdir/ptq/ and prints float vs RTN vs the Hessian-aware method.

Flags override config fields: --config.train.num_steps=200 --config.optim.lr=1e-3.
Multi-host: --coordinator_address=host:port --num_processes=N --process_id=i on every process.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file (configs/*.py), optionally with ':arg'.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard logs.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "ptq", "generate"],
    "train (then evaluate); eval a checkpoint; ptq: quantize a checkpoint (RTN, GPTQ/HAVQ); "
    "generate: continue config.generate.prompt. Without a checkpoint in workdir, eval, ptq and "
    "generate use config.model.pretrained.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    import jax

    if _COORDINATOR.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    from jaxquant.train import trainer

    if _MODE.value == "train":
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "generate":
        trainer.generate_text(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "ptq":
        from jaxquant.train import ptq

        ptq.quantize_checkpoint(_CONFIG.value, _WORKDIR.value)
    else:
        trainer.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
