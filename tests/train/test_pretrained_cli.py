"""config.model.pretrained: eval, ptq, generate and fine-tuning start from a pretrained checkpoint
(the tiny golden Llama of tests/data/pretrained)."""

import pathlib

import jax
import numpy as np
import pytest

from configs import shakespeare_tiny
from jaxquant.data import load_text
from jaxquant.models import load_pretrained
from jaxquant.train import ptq, trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKPOINT = str(ROOT / "tests" / "data" / "pretrained" / "llama_gqa")


def _config(tmp_path, **generate):
    c = shakespeare_tiny.get_config("runlocal")
    c.model.pretrained = CHECKPOINT
    # a small text of its own (tokenizing the 4.8 MB corpus with BPE costs seconds per Trainer)
    text = tmp_path / "text.txt"
    text.write_text(load_text("validation")[:60_000])
    c.data.path = str(text)
    c.train.seq_len = 32
    c.eval.variants = ""  # float only: the RTN variants are the evaluator's own tests
    c.eval.max_batches = 2
    c.generate.update(generate)
    return c


def test_eval_ptq_and_fine_tuning_start_from_the_pretrained_weights(tmp_path, capsys):
    _, params, tok = load_pretrained(CHECKPOINT)
    c = _config(tmp_path)
    # eval without a checkpoint: the pretrained model itself
    float_result = trainer.evaluate_checkpoint(c, tmp_path / "eval")[0]
    assert float_result.name == "float" and np.isfinite(float_result.perplexity)
    # ptq (RTN here; GPTQ's path after the params is the same as for a trained checkpoint)
    c.ptq.method = "rtn"
    results, _ = ptq.quantize_checkpoint(c, tmp_path / "eval")
    assert results[0].loss == float_result.loss
    assert [r.name for r in results] == ["float", "rtn_int4_g128"]
    # fine-tuning starts from the pretrained params (step 0 == loaded) and moves them
    ft = trainer.Trainer(c, tmp_path / "ft")
    assert ft.tokenizer.vocab_size == 320 and ft.model_config.rope_scaling is not None
    state = ft.init_state()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)
    state, losses = ft.train()
    assert len(losses) == c.train.num_steps and np.isfinite(losses).all()
    moved = jax.device_get(state.params)["layers_0"]["mlp"]["up"]["kernel"]
    assert not np.array_equal(moved, params["layers_0"]["mlp"]["up"]["kernel"])
    # eval, ptq and generate now read the fine-tuned checkpoint, not the pretrained weights
    with ft.checkpoint_manager() as manager:
        tuned, step = ft.initial_params(manager, "eval")
    assert step == c.train.num_steps
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tuned), jax.device_get(state.params))


def test_generate_mode_prints_text_and_speed(tmp_path, capsys):
    """``train.py --mode=generate`` calls ``trainer.generate_text`` (in-process here)."""
    c = _config(tmp_path, prompt="To be, or not", temperature=0.0, quant="int8", kv_cache="int8")
    out = trainer.generate_text(c, tmp_path / "gen")
    printed = capsys.readouterr().out
    assert printed.startswith("To be, or not" + out.text[0])
    assert f"[int8 (RTN, served) weights, int8 KV cache: {len(out.tokens[0])} tokens;" in printed
    assert "tokens/s" in printed and len(out.tokens[0]) <= c.generate.max_new_tokens


def test_generate_mode_without_weights_names_the_fix(tmp_path):
    c = shakespeare_tiny.get_config("runlocal")
    with pytest.raises(ValueError, match="no config.model.pretrained"):
        trainer.generate_text(c, tmp_path)
