"""FSDP (train.distributed = "fsdp" under torchrun): parameters, gradients and optimizer state sharded over
processes, for models whose training state does not fit one device.

Each decoder block is one FSDP unit (gathered for its forward and backward, then freed) and the root holds
the embedding, final norm and output layer. Checkpoints stay in the one shared format: the full weights and
the full optimizer state are gathered to rank 0 (on CPU) and written exactly as without FSDP, so generation,
evaluation and a resume with any number of processes read them alike. This uses torch's FSDP2
(`torch.distributed.fsdp.fully_shard`) and `torch.distributed.checkpoint.state_dict`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

FULL_ON_RANK0 = dict(full_state_dict=True, cpu_offload=True)


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    # A block returns its kept keys and values (views of the projection) for the next segment; they are only
    # ever concatenated, never changed in place, so FSDP's warning about in-place ops on returned views does
    # not apply and would print on every run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on accumulation micro-batches (FSDP's counterpart of DDP's no_sync)."""
    model.set_requires_gradient_sync(enabled)


def gathered_model(model: nn.Module, recipe, rank: int) -> nn.Module | None:
    """A plain CPU copy of the full model on rank 0 (None elsewhere). Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lm2cli.model import build_model

    full = get_model_state_dict(model, options=StateDictOptions(**FULL_ON_RANK0))
    if rank != 0:
        return None
    plain = build_model(recipe)
    plain.load_state_dict(full)
    return plain


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by parameter name (complete on rank 0). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**FULL_ON_RANK0))


def load_model_file(model: nn.Module, path: Path) -> None:
    """Load a full model.safetensors into the sharded model (every rank reads the file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from lm2cli.checkpoint import read_weights

    full = read_weights(path)
    own = model.state_dict()
    for name in own:  # tied weights are stored once: fill the other name from the same tensor
        if name not in full and name == "lm_head.weight" and "tok_emb.weight" in full:
            full[name] = full["tok_emb.weight"]
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from lm2cli.training import checkpoints as ck

    state, meta = ck.read_optimizer_state(ckpt)
    current = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    ck.check_group_layout(ckpt, meta, [(g.get("name", str(i)), len(g["params"]))
                                       for i, g in enumerate(current["param_groups"])])
    current["state"] = ck.rekey(state, ck.optimizer_param_names(model, optimizer), by_name=True)
    set_optimizer_state_dict(model, optimizer, current, options=StateDictOptions(full_state_dict=True))
