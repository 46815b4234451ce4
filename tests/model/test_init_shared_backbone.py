"""The same seed gives LM2, RMT and vanilla the same backbone weights: a comparison measures the memory path.

Before, the memory modules drew their weights in the middle of the backbone's draw, so an LM2 built from seed s
started from a different backbone than the vanilla model from seed s; on qa1 a vanilla model started from LM2's
draw learned as slowly as LM2 did (docs/results.md), so single-seed LM2-vs-vanilla curves compared draws, not
architectures.
"""

from __future__ import annotations

import pytest
import torch

from lm2cli import build_model, load_recipe

SHAPE = ["model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=40",
         "memory.slots=4", "memory.heads=2", "memory.segment_len=8", "attention.window=8"]


def weights(arch: str, seed: int = 5, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(load_recipe(None, [f"model.arch={arch}", *SHAPE, *extra]))
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["lm2", "rmt"])
def test_memory_models_start_from_the_vanilla_backbone_of_the_same_seed(arch):
    vanilla, other = weights("vanilla"), weights(arch)
    assert set(vanilla) < set(other)  # the memory path adds parameters, the backbone's names are shared
    for name, tensor in vanilla.items():
        assert torch.equal(tensor, other[name]), name


def test_memory_layers_do_not_shift_the_backbone_draw():
    every, first = weights("lm2"), weights("lm2", extra=("memory.layers=[0]",))
    for name, tensor in every.items():
        if ".memory." not in name:
            assert torch.equal(tensor, first[name]), name


def test_another_seed_draws_another_backbone_and_memory():
    a, b = weights("lm2", seed=5), weights("lm2", seed=6)
    assert not torch.equal(a["blocks.0.attn.wqkv.weight"], b["blocks.0.attn.wqkv.weight"])
    assert not torch.equal(a["blocks.0.memory.qu_proj.weight"], b["blocks.0.memory.qu_proj.weight"])


def test_memory_weights_are_drawn_at_the_init_std():
    w = weights("lm2", extra=("model.init_std=0.1",))
    drawn = torch.cat([t.flatten() for n, t in w.items() if ".memory." in n and n.endswith("proj.weight")])
    assert 0.09 < drawn.std().item() < 0.11
