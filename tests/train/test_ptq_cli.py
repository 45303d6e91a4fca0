"""``train.py --mode=ptq`` on a freshly trained tiny model: the table, the saved checkpoints."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shakespeare_tiny
from jaxquant.nn import QuantConfig, serving_params
from jaxquant.train import ptq, trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_ptq_mode_prints_float_rtn_and_gptq_saves_each_variant_and_they_restore(tmp_path):
    """One test (the steps share a trained workdir, and pytest-xdist may split tests)."""
    workdir = tmp_path / "tiny"
    # Trained in this process (8 devices; train.py's train mode runs in test_trainer's
    # two-process test): the CLI below restores the checkpoint on its one device.
    trainer.Trainer(shakespeare_tiny.get_config("runlocal"), workdir).train()
    config = "--config=" + str(ROOT / "configs/shakespeare_tiny.py") + ":runlocal"
    out = _run(
        config,
        f"--workdir={workdir}",
        "--mode=ptq",
        "--config.ptq.format=int4_g128",
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\| (\w+) \| ([\d.]+) \| ([+-][\d.]+) \|.*\| ([\d.]+) \| .*\|$", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(4)))
    names = ["float", "rtn_int4_g128", "gptq_int4_g128"]
    assert list(rows) == names, out.stdout
    assert rows["float"][1] == 32.0
    assert rows["rtn_int4_g128"][1] == rows["gptq_int4_g128"][1] < 32  # same storage
    assert "layer error / RTN's" in out.stdout
    assert "ptq gptq int4_g128" in out.stdout  # the progress bar over layers
    for name in names[1:]:
        meta = json.loads((workdir / "ptq" / name / "meta.json").read_text())
        assert meta["method"] == name.split("_")[0]
        assert meta["val_loss"] == pytest.approx(rows[name][0], abs=1e-4)

    # The saved GPTQ variant restores and serves exactly its reported loss.
    cfg = shakespeare_tiny.get_config("runlocal")
    t = trainer.Trainer(cfg, workdir)
    with t.checkpoint_manager() as manager:
        state = t.restore_or_init(manager)
    params = jax.device_get(state.params)
    rules = ptq.ptq_rules("int4_g128", cfg.ptq.group_size)
    sample = np.zeros((1, cfg.train.seq_len), np.int32)
    quant = ptq.load_quant(workdir / "ptq" / "gptq_int4_g128", t.float_model, params, rules, sample)
    served = t.float_model.clone(quant=QuantConfig(mode="serve", rules=rules))
    result = t.evaluator().evaluate(
        {"params": serving_params(params, quant), "quant": quant}, model=served
    )
    meta = json.loads((workdir / "ptq" / "gptq_int4_g128" / "meta.json").read_text())
    assert result.loss == pytest.approx(meta["val_loss"], abs=1e-6)


def test_ptq_mode_errors_name_the_problem(tmp_path):
    config = "--config=" + str(ROOT / "configs/shakespeare_tiny.py") + ":runlocal"
    workdir = tmp_path / "empty"
    out = _run(config, f"--workdir={workdir}", "--mode=ptq", cwd=ROOT)
    assert out.returncode != 0 and "no checkpoint" in out.stderr
    # The rest in this process: train.py --mode=ptq is quantize_checkpoint(config, workdir),
    # and the CLI's error path is the one above.
    for field, value, match in [
        ("format", "int9", "quantizer name 'int9'"),
        ("method", "awq", "config.ptq.method"),
    ]:
        cfg = shakespeare_tiny.get_config("runlocal")
        setattr(cfg.ptq, field, value)
        with pytest.raises(ValueError, match=match):
            ptq.quantize_checkpoint(cfg, workdir)


@pytest.mark.parametrize(
    "name,fmt,group",
    [
        ("int4_g128", "int4", 128),
        ("int4_g64", "int4", 64),
        ("int3_g32", "int3", 32),
        ("nf4", "nf4", 64),
    ],
)
def test_ptq_rules_take_quantizer_names_and_group_suffixes(name, fmt, group):
    (rule,) = ptq.ptq_rules(name)
    assert rule.weight.format.name == fmt
    assert rule.weight.scaling.group_size == group
    assert ptq.ptq_rules(name, 16)[0].weight.scaling.group_size == 16


def test_ptq_rules_reject_unknown_names():
    with pytest.raises(ValueError, match="quantizer name 'int9_g64'"):
        ptq.ptq_rules("int9_g64")
