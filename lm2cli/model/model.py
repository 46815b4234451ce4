"""The one model core: a Llama-style decoder with optional LM2 memory per block, and the RMT baseline.

    arch = "vanilla"  plain Llama: RMSNorm pre-norm, RoPE, grouped-query attention, SwiGLU
    arch = "lm2"      the same blocks, plus an LM2 memory module (memory.py) in all / the first K / listed blocks
    arch = "rmt"      the same blocks without memory, run segment by segment on [M ; tokens ; M] (memory tokens)

`model(input_ids, state)` returns `(logits, state)`; passing the state back continues the sequence, so feeding a
sequence in chunks equals one full forward. The state holds the KV cache (the last W-1 keys with a window W, all
of them with W = 0), each memory block's bank and the open segment's read queries and write contents, and the
token position.

Inside a block, sub-layers are called through `.forward(...)` rather than `module(...)`: at batch-1 decoding of a
small model, `nn.Module.__call__` costs about 2 µs per call, ~10% of a step. Forward hooks therefore fire on
blocks, memory modules and the model, not on the linear and norm layers inside a block (use
`lm2cli.model.MemoryRecorder` to look at the memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lm2cli.model.memory import AssociativeMemory, LM2Memory, MemoryState, read_writes


@dataclass
class ModelArgs:
    """Flat model hyper-parameters, built from a recipe by `ModelArgs.from_recipe` (the recipe schema is the one
    source of defaults, so none are repeated here)."""

    vocab_size: int
    arch: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    init_std: float  # 0 = 1/sqrt(d_model), see __post_init__
    max_seq_len: int
    window: int
    memory_layers: list[int]
    slots: int
    slot_dim: int
    memory_heads: int
    segment_len: int
    bptt: int
    memory_init: str
    out_gate_bias: float
    forget_gate_bias: float
    memory_update: str
    slot_keys: bool = False
    memory_write: str = "attend"
    write_strength_bias: float = 0.0
    key_window: int = 1
    value_window: int = 1

    def __post_init__(self):
        # Width-aware default. A fixed 0.02 (GPT-2's value for d 768) starves attention in narrow models: at d 128
        # the initial attention logits are ~0.05, softmax is uniform, and since dL/dW_q grows with W_k (and vice
        # versa) the query/key weights stay near zero: a 2-layer model then never learns even 2-fact associative
        # recall (docs/results.md). 1/sqrt(d) gives logits of order 1 at every width (0.088 at d 128, 0.022 at 2048).
        if self.init_std == 0:
            self.init_std = self.d_model ** -0.5

    @staticmethod
    def from_recipe(recipe, vocab_size: int | None = None) -> ModelArgs:
        m, mem = recipe.model, recipe.memory
        vocab = m.vocab_size or vocab_size
        if not vocab:
            raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary size was given")
        hidden = m.ffn_hidden or llama_ffn_hidden(m.d_model, m.ffn_multiple_of)
        return ModelArgs(
            vocab_size=vocab, arch=m.arch, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads or m.n_heads, ffn_hidden=hidden, rope_theta=m.rope_theta, norm_eps=m.norm_eps,
            tie_embeddings=m.tie_embeddings, init_std=m.init_std, max_seq_len=m.max_seq_len,
            window=recipe.attention.window, memory_layers=recipe.memory_layer_indices(), slots=mem.slots,
            slot_dim=mem.slot_dim or m.d_model, memory_heads=mem.heads, segment_len=mem.segment_len,
            bptt=mem.bptt, memory_init=mem.init, out_gate_bias=mem.out_gate_bias,
            forget_gate_bias=mem.forget_gate_bias, memory_update=mem.update,
            slot_keys=mem.slot_keys, memory_write=mem.write, write_strength_bias=mem.write_strength_bias,
            key_window=mem.key_window, value_window=mem.value_window,
        )


def llama_ffn_hidden(d_model: int, multiple_of: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4d, rounded up to a multiple (keeps FLOPs equal to a 4d GELU MLP)."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ------------------------------------------------------------------------------------------------ state


@dataclass
class LayerState:
    k: Tensor | None = None  # (B, n_kv, L, dh) cached keys (already rotated)
    v: Tensor | None = None
    memory: MemoryState | None = None


@dataclass
class ModelState:
    """Everything needed to continue a batch of sequences: position, per-block caches, memory."""

    pos: int
    layers: list[LayerState]
    rmt_memory: Tensor | None = None  # (B, m, d) RMT memory tokens for the current segment
    rmt_seg_len: int = 0  # RMT: tokens of the open segment already in the cache


# ---------------------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sign-folded sin tables (T, head_dim) for absolute positions, in float32 (Llama/HF convention).

    Llama rotates x as x·cos + rotate_half(x)·sin with rotate_half(x) = [-x₂, x₁]. Since [x₂, x₁] is a roll
    of x by half its width, folding the minus sign into the first half of sin turns it into one roll and one
    fused multiply-add (fewer kernels per decode step).
    """
    freqs = torch.outer(positions.float(), inv_freq.float())
    cos = torch.cat([freqs, freqs], dim=-1).cos()
    sin = freqs.sin()
    return cos, torch.cat([-sin, sin], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate (..., T, heads, dh) by position with tables of shape (T, 1, dh)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = a.n_heads, a.n_kv_heads
        self.head_dim = a.d_model // a.n_heads
        self.window = a.window
        # One fused projection for q, k, v: a single matmul instead of three.
        self.wqkv = nn.Linear(a.d_model, (a.n_heads + 2 * a.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.d_model, bias=False)

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, h, t, dh) and k, v (B, h_kv, t, dh) of x (B, t, d); q and k rotated to their positions."""
        b, t, _ = x.shape
        heads, kv_heads = self.n_heads, self.n_kv_heads
        qkv = self.wqkv.forward(x).view(b, t, heads + 2 * kv_heads, self.head_dim)
        # split (not slicing: its backward is one concatenation instead of zero-filled buffers per slice)
        qk, v = qkv.split([heads + kv_heads, kv_heads], dim=2)
        q, k = apply_rope(qk, cos, sin).transpose(1, 2).split([heads, kv_heads], dim=1)  # rotated together
        return q, k, v.transpose(1, 2)

    def merge(self, out: Tensor) -> Tensor:
        """The output projection of attention results (B, h, t, dh) -> (B, t, d)."""
        b, heads, t, dh = out.shape
        return self.wo.forward(out.transpose(1, 2).reshape(b, t, heads * dh))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, causal: bool,
                cache_k: Tensor | None, cache_v: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(x, cos, sin)
        if cache_k is not None:
            k, v = torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)
        if isinstance(mask, LocalBlocks):
            out = mask.attend(q, k, v, self.gqa)
        else:
            out = sdpa(q, k, v, mask, causal, self.gqa)
        out = self.merge(out)
        if self.window > 0:  # the next token needs only the W-1 most recent keys
            drop = max(0, k.shape[2] - (self.window - 1))
            k, v = k[:, :, drop:], v[:, :, drop:]
        return out, k, v


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, gqa: bool) -> Tensor:
    """Scaled dot-product attention of q (B, h, t, dh) over k, v (B, h_kv, s, dh), grouped when h_kv < h.

    With a mask, PyTorch's fused CUDA kernels need as many key/value heads as query heads (flash takes no mask,
    the memory-efficient kernel no grouped heads), so SDPA would fall back to the math kernel, which builds every
    score (seen on an H200, torch 2.11: with only the fused kernels allowed it finds none). There the keys and
    values are repeated per group first, as `enable_gqa` does inside the math kernel. The CPU kernels take grouped
    heads with a mask, so nothing is copied there.
    """
    if gqa and mask is not None and fused_kernels_need_equal_heads(q):
        groups = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def fused_kernels_need_equal_heads(q: Tensor) -> bool:
    return q.is_cuda


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)  # fused gate and up projections
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up.forward(x).chunk(2, dim=-1)
        return self.w_down.forward(F.silu(gate) * up)


def memory_module(a: ModelArgs) -> nn.Module:
    """The memory of an lm2 block: the slot bank (memory.write attend / compete) or the associative matrix."""
    if a.memory_write == "delta":
        return AssociativeMemory(a.d_model, a.memory_heads, a.segment_len, a.out_gate_bias, a.write_strength_bias,
                                 a.key_window, a.value_window)
    return LM2Memory(a.d_model, a.slots, a.slot_dim, a.memory_heads, a.segment_len, a.memory_init, a.out_gate_bias,
                     a.forget_gate_bias, a.memory_update, a.slot_keys, a.memory_write)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.norm1 = RMSNorm(a.d_model, a.norm_eps)
        self.attn = Attention(a)
        self.norm2 = RMSNorm(a.d_model, a.norm_eps)
        self.ffn = SwiGLU(a.d_model, a.ffn_hidden)
        self.memory = None
        if a.arch == "lm2" and layer in a.memory_layers:
            # Built without touching the global RNG (its weights are drawn in reset_parameters, after the
            # backbone's), so the same seed gives LM2 and vanilla the same backbone: see reset_parameters.
            with torch.random.fork_rng(devices=[]):
                self.memory = memory_module(a)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, causal: bool, st: LayerState,
                writes_kept: int | None, recorder, start_pos: int,
                keep_state: bool = True) -> tuple[Tensor, LayerState]:
        x = self.norm1.forward(h)
        a, k, v = self.attn.forward(x, cos, sin, mask, causal, st.k, st.v)
        mem_state = st.memory
        if self.memory is not None:
            m, mem_state = self.memory(x, st.memory, writes_kept, recorder, self.layer, start_pos, keep_state)
            h = h + a + m  # hybrid pathway: the original flow plus the gated memory read
        else:
            h = h + a
        h = h + self.ffn.forward(self.norm2.forward(h))
        return h, LayerState(k, v, mem_state)


@dataclass
class LocalBlocks:
    """Block-local sliding-window attention: how a long input attends with a finite window W in linear time.

    The t queries are cut into blocks of `block` consecutive queries; a block attends only to the keys it can
    see, its own and the W - 1 before its first query: `block + W - 1` keys. So the scores are t x (block + W - 1)
    instead of t x t, and no (t, t) mask exists; every key a query may see is in its block's span, so the result
    is the dense windowed attention's, gradients included. The keys are the cached ones (at most W - 1, the
    state's) followed by the new ones, left-padded to exactly W - 1 before the first query (the padding is
    masked out).

    `mask` (B * n_blocks, 1, block, block + W - 1) is built once per forward and shared by every block of the
    model: the same band (query r sees span keys r .. r + W - 1) everywhere, minus the padding.
    """

    block: int
    window: int
    mask: Tensor

    @staticmethod
    def build(batch: int, t: int, n_cached: int, window: int, block: int, device) -> LocalBlocks:
        n_blocks = -(-t // block)
        span = block + window - 1
        r = torch.arange(block, device=device).unsqueeze(1)
        c = torch.arange(span, device=device).unsqueeze(0)
        band = (c >= r) & (c <= r + window - 1)  # (block, span)
        first_real = window - 1 - min(n_cached, window - 1)  # padded keys sit before this index of the span
        starts = torch.arange(n_blocks, device=device).unsqueeze(1) * block
        real = (starts + c) >= first_real  # (n_blocks, span)
        mask = (band.unsqueeze(0) & real.unsqueeze(1)).unsqueeze(1)  # (n_blocks, 1, block, span)
        mask = mask.unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(batch * n_blocks, 1, block, span)
        return LocalBlocks(block, window, mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, gqa: bool) -> Tensor:
        """q (B, h, t, dh) over k, v (B, h_kv, n_cached + t, dh) -> (B, h, t, dh)."""
        b, heads, t, dh = q.shape
        kv_heads, w, block = k.shape[1], self.window, self.block
        n_blocks = self.mask.shape[0] // b
        pad_end = n_blocks * block - t
        keep = min(k.shape[2] - t, w - 1)  # cached keys still inside the window of the first query
        pad = (0, 0, w - 1 - keep, pad_end)
        k, v = k[:, :, k.shape[2] - t - keep:], v[:, :, v.shape[2] - t - keep:]
        span = block + w - 1
        # (B, h_kv, n_blocks, dh, span) views of overlapping spans -> (B * n_blocks, h_kv, span, dh)
        k_blocks = F.pad(k, pad).unfold(2, span, block).permute(0, 2, 1, 4, 3).reshape(-1, kv_heads, span, dh)
        v_blocks = F.pad(v, pad).unfold(2, span, block).permute(0, 2, 1, 4, 3).reshape(-1, kv_heads, span, dh)
        q_blocks = F.pad(q, (0, 0, 0, pad_end)).view(b, heads, n_blocks, block, dh).transpose(1, 2)
        out = sdpa(q_blocks.reshape(-1, heads, block, dh), k_blocks, v_blocks, self.mask, False, gqa)
        out = out.view(b, n_blocks, heads, block, dh).transpose(1, 2).reshape(b, heads, n_blocks * block, dh)
        return out if pad_end == 0 else out[:, :, :t]


AttentionMask = Tensor | LocalBlocks | None

# Queries per block of the block-local path: W, but not fewer than this (tiny windows would otherwise give many
# tiny blocks, each a separate attention problem; measured on the small recipe, 32-128 cost about the same).
# The path is taken from three blocks on: up to two, the dense (t, n_cached + t) mask is still small and was
# 5-10% faster (small recipe, W = 128: equal at 384 tokens, block-local 1.4x faster at 1,024).
MIN_LOCAL_BLOCK = 64


def attention_mask(q_start: int, t: int, n_cached: int, window: int, device,
                   batch: int = 1) -> tuple[AttentionMask, bool]:
    """How t queries at q_start.. attend over n_cached cached keys plus their own: (mask, causal flag).

    (None, True): plain causal SDPA is exact. (None, False): every key is visible. A boolean (t, n_cached + t)
    mask when the window cuts into a short input. `LocalBlocks` when the input is longer than two blocks of the
    block-local path: then the cost is linear in t and nothing of size t x t is built.
    """
    if n_cached == 0 and (window == 0 or window >= t):
        return None, t > 1
    if t == 1 and (window == 0 or n_cached < window):
        return None, False
    block = max(window, MIN_LOCAL_BLOCK)
    if window > 0 and t > 2 * block:
        return LocalBlocks.build(batch, t, n_cached, window, block, device), False
    q_pos = torch.arange(q_start, q_start + t, device=device).unsqueeze(1)
    k_pos = torch.arange(q_start - n_cached, q_start + t, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window > 0:
        allowed &= q_pos - k_pos < window
    return allowed, False


# ------------------------------------------------------------------------------------------------- model


class LanguageModel(nn.Module):
    """Decoder-only LM; `forward(input_ids, state=None) -> (logits, state)` for every arch."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.tok_emb = nn.Embedding(a.vocab_size, a.d_model)
        self.blocks = nn.ModuleList(Block(a, i) for i in range(a.n_layers))
        self.norm = RMSNorm(a.d_model, a.norm_eps)
        self.lm_head = nn.Linear(a.d_model, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if a.arch == "rmt":
            # Memory tokens M0: normal at the token embeddings' std (as upstream RMT), drawn in reset_parameters.
            self.rmt_memory = nn.Parameter(torch.empty(a.slots, a.d_model))
        head_dim = a.d_model // a.n_heads
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_cache: tuple[int, Tensor, Tensor] | None = None
        self.activation_checkpointing = False
        self._compiled_blocks: list | None = None  # see compile_blocks
        self.reset_parameters()

    # ---------------------------------------------------------------------------------- init / report

    def reset_parameters(self) -> None:
        """N(0, init_std) for every matrix: the backbone's first, in module order, then the memory path's.

        Drawing the backbone first makes its weights a function of the seed alone, not of the arch: LM2, RMT and
        vanilla built from the same seed start from the same backbone, so a comparison measures the memory and
        not the luck of the draw (measured on qa1: a vanilla started from LM2's old interleaved draw learned as
        slowly as LM2, docs/results.md).
        """
        std = self.args.init_std
        named = [(n, p) for n, p in self.named_parameters()
                 if p.dim() >= 2 and not n.endswith(("bank0", "slot_keys", "query_mix", "key_mix", "value_mix"))]
        backbone = [(n, p) for n, p in named if not self.is_memory_param(n)]
        memory = [(n, p) for n, p in named if self.is_memory_param(n)]
        for name, p in backbone + memory:
            # Residual projections scaled down with depth (GPT-2), so the stream does not grow with layers.
            scale = 1 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else 1
            nn.init.normal_(p, mean=0.0, std=std * scale)
        for block in self.blocks:
            if block.memory is not None:
                block.memory.reset_slot_keys()
                block.memory.reset_gate_biases()
                if isinstance(block.memory, AssociativeMemory):
                    block.memory.reset_window_mix()

    memory_carry = True  # see set_memory_carry

    def set_memory_carry(self, on: bool) -> None:
        """Carry the memory from segment to segment (the model as trained), or not: with False every segment
        reads the initial memory (LM2's bank0, RMT's M0), so what the model still answers it answers from
        attention within reach. A control for `lm2 eval` (eval.no_carry); training never turns it off."""
        self.memory_carry = on
        for block in self.blocks:
            if block.memory is not None:
                block.memory.carry = on

    @property
    def has_write_only_params(self) -> bool:
        """Whether a forward whose rows write nothing that is read leaves some parameter without a gradient."""
        return any(b.memory is not None and b.memory.write_only_params for b in self.blocks)

    @staticmethod
    def is_memory_param(name: str) -> bool:
        """Parameters of the memory path (LM2 memory modules, RMT memory tokens): own LR multiplier."""
        return ".memory." in f".{name}" or name == "rmt_memory"

    def param_report(self) -> dict[str, int]:
        seen, report = set(), {"backbone": 0, "memory": 0, "embedding": 0}
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            kind = "memory" if self.is_memory_param(name) else "backbone"
            report[kind] += p.numel()
            if name in ("tok_emb.weight", "lm_head.weight"):
                report["embedding"] += p.numel()
        report["total"] = report["backbone"] + report["memory"]
        return report

    def flops_per_token(self, context: int) -> float:
        """Forward + backward FLOPs per trained token (for MFU): 6 x matmul parameters + attention + memory.

        Counts every weight matrix once per token (x2 multiply-add, x3 forward+backward), the attention scores
        and weighted sum over `context` keys (min(context, W) with a window; half of them on average under the
        causal mask), and the memory: per token a read over N slots, per segment the K/V projection of the bank
        and the slot-side write (amortised over S tokens).
        """
        a = self.args
        report = self.param_report()
        dense = report["total"] - (0 if a.tie_embeddings else a.vocab_size * a.d_model)  # lookup is free
        if a.arch == "rmt":
            dense -= a.slots * a.d_model
        keys = min(context, a.window) if a.window else context / 2
        flops = 6 * dense + 6 * a.n_layers * 2 * keys * a.d_model
        n_mem = len(a.memory_layers) if a.arch == "lm2" else 0
        if n_mem:
            per_segment = 2 * a.slots * a.slot_dim * 2 * a.d_model  # K and V of the bank
            per_segment += 2 * a.slots * 2 * a.slot_dim * 2 * a.slot_dim  # gates
            per_segment -= 2 * a.slot_dim * 2 * a.d_model + 2 * 2 * a.slot_dim * 2 * a.slot_dim  # counted in 6N
            read_write = 2 * 2 * a.slots * a.d_model + 2 * a.slots * a.slot_dim  # scores, P.V, P_w.U
            flops += 3 * n_mem * (per_segment / a.segment_len + read_write)
        if a.arch == "rmt":  # 2m extra positions per segment of S tokens
            flops *= 1 + 2 * a.slots / a.segment_len
        return float(flops)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = enabled

    def compile_blocks(self, **options) -> None:
        """Run the decoder blocks through torch.compile in forwards with autograd (`train.compile`).

        Regional compilation: the blocks share their code and shapes, so one compilation serves all of them,
        where compiling the whole model would unroll every block and, for LM2, every memory segment of each
        (minutes at 12 blocks). The compiled wrappers are kept aside, not registered as submodules, so
        parameter names and checkpoints stay those of the plain model; forwards without autograd (validation,
        generation) stay eager and compile nothing. The embedding, final norm, output layer and RMT's segment
        loop stay eager too.
        """
        self._compiled_blocks = [torch.compile(block, **options) for block in self.blocks]

    # ---------------------------------------------------------------------------------------- state

    def init_state(self, batch_size: int, device=None) -> ModelState:
        device = device or self.tok_emb.weight.device
        layers = [LayerState(memory=None if b.memory is None else b.memory.init_state(batch_size, device))
                  for b in self.blocks]
        rmt = None
        if self.args.arch == "rmt":
            rmt = self.rmt_memory.unsqueeze(0).expand(batch_size, -1, -1)
        return ModelState(pos=0, layers=layers, rmt_memory=rmt)

    def carry_memory(self, state: ModelState) -> ModelState:
        """A fresh sequence that starts from `state`'s memory, detached (memory.carry = true)."""
        if self.args.arch == "rmt":
            return replace(self.init_state(state.rmt_memory.shape[0]), rmt_memory=state.rmt_memory.detach())
        banks = [ls.memory.bank for ls in state.layers if ls.memory is not None]
        if not banks:  # vanilla: no memory to carry, only a fresh sequence
            k = state.layers[0].k
            return self.init_state(1 if k is None else k.shape[0])
        fresh = self.init_state(banks[0].shape[0], banks[0].device)
        layers = [LayerState(memory=None if ls.memory is None else MemoryState(ls.memory.bank.detach()))
                  for ls in state.layers]
        return replace(fresh, layers=layers)

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, input_ids: Tensor, state: ModelState | None = None, recorder=None,
                bptt: int | None = None, keep_state: bool = True,
                logits_at: Tensor | None = None) -> tuple[Tensor, ModelState | None]:
        """Logits (B, T, V) for `input_ids` (B, T) continuing `state` (None = a new sequence).

        `recorder` (see lm2cli.model.recorder) collects memory reads, writes and gates; None costs nothing.
        `bptt` overrides memory.bptt for this call (0 = full backpropagation through time).
        `keep_state=False` returns no state and skips the memory write that would only serve a continuation
        (a training step that starts every row afresh).
        `logits_at` (B, T) bool: the logits of those positions only, packed (N, V) in row-major order. A
        fine-tuning row has a target at a few answer positions; the head and its softmax over the whole row cost
        a quarter of the step (d 128, vocabulary 2,048, 1k-token rows) and B x T x V floats of memory.
        """
        hidden, state = self.final_hidden(input_ids, state, recorder, bptt, keep_state)
        if logits_at is not None:
            hidden = hidden[logits_at]
        return self.lm_head(hidden).float(), state

    def final_hidden(self, input_ids: Tensor, state: ModelState | None = None, recorder=None,
                     bptt: int | None = None, keep_state: bool = True) -> tuple[Tensor, ModelState | None]:
        """The normalised last hidden states (B, T, d) that the LM head reads, and the new state (see forward)."""
        if state is None:
            state = self.init_state(input_ids.shape[0], input_ids.device)
        chunk = self._no_grad_chunk_len(input_ids.shape[0])
        if input_ids.shape[1] > chunk:
            return self._hidden_in_chunks(input_ids, state, chunk, recorder, keep_state)
        bptt = self.args.bptt if bptt is None else bptt
        writes_kept = bptt if bptt > 0 else None
        if self.args.arch == "rmt":
            hidden, state = self._forward_rmt(input_ids, state, writes_kept, recorder, keep_state)
            return hidden, state if keep_state else None
        h = self.tok_emb(input_ids)
        h, layers = self._run_blocks(h, state.pos, state.layers, writes_kept, recorder, keep_state)
        hidden = self.norm(h)
        if not keep_state:
            return hidden, None
        return hidden, replace(state, pos=state.pos + input_ids.shape[1], layers=layers)

    # A long forward without autograd (evaluation, scoring) runs through its own state in chunks of about this
    # many tokens (rows x length), so its activations stay cache-sized and its peak memory flat: one call over
    # 8K tokens cost 13% more CPU time per token than over 1K (small recipe, 1 thread), chunked the same.
    # With autograd the backward needs every activation anyway, and block-local attention keeps it linear.
    NO_GRAD_CHUNK_TOKENS = 2048

    def _no_grad_chunk_len(self, batch: int) -> int | float:
        if torch.is_grad_enabled() or self.args.arch == "rmt":  # RMT runs segment by segment already
            return math.inf
        seg = self.args.segment_len
        return max(seg, self.NO_GRAD_CHUNK_TOKENS // batch // seg * seg)  # whole segments

    def _hidden_in_chunks(self, input_ids: Tensor, state: ModelState, chunk: int, recorder,
                          keep_state: bool) -> tuple[Tensor, ModelState | None]:
        """The same hidden states as one call (chunked = full forward is the model contract), in bounded memory."""
        outs, total = [], input_ids.shape[1]
        for start in range(0, total, chunk):
            last = start + chunk >= total
            hidden, state = self.final_hidden(input_ids[:, start:start + chunk], state, recorder,
                                              keep_state=keep_state or not last)
            outs.append(hidden)
        return torch.cat(outs, dim=1), state

    ROPE_BLOCK = 256  # decoding reuses one table block for this many positions

    def _rope_tables(self, start: int, t: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin tables (T, 1, dh) for positions start..start+t-1, broadcast over heads.

        Without autograd (generation) a block of ROPE_BLOCK positions is built at once and sliced, so a decode
        step does not rebuild its one-row table; the block moves with the position, so memory stays bounded
        however long the sequence runs. With autograd the tables are built fresh (forward keeps no state).
        """
        if torch.is_grad_enabled() or t > self.ROPE_BLOCK:
            return self._build_rope(start, t, h)
        cache = self._rope_cache
        if (cache is None or not cache[0] <= start <= start + t <= cache[0] + self.ROPE_BLOCK
                or cache[1].dtype != h.dtype or cache[1].device != h.device):
            cache = self._rope_cache = (start, *self._build_rope(start, self.ROPE_BLOCK, h))
        offset = start - cache[0]
        return cache[1][offset:offset + t], cache[2][offset:offset + t]

    def _build_rope(self, start: int, n: int, h: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = rope_cos_sin(torch.arange(start, start + n, device=h.device), self.inv_freq)
        return cos.to(h.dtype).unsqueeze(1), sin.to(h.dtype).unsqueeze(1)

    def _run_blocks(self, h: Tensor, start: int, layer_states: list[LayerState], writes_kept,
                    recorder, keep_state: bool = True) -> tuple[Tensor, list[LayerState]]:
        """All blocks over h (B, T, d) whose first token sits at position `start` (RMT: within the segment)."""
        t = h.shape[1]
        n_cached = 0 if layer_states[0].k is None else layer_states[0].k.shape[2]
        cos, sin = self._rope_tables(start, t, h)
        mask, causal = attention_mask(start, t, n_cached, self.args.window, h.device, h.shape[0])
        new_states = []
        blocks = self._compiled_blocks if self._compiled_blocks and torch.is_grad_enabled() else self.blocks
        for block, st in zip(blocks, layer_states, strict=True):
            if self.activation_checkpointing and self.training and recorder is None:
                h, st = checkpoint(block, h, cos, sin, mask, causal, st, writes_kept, None, start, keep_state,
                                   use_reentrant=False)
            else:
                h, st = block(h, cos, sin, mask, causal, st, writes_kept, recorder, start, keep_state)
            new_states.append(st)
        return h, new_states

    # ------------------------------------------------------------------------------------------- RMT

    def _forward_rmt(self, input_ids: Tensor, state: ModelState, writes_kept, recorder, keep_state: bool = True):
        """RMT: each segment runs as [M ; tokens ; M] with positions restarting; the write suffix's final hidden
        states become the next memory. Attention stays inside the segment: memory tokens are the only carrier.

        The state keeps the open segment's KV cache (read prefix + tokens so far), so generation can continue a
        segment token by token; when it fills, the write suffix runs through that cache.
        """
        a = self.args
        seg, m = a.segment_len, a.slots
        total, pos, outs = input_ids.shape[1], 0, []
        n_read = read_writes(state.rmt_seg_len, total, seg)
        write_idx = 0
        layers, memory, seg_len = state.layers, state.rmt_memory, state.rmt_seg_len
        while pos < total:
            take = min(seg - seg_len, total - pos)
            h = self.tok_emb(input_ids[:, pos:pos + take])
            if seg_len == 0:  # a new segment starts with the read prefix at positions 0..m-1
                layers = [LayerState() for _ in self.blocks]
                h = torch.cat([memory.to(h.dtype), h], dim=1)
                start = 0
            else:
                start = m + seg_len
            h, layers = self._run_blocks(h, start, layers, writes_kept, recorder)
            tokens = h if h.shape[1] == take else h.split([h.shape[1] - take, take], dim=1)[1]  # drop the prefix
            outs.append(self.norm(tokens))
            seg_len += take
            if seg_len == seg and (keep_state or pos + take < total or recorder is not None):
                # the segment is full and its memory will be read: run the write suffix through its cache
                if self.memory_carry:
                    w, _ = self._run_blocks(memory.to(h.dtype), m + seg, layers, writes_kept, recorder)
                    memory = self.norm(w)
                else:  # the no-carry control: the next segment reads M0 again
                    memory = self.rmt_memory.unsqueeze(0).expand(memory.shape[0], -1, -1)
                if writes_kept is not None and write_idx < n_read - writes_kept:
                    memory = memory.detach()
                if recorder is not None:
                    recorder.on_rmt_write(state.pos + pos + take, memory)
                write_idx += 1
                layers, seg_len = [LayerState() for _ in self.blocks], 0
            pos += take
        hidden = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        new_state = ModelState(pos=state.pos + total, layers=layers, rmt_memory=memory, rmt_seg_len=seg_len)
        return hidden, new_state
