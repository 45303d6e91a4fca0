"""The Trainer: resumes bit-exactly, shards without changing the math, runs multi-process."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shakespeare_tiny
from jaxquant import optim
from jaxquant.numerics.qarray import QArray
from jaxquant.train import metrics, trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(**overrides):
    c = shakespeare_tiny.get_config("runlocal")
    c.eval.variants = "int8"
    for key, value in overrides.items():
        section, field = key.split(".")
        setattr(getattr(c, section), field, value)
    return c


@pytest.fixture(scope="module")
def f32_losses(tmp_path_factory):
    """The 6 losses of the runlocal config (f32 Adam, pure data parallel), trained once per
    module (per xdist worker): the reference several tests compare against."""
    _, losses = trainer.Trainer(_config(), tmp_path_factory.mktemp("f32")).train()
    return losses


def test_interrupted_run_resumes_to_exactly_the_same_losses(tmp_path, f32_losses):
    losses = f32_losses
    assert len(losses) == 6 and all(np.isfinite(losses))
    part = tmp_path / "part"
    _, first = trainer.Trainer(_config(), part).train(stop_at=4)
    resumed = trainer.Trainer(_config(), part)  # a new process would start like this
    state, rest = resumed.train()
    assert int(state.step) == 6
    assert first + rest == losses  # bit-exact floats


def test_sharded_mesh_gives_the_same_losses_as_pure_data_parallel(tmp_path, f32_losses):
    dp = f32_losses
    cfg = _config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    t = trainer.Trainer(cfg, tmp_path / "fsdp_tp")
    state, sharded = t.train()
    np.testing.assert_allclose(sharded, dp, rtol=2e-5)
    kernel = state.params["layers_0"]["mlp"]["gate"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    mu = state.opt_state[1][0].mu["layers_0"]["mlp"]["gate"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec  # Adam's moments shard like their param


def _assert_restores_bit_exactly(cfg, workdir, state):
    """A fresh Trainer restores ``workdir``'s checkpoint as ``state`` bit for bit: the same tree
    (quantized moments, their static formats), dtypes, shardings and values. The step is a pure
    function of the state (stochastic rounding keys come from its count) and the data position
    is restored as in test_interrupted_run_resumes_to_exactly_the_same_losses, so a run resumed
    from it continues exactly; comparing the state itself also covers moments whose error
    would not yet show in a few losses. (Checked directly instead of training the run twice.)"""
    t = trainer.Trainer(cfg, workdir)
    with t.checkpoint_manager() as manager:
        restored = t.restore_or_init(manager)
    assert int(restored.step) == int(state.step) == cfg.train.num_steps
    want, tree = jax.tree.flatten(state)
    got, restored_tree = jax.tree.flatten(restored)
    assert restored_tree == tree
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_8bit_optimizer_states_train_shard_and_resume_exactly(tmp_path, f32_losses):
    """config.optim.state_bits=8: quantized moments on a sharded mesh, checkpointed and restored."""
    cfg = _config(**{"optim.state_bits": 8})
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    state, losses = trainer.Trainer(cfg, tmp_path / "full").train()
    mu = state.opt_state[1][0].mu
    assert isinstance(mu["embed"]["embedding"], optim.QuantizedMoment)  # 8192 elements
    kernel = state.params["layers_0"]["mlp"]["gate"]["kernel"]  # 2048 < 4096: stays f32
    assert mu["layers_0"]["mlp"]["gate"]["kernel"].sharding.spec == kernel.sharding.spec
    np.testing.assert_allclose(losses, f32_losses, rtol=2e-2)
    _assert_restores_bit_exactly(cfg, tmp_path / "full", state)


def test_4bit_states_shard_over_the_mesh_and_resume_exactly(tmp_path, f32_losses):
    """--config.optim.state_bits=4 --config.optim.state_format=rank1: 4-bit moments (rank-1
    second moment, stochastic rounding) train on a 2x2x2 mesh, the quantized codes spread over
    all 8 devices, and the checkpoint restores them bit-exactly."""
    cfg = _config(**{"optim.state_bits": 4, "optim.state_format": "rank1"})
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    state, losses = trainer.Trainer(cfg, tmp_path / "full").train()
    adam = state.opt_state[1][0]
    mu, nu = adam.mu["embed"]["embedding"], adam.nu["embed"]["embedding"]
    assert mu.q.format.name == "nf4" and len(nu.axis_max) == 2
    spread = jax.sharding.PartitionSpec(("data", "fsdp", "tensor"))
    assert mu.q.codes.sharding.spec == spread  # 4096 bytes: 512 per device
    assert mu.q.scale.sharding.spec == jax.sharding.PartitionSpec()  # 64 scales: replicated
    np.testing.assert_allclose(losses, f32_losses, rtol=2e-2)
    _assert_restores_bit_exactly(cfg, tmp_path / "full", state)


@pytest.mark.parametrize(
    "overrides",
    [
        {"optim.name": "lion", "optim.state_bits": 8, "optim.state_rounding": "stochastic"},
        {"optim.name": "sgd", "optim.state_bits": 8, "optim.lr": 0.3},
        pytest.param(  # the state_format wiring: as the factorized case; e4m3 in tests/optim
            {"optim.state_bits": 8, "optim.state_format": "e4m3"}, marks=pytest.mark.slow
        ),
        {"optim.state_bits": 4},  # the default 4-bit recipe, factorized
        {
            "optim.name": "shampoo",
            "optim.state_bits": 4,
            "optim.shampoo_statistics_interval": 2,
            "optim.shampoo_moment_bits": 4,
        },
    ],
    ids=["lion8", "sgd8", "adam_e4m3", "adam_4bit_factorized", "shampoo4"],
)
def test_optimizer_and_state_format_are_chosen_by_config(tmp_path, overrides):
    cfg = _config(**overrides)
    state, losses = trainer.Trainer(cfg, tmp_path).train()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    is_q = lambda x: isinstance(x, (optim.QuantizedMoment, QArray))  # noqa: E731
    quantized = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_q) if is_q(x)]
    bits = {(x.q if isinstance(x, optim.QuantizedMoment) else x).format.bits for x in quantized}
    assert quantized and bits == {cfg.optim.state_bits}


@pytest.mark.parametrize(
    "averaging",
    ["ema", pytest.param("lawa", marks=pytest.mark.slow)],  # LAWA itself: optim/test_averaging
)
def test_weight_averaging_is_trained_sharded_and_evaluated(tmp_path, averaging):
    cfg = _config(**{"optim.averaging": averaging, "optim.schedule": "constant"})
    cfg.optim.lawa_every = 2
    cfg.eval.variants = ""  # quantized variants: test_qat_trains_and_the_evaluator_reports_...
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    results = trainer.train_and_evaluate(cfg, tmp_path)
    assert [r.name for r in results][:2] == ["float", f"float ({averaging} average)"]
    assert results[0].loss != results[1].loss and np.isfinite(results[1].loss)


def test_bad_optimizer_config_values_get_clear_errors(tmp_path):
    for field, value in [
        ("name", "adagrad"),
        ("schedule", "linear"),
        ("averaging", "swa"),
        ("state_format", "nf4"),
    ]:
        with pytest.raises(ValueError, match=field):
            trainer.Trainer(_config(**{f"optim.{field}": value}), tmp_path)
    with pytest.raises(ValueError, match="state_bits"):
        trainer.Trainer(_config(**{"optim.state_bits": 16}), tmp_path)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, f32_losses):
    _, acc = trainer.Trainer(_config(**{"train.grad_accum_steps": 4}), tmp_path).train()
    np.testing.assert_allclose(acc, f32_losses, rtol=1e-5)


def test_qat_trains_and_the_evaluator_reports_every_variant(tmp_path):
    cfg = shakespeare_tiny.get_config("runlocal,qat_int4")
    cfg.eval.variants = "int8,int4"
    results = trainer.train_and_evaluate(cfg, tmp_path)
    assert [r.name for r in results] == ["float", "int8", "int4", "qat_int4"]
    assert all(np.isfinite(r.loss) for r in results)
    events = metrics.read_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in events["train/loss"]] == list(range(1, 7))


def test_fp8_delayed_histories_shard_checkpoint_and_resume_exactly(tmp_path):
    """--config.quant.train=fp8_delayed: the amax histories live in the train state
    (replicated over a 2x2x2 mesh; each amax is a max over the whole sharded tensor:
    tests/numerics/test_training.py), are checkpointed and restored bit-exactly (so a resumed
    run continues exactly: see _assert_restores_bit_exactly)."""
    cfg = _config(**{"quant.train": "fp8_delayed", "eval.variants": "", "eval.max_batches": 2})
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    t = trainer.Trainer(cfg, tmp_path / "full")
    state, losses = t.train()
    # the evaluation adds the model with its quantized forward (reading the histories)
    results = t.evaluate(state.params, state.overwrite)
    assert [r.name for r in results] == ["float", "fp8_delayed forward"]
    assert results[0].loss != results[1].loss
    hist = state.overwrite["layers_0"]["mlp"]["up"]["kernel_amax_history"]
    assert hist["forward_lhs"].sharding.is_fully_replicated
    assert np.all(np.asarray(hist["forward_lhs"][:6]) > 0)  # one amax per step, newest first
    assert np.all(np.asarray(hist["forward_lhs"][6:]) == 0)
    assert len(losses) == 6 and all(np.isfinite(losses))
    _assert_restores_bit_exactly(cfg, tmp_path / "full", state)


@pytest.mark.slow  # the trainer's recipe path: the fp8_delayed test; the rng stream: tests/nn
def test_quartet_trains_and_reports_its_quantized_forward(tmp_path):
    """A recipe that draws random signs trains (its keys from the 'train_recipe' stream) and
    the evaluation adds the model with its quantized forward."""
    # 4 KV heads of 8: the K/V projections' 32 outputs take Hadamard blocks of 32
    cfg = _config(
        **{
            "quant.train": "mxfp4_quartet",
            "model.num_kv_heads": 4,
            "eval.variants": "",
            "eval.max_batches": 2,
            "train.num_steps": 2,
        }
    )
    t = trainer.Trainer(cfg, tmp_path)
    state, losses = t.train()
    results = t.evaluate(state.params, state.overwrite)
    assert [r.name for r in results] == ["float", "mxfp4_quartet forward"]
    assert all(np.isfinite(r.loss) for r in results) and all(np.isfinite(losses))
    assert results[0].loss != results[1].loss


def test_bad_config_values_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="grad_accum_steps"):
        trainer.Trainer(_config(**{"train.grad_accum_steps": 3}), tmp_path)
    cfg = _config()
    cfg.quant.qat = "int3"
    with pytest.raises(ValueError, match="config.quant.qat='int3'"):
        trainer.Trainer(cfg, tmp_path)
    with pytest.raises(ValueError, match="config.quant.train='fp6'"):
        trainer.Trainer(_config(**{"quant.train": "fp6"}), tmp_path)
    with pytest.raises(ValueError, match="set one of them"):
        trainer.Trainer(_config(**{"quant.train": "fp8", "quant.qat": "int8"}), tmp_path)
    with pytest.raises(ValueError, match="unknown config argument"):
        shakespeare_tiny.get_config("fast")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_in_lockstep_with_one_process_on_eight_devices(tmp_path, f32_losses):
    """2 processes x 4 fake CPU devices (gloo collectives) == 1 process x 8 devices."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    common = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config=" + str(ROOT / "configs/shakespeare_tiny.py") + ":runlocal",
        "--config.eval.variants=",
        f"--workdir={tmp_path / 'multi'}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            common + [f"--process_id={i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    multi = [v for _, v in metrics.read_scalars(tmp_path / "multi" / "tensorboard")["train/loss"]]
    # one process x 8 devices: the same config (eval.variants only matters after training)
    np.testing.assert_allclose(multi, f32_losses, rtol=2e-5)


def test_train_py_help_documents_the_flags():
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--helpfull"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for flag in ("--config", "--workdir", "--mode", "--coordinator_address"):
        assert flag in out


@pytest.mark.parametrize("arg", ["", "qat_int8", "qat_int4", "runlocal"])
def test_every_config_and_variant_builds_a_valid_model(arg):
    from configs import shakespeare_small

    for module in (shakespeare_tiny, shakespeare_small):
        cfg = module.get_config(arg)
        model = trainer.model_config(cfg, vocab_size=256)
        assert model.num_heads % model.num_kv_heads == 0
        assert cfg.quant.qat == {"qat_int8": "int8", "qat_int4": "int4"}.get(arg, "")
        assert cfg.train.batch_size % cfg.train.grad_accum_steps == 0
