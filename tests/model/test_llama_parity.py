"""The vanilla backbone equals Hugging Face Llama (random weights, built locally, no download)."""

from __future__ import annotations

import pytest
import torch

from lm2cli import build_model, load_recipe
from lm2cli.errors import Lm2Error
from lm2cli.model.convert import llama_from_hf, read_hf_llama_dir, recipe_overrides_from_hf_config

transformers = pytest.importorskip("transformers")


def hf_llama(tie: bool, kv_heads: int):
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=kv_heads, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 8)])
def test_vanilla_matches_transformers_llama(tie, kv_heads):
    hf = hf_llama(tie, kv_heads)
    cfg = hf.config.to_dict()
    model = build_model(load_recipe(None, ["model.arch=vanilla", *recipe_overrides_from_hf_config(cfg)])).eval()
    model.load_state_dict(llama_from_hf(hf.state_dict(), cfg), strict=True)
    x = torch.randint(0, 97, (2, 70))
    with torch.no_grad():
        ref = hf(x).logits
        ours, _ = model(x)
        # token by token through the state, as generation does
        state, steps = None, []
        for i in range(x.shape[1]):
            logits, state = model(x[:, i:i + 1], state)
            steps.append(logits)
    assert (ours - ref).abs().max() <= 1e-4
    assert (torch.cat(steps, 1) - ref).abs().max() <= 1e-4


def test_hf_weights_load_under_lm2_memory(tmp_path):
    hf = hf_llama(False, 2)
    hf.save_pretrained(tmp_path)
    cfg, state = read_hf_llama_dir(tmp_path)
    recipe = load_recipe(None, ["model.arch=lm2", "memory.out_gate_bias=-20", "memory.heads=4",
                                *recipe_overrides_from_hf_config(cfg)])
    model = build_model(recipe).eval()
    missing, unexpected = model.load_state_dict(llama_from_hf(state, cfg), strict=False)
    assert not unexpected and missing and all(".memory." in k for k in missing)
    # with the output gate closed, memory adds (almost) nothing: the pretrained model is intact
    x = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max() < 1e-3


def test_converter_rejects_unsupported_configs(tmp_path):
    with pytest.raises(Lm2Error, match="not a Hugging Face model directory"):
        read_hf_llama_dir(tmp_path)
    cfg = hf_llama(False, 2).config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4}
    with pytest.raises(Lm2Error, match="yarn"):
        recipe_overrides_from_hf_config(cfg)
