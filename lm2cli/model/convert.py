"""Import Hugging Face Llama weights into the lm2 model core.

`llama_from_hf(state_dict, config)` maps a `LlamaForCausalLM` state dict (and its config.json as a dict) onto
lm2's parameter names: the vanilla arch then gives the same logits as transformers (a parity test checks
1e-4). Built with arch = "lm2" the same weights load into the backbone and the memory modules start fresh,
which is how memory is put on a pretrained Llama (`lm2 finetune` with `finetune.init_from = <hf dir>`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lm2cli.errors import Lm2Error


def recipe_overrides_from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> list[str]:
    """`--set`-style overrides that give the lm2 recipe the shapes of a Hugging Face Llama config."""
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        raise Lm2Error(f"{where}: model_type '{cfg.get('model_type')}' is not a Llama model; expected 'llama'")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise Lm2Error(f"{where}: RoPE scaling '{rope_type}' is not supported yet; lm2 supports plain RoPE "
                       "(rope_type 'default')")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise Lm2Error(f"{where}: attention_bias/mlp_bias = true is not supported; lm2's Llama has no biases")
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, d // heads):
        raise Lm2Error(f"{where}: head_dim {cfg['head_dim']} differs from hidden_size / num_attention_heads")
    if cfg.get("sliding_window"):
        raise Lm2Error(f"{where}: sliding_window models are not supported by the converter")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return [
        f"model.vocab_size={cfg['vocab_size']}", f"model.d_model={d}",
        f"model.n_layers={cfg['num_hidden_layers']}", f"model.n_heads={heads}",
        f"model.n_kv_heads={cfg.get('num_key_value_heads') or heads}",
        f"model.ffn_hidden={cfg['intermediate_size']}", f"model.rope_theta={float(theta)}",
        f"model.norm_eps={float(cfg.get('rms_norm_eps', 1e-6))}",
        f"model.tie_embeddings={'true' if cfg.get('tie_word_embeddings', False) else 'false'}",
        f"model.max_seq_len={cfg.get('max_position_embeddings', 4096)}",
    ]


def llama_from_hf(hf_state: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Rename and fuse a HF Llama state dict into lm2 parameter names (backbone only)."""
    state = {k.removeprefix("module."): v for k, v in hf_state.items()}
    out: dict[str, Tensor] = {"tok_emb.weight": state["model.embed_tokens.weight"],
                              "norm.weight": state["model.norm.weight"]}
    # Tied models share one tensor; lm2 lists it under both names like torch does.
    tied = cfg.get("tie_word_embeddings", False)
    out["lm_head.weight"] = state["model.embed_tokens.weight"] if tied else state["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        # q, k and v are fused into one projection in lm2 (one matmul): concatenate along the output rows.
        out[dst + "attn.wqkv.weight"] = torch.cat([state[src + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.wo.weight"] = state[src + "self_attn.o_proj.weight"]
        out[dst + "ffn.w_gate_up.weight"] = torch.cat([state[src + "mlp.gate_proj.weight"],
                                                       state[src + "mlp.up_proj.weight"]])
        out[dst + "ffn.w_down.weight"] = state[src + "mlp.down_proj.weight"]
        out[dst + "norm1.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "norm2.weight"] = state[src + "post_attention_layernorm.weight"]
    return out


def read_hf_llama_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config dict, state dict) of a Hugging Face model directory; safetensors preferred, no pickles."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise Lm2Error(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise Lm2Error(f"{config_path}: invalid JSON ({e})") from None
    state: dict[str, Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if files:
        for f in files:
            try:
                state.update(load_file(f))
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise Lm2Error(f"{f}: cannot read safetensors file ({e})") from None
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise Lm2Error(f"{path}: no *.safetensors or pytorch_model*.bin weight files")
        for f in bins:  # weights_only: never unpickle arbitrary objects from a downloaded file
            try:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:
                raise Lm2Error(f"{f}: cannot read weights ({e})") from None
    return cfg, state
