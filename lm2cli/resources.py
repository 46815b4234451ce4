"""Will it fit? Memory estimates from a recipe, made before anything is allocated.

A recipe (or a checkpoint's recipe) can ask for sizes no machine has: `memory.slots = 10000000000`,
`model.d_model = 1048576`, `train.batch_size = 100000000`. Allocating first ends in an allocator traceback, or
worse, in minutes of swapping on a shared machine. So every command that builds a model first builds it on
torch's meta device (shapes only, no memory), estimates what it needs, compares that with what the machine
has (MemAvailable + SwapFree from /proc/meminfo on CPU, `torch.cuda.mem_get_info` on a GPU) and refuses with
one line naming the recipe keys to lower.

The estimate is deliberately a lower bound (weights, gradients, AdamW moments, the memory state, and the
activations a backward pass must keep, with no allowance for allocator slack or temporaries), so it refuses
only what cannot fit, never a run that merely might not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lm2cli.errors import Lm2Error

GIB = 1 << 30


@dataclass
class Estimate:
    """Bytes by what needs them, and the recipe keys that size each part."""

    parts: dict[str, int] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)

    def add(self, what: str, n_bytes: float, keys: list[str]) -> None:
        self.parts[what] = self.parts.get(what, 0) + int(n_bytes)
        self.keys.setdefault(what, keys)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{what} {fmt_bytes(n)}" for what, n in self.parts.items() if n)

    def largest_keys(self) -> list[str]:
        what = max(self.parts, key=self.parts.get)
        return self.keys[what]


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1024:,.1f} KiB"


def meta_model(recipe, vocab_size: int):
    """The recipe's model with every tensor on the meta device: exact shapes, no memory."""
    import torch

    from lm2cli.model import build_model

    with torch.device("meta"):
        return build_model(recipe, vocab_size)


def _weight_keys(model) -> list[str]:
    """The keys that size the largest share of the parameters."""
    rep = model.param_report()  # the embedding is counted inside the backbone
    shares = {"embedding": rep["embedding"], "memory": rep["memory"], "blocks": rep["backbone"] - rep["embedding"]}
    return {"embedding": ["model.vocab_size (the tokenizer's vocabulary)", "model.d_model"],
            "memory": ["memory.slots", "memory.slot_dim", "model.d_model"],
            "blocks": ["model.d_model", "model.n_layers", "model.ffn_hidden"]}[max(shares, key=shares.get)]


def _buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def training_estimate(recipe, vocab_size: int, compute_bytes: int = 4, shards: int = 1) -> Estimate:
    """Weights + gradients + AdamW moments (16 bytes per parameter, divided over `shards` under FSDP), the
    memory state of a batch, and the activations kept for the backward pass of one micro-batch."""
    model = meta_model(recipe, vocab_size)
    a, t = model.args, recipe.train
    n_params = sum(p.numel() for p in model.parameters())
    est = Estimate()
    est.add("weights, gradients and AdamW moments", 16 * n_params / shards, _weight_keys(model))
    b, seq = t.batch_size, t.seq_len
    n_mem = len(a.memory_layers) if a.arch == "lm2" else 0
    writes = 1 + seq // a.segment_len  # each segment's bank is kept for backpropagation through time
    est.add("memory state", _buffer_bytes(model) + 4 * b * n_mem * a.slots * a.slot_dim * writes,
            ["memory.slots", "train.batch_size"])
    tokens = b * seq * (1 + 2 * a.slots / a.segment_len if a.arch == "rmt" else 1)
    per_layer = 8 * a.d_model + 3 * a.ffn_hidden  # inputs of the norms, projections and SwiGLU kept for backward
    layers = (a.n_layers * a.d_model + per_layer) if t.activation_checkpointing else a.n_layers * per_layer
    keys = ["train.batch_size", "train.seq_len"]
    est.add("activations", tokens * compute_bytes * (layers + 3 * n_mem * a.d_model),
            keys + ([] if t.activation_checkpointing else ["or set train.activation_checkpointing = true"]))
    est.add("logits", tokens * 4 * 2 * a.vocab_size, keys + ["model.vocab_size (the tokenizer's vocabulary)"])
    return est


def inference_estimate(recipe, vocab_size: int, context: int | None = None) -> Estimate:
    """Weights, buffers (the initial memory bank) and the KV cache of one sequence of `context` tokens (by
    default the longest the model accepts, or its attention window)."""
    model = meta_model(recipe, vocab_size)
    a = model.args
    n_params = sum(p.numel() for p in model.parameters())
    est = Estimate()
    est.add("weights", 4 * n_params, _weight_keys(model))
    est.add("memory state", 2 * _buffer_bytes(model), ["memory.slots", "memory.slot_dim"])
    context = context or (a.window or a.max_seq_len)
    kv = 2 * a.n_layers * a.n_kv_heads * (a.d_model // a.n_heads) * 4 * context
    est.add("KV cache", kv, ["model.max_seq_len", "attention.window"])
    return est


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def available_bytes(device=None) -> tuple[int, str] | None:
    """(bytes this process may still allocate, where that number comes from), or None if unknown.

    LM2_MEMORY_LIMIT (bytes, e.g. for a cgroup limit /proc/meminfo does not show) replaces the machine's
    figure on CPU."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    limit = os.environ.get("LM2_MEMORY_LIMIT", "")
    if limit.isdigit():
        return int(limit), "LM2_MEMORY_LIMIT"
    info = _meminfo()
    if "MemAvailable" not in info:
        return None
    return info["MemAvailable"] + info.get("SwapFree", 0), "available RAM + free swap"


def check_fits(est: Estimate, device, what: str, processes: int = 1) -> None:
    """Refuse with one line if `est` (per process; `processes` of them share this machine's RAM) cannot fit."""
    import torch

    have = available_bytes(device)
    if have is None:
        return
    limit, source = have
    on_cpu = device is None or torch.device(device).type == "cpu"
    need = est.total * (processes if on_cpu else 1)
    if need <= limit:
        return
    per = f" x {processes} processes" if on_cpu and processes > 1 else ""
    keys = est.largest_keys()
    raise Lm2Error(f"{what} needs at least {fmt_bytes(need)} ({est.describe()}{per}) but this machine has "
                   f"{fmt_bytes(limit)} ({source}); lower {', '.join(keys)}")


def check_training_fits(recipe, vocab_size: int, rt) -> Estimate:
    """The training estimate for this runtime (device, dtype, FSDP sharding), refused if it cannot fit."""
    fsdp = rt.distributed and recipe.train.distributed == "fsdp"
    est = training_estimate(recipe, vocab_size, compute_bytes=2 if rt.dtype_name == "bf16" else 4,
                            shards=rt.world if fsdp else 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    check_fits(est, rt.device, "training", processes=local)
    return est


def check_inference_fits(recipe, vocab_size: int, device=None, where: str = "the recipe",
                         weights: Path | None = None) -> None:
    """Refuse a checkpoint recipe whose model cannot fit (in RAM, where it is built, and on `device`), and one
    whose weights file does not hold the tensors that recipe describes, before anything is allocated."""
    import torch

    if weights is not None:
        from lm2cli.checkpoint import check_weight_shapes

        check_weight_shapes(meta_model(recipe, vocab_size), weights)
    est = inference_estimate(recipe, vocab_size)
    check_fits(est, None, f"the model of {where}")
    if device is not None and torch.device(device).type == "cuda":
        check_fits(est, device, f"the model of {where}")
