"""One recorded pass over a text (and, with --generate, K greedy tokens with the live memory).

The text is fed through the model state in chunks of whole segments, as `lm2 generate` prefills, so a long
text costs bounded activations and every memory write happens where a full forward would do it; recording
leaves the logits bit-identical (tested). The result, `Inspection`, holds only tensors and token facts: the
analysis, the figures and the files need no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lm2cli.inspection.recording import TraceRecorder, reduce_heads


@dataclass
class Inspection:
    arch: str  # "lm2" or "rmt"
    checkpoint: str
    heads: str | int
    slots: int  # N bank slots (lm2) or m memory tokens (rmt)
    segment_len: int
    slot_window: tuple[int, int]  # [a, b) slots shown in the figures
    tokens: list[int]  # the text's ids (BOS first), then the generated ones
    pieces: list[str]  # a short display string per token
    n_prompt: int
    layers: dict[int, dict[str, Tensor]]  # block -> reduced tensors (see recording.py)
    memory: dict[str, Tensor] = field(default_factory=dict)  # rmt: memory tokens' norm and change per write
    fact_mask: list[bool] | None = None
    fact_index: list[int] | None = None  # per text token: which fact (story order), -1 for none
    support_mask: list[bool] | None = None
    answer_pos: int | None = None
    target: str | None = None
    facts_note: str = ""
    generated_text: str = ""
    heatmap_rows: dict[int, list[int]] = field(default_factory=dict)  # token positions, per block
    reread: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # block -> before/after (rows, N)
    read_at: int | None = None  # --read-at: the position taken apart (associative) and always in the heatmap


def piece_text(tokenizer, token_id: int) -> str:
    """Display form of one token: SentencePiece's word-boundary mark as a space, newlines visible."""
    return tokenizer.id_to_piece(token_id).replace("\u2581", " ").replace("\n", "\\n")


def most_attended(read: Tensor, window: tuple[int, int], k: int, always: list[int] = ()) -> list[int]:
    """Positions of the k tokens whose read is most concentrated on the slot window (their largest weight on
    one slot of it), plus `always`, in text order."""
    strength = read[:, window[0]:window[1]].amax(dim=-1)
    chosen = set(strength.topk(min(k, len(strength))).indices.tolist()) | {p for p in always if p < len(strength)}
    return sorted(chosen)


def read_against(memory, inputs: Tensor, bank: Tensor, heads: str | int) -> Tensor:
    """The read attention (rows, N) of memory inputs `inputs` (rows, d) against `bank` (N, d_m): the LM2 read
    spelled out (queries W_Q x, keys W_K M (+ slot keys) scaled by 1/√dh, softmax over slots), heads reduced."""
    device = memory.qu_proj.weight.device
    x, bank = inputs.to(device), bank.to(device)
    h, d = memory.heads, memory.d_model
    q = memory.qu_proj(x)[:, :d].view(len(x), h, d // h).transpose(0, 1)  # (h, rows, dh)
    keys = memory.bank_keys_values(bank.unsqueeze(0))[0][0]  # (h, N, dh), scaled, slot keys included
    return reduce_heads(torch.matmul(q, keys.transpose(-1, -2)).softmax(dim=-1), heads).cpu()


@torch.no_grad()
def capture(model, tokenizer, text, *, checkpoint: str, layers: list[int], heads: str | int,
            slot_window: tuple[int, int], top_tokens: int, generate: int = 0, chunk_len: int = 256,
            device=None, read_at: int | None = None) -> Inspection:
    """Record `text` (an inputs.TextInput) through `model` and return what inspection keeps."""
    args = model.args
    device = device or next(model.parameters()).device
    recorder = TraceRecorder(layers, heads, keep_inputs=generate > 0 and args.arch == "lm2")
    ids = torch.tensor([text.ids], dtype=torch.long, device=device)
    state = model.init_state(1, device)
    generated: list[int] = []
    with recorder.recording(model, state):
        for start in range(0, ids.shape[1], chunk_len):
            logits, state = model(ids[:, start:start + chunk_len], state, recorder=recorder)
        after_prompt = state
        for _ in range(generate):
            token = int(logits[0, -1].argmax())
            generated.append(token)
            if token == tokenizer.eos_id:
                break
            logits, state = model(torch.tensor([[token]], device=device), state, recorder=recorder)
    tokens = list(text.ids) + generated
    result = Inspection(
        arch=args.arch, checkpoint=checkpoint, heads=heads, slots=args.slots, segment_len=args.segment_len,
        slot_window=slot_window, tokens=tokens, pieces=[piece_text(tokenizer, t) for t in tokens],
        n_prompt=len(text.ids), layers={layer: recorder.traces[layer].tensors() for layer in layers},
        memory=recorder.memory.tensors(), fact_mask=text.fact_mask, fact_index=text.fact_index,
        support_mask=text.support_mask,
        answer_pos=text.answer_pos, target=text.target, facts_note=text.facts_note,
        generated_text=tokenizer.decode(generated), read_at=read_at)
    always = [p for p in (text.answer_pos, read_at) if p is not None]
    for layer, tensors in result.layers.items():
        if "read" not in tensors:  # the associative bank: no read weights over slots, no heatmap
            continue
        rows = most_attended(tensors["read"][:result.n_prompt], slot_window, top_tokens, always)
        result.heatmap_rows[layer] = rows
        inputs = tensors.pop("inputs", None)
        if inputs is not None:  # lm2 with --generate: the same tokens read the memory before and after
            memory = model.blocks[layer].memory
            result.reread[layer] = {
                "before": read_against(memory, inputs[rows], _bank(after_prompt, layer), heads),
                "after": read_against(memory, inputs[rows], _bank(state, layer), heads),
            }
    return result


def _bank(state, layer: int) -> Tensor:
    return state.layers[layer].memory.bank[0]
