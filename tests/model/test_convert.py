"""The Hugging Face converter on hand-written config.json dicts and weight files: the keys that older and newer
transformers versions write, tied checkpoints saved without lm_head, .bin weights, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lm2cli.errors import Lm2Error
from lm2cli.model.convert import llama_from_hf, read_hf_llama_dir, recipe_overrides_from_hf_config

CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 11, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 64}


def hf_state(vocab=11, d=8, hidden=16, kv=4, lm_head=True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=g), "model.norm.weight": torch.ones(d)}
    if lm_head:
        w["lm_head.weight"] = torch.randn(vocab, d, generator=g)
    p = "model.layers.0."
    for name, shape in [("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (kv, d)), ("self_attn.v_proj", (kv, d)),
                        ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (hidden, d)), ("mlp.up_proj", (hidden, d)),
                        ("mlp.down_proj", (d, hidden))]:
        w[f"{p}{name}.weight"] = torch.randn(*shape, generator=g)
    w[p + "input_layernorm.weight"] = torch.ones(d)
    w[p + "post_attention_layernorm.weight"] = torch.ones(d)
    return w


def test_overrides_take_rope_theta_and_tying_from_the_top_level_keys():
    """Older transformers write rope_theta at the top level (no rope_parameters)."""
    overrides = recipe_overrides_from_hf_config(dict(CONFIG, rope_theta=500000.0, tie_word_embeddings=True))
    assert "model.rope_theta=500000.0" in overrides and "model.tie_embeddings=true" in overrides
    assert "model.n_kv_heads=1" in overrides and "model.ffn_hidden=16" in overrides
    plain = recipe_overrides_from_hf_config(CONFIG)
    assert "model.rope_theta=10000.0" in plain and "model.tie_embeddings=false" in plain


def test_tied_checkpoint_saved_without_lm_head_uses_the_embedding():
    """save_pretrained leaves out lm_head.weight of a tied model: the output projection is the embedding."""
    state = hf_state(lm_head=False)
    out = llama_from_hf(state, dict(CONFIG, tie_word_embeddings=True))
    assert out["lm_head.weight"] is state["model.embed_tokens.weight"]
    untied = hf_state()
    assert torch.equal(llama_from_hf(untied, CONFIG)["lm_head.weight"], untied["lm_head.weight"])


@pytest.mark.parametrize("extra, message", [
    ({"head_dim": 2}, "head_dim 2 differs"),
    ({"sliding_window": 4096}, "sliding_window models are not supported"),
    ({"attention_bias": True}, "attention_bias/mlp_bias"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not a Llama model"),
])
def test_unsupported_configs_are_named(extra, message):
    with pytest.raises(Lm2Error, match=message):
        recipe_overrides_from_hf_config(dict(CONFIG, **extra))


def test_bin_weights_are_read_without_unpickling_objects(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(Lm2Error, match=r"no \*\.safetensors or pytorch_model\*\.bin weight files"):
        read_hf_llama_dir(tmp_path)
    state = hf_state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    cfg, loaded = read_hf_llama_dir(tmp_path)
    assert cfg == CONFIG and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"weights": state, "note": object()}, tmp_path / "pytorch_model.bin")  # needs a real unpickle
    with pytest.raises(Lm2Error, match="cannot read weights"):
        read_hf_llama_dir(tmp_path)


def test_safetensors_are_preferred_and_a_broken_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    state = hf_state()
    save_file(state, tmp_path / "model.safetensors")
    torch.save({}, tmp_path / "pytorch_model.bin")
    _, loaded = read_hf_llama_dir(tmp_path)
    assert loaded.keys() == state.keys()
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(Lm2Error, match="model.safetensors: cannot read safetensors file"):
        read_hf_llama_dir(tmp_path)
