"""Perplexity, bits per byte and loss against context position.

Sequences of `eval.ppl_seq_len + 1` tokens come from the recipe's validation shards (data.dir/val.bin, in
order) or from text files (each file `BOS text EOS`, cut into sequences that never cross files), up to
`eval.ppl_tokens` scored tokens. Each sequence starts from a fresh model state and is fed segment-aligned
chunk by chunk through it, so any length fits in memory with an attention window or memory. The arithmetic
is the shared batch scorer's (lm2cli/scoring.py), the one training's validation uses, so both give the same
loss on the same rows.

Loss is also averaged in buckets of the position of the predicted token (0-128, 128-512, 512-2k, 2k-8k, ...,
each four times the one before): the curve that shows whether a model keeps using context beyond its
attention window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lm2cli.errors import Lm2Error
from lm2cli.scoring import Scores, score_logits, token_losses


def bucket_edges(seq_len: int) -> list[int]:
    """0, 128, 512, 2048, ... (x4), up to the first edge at or past seq_len."""
    edges = [0, 128]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * 4)
    return edges


def bucket_label(lo: int, hi: int) -> str:
    def short(n: int) -> str:
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{short(lo)}-{short(hi)}"


@dataclass
class PerplexityPlan:
    seq_len: int
    sequences: list[np.ndarray]  # token ids, each at most seq_len + 1 long (inputs + the last target)
    source: dict
    edges: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(s) - 1 for s in self.sequences)

    def describe(self) -> dict:
        return {**self.source, "seq_len": self.seq_len, "sequences": len(self.sequences), "tokens": self.tokens,
                "buckets": [bucket_label(lo, hi) for lo, hi in zip(self.edges, self.edges[1:], strict=False)]}


def windows(tokens: np.ndarray, seq_len: int, budget: int) -> list[np.ndarray]:
    """Consecutive sequences of seq_len + 1 tokens (each shares its first token with the previous one's last
    target), at most `budget` targets in all; the last one may be shorter."""
    out = []
    start = 0
    while start + 1 < len(tokens) and budget > 0:
        take = min(seq_len, budget, len(tokens) - 1 - start)
        out.append(np.asarray(tokens[start:start + take + 1], dtype=np.int64))
        budget -= take
        start += take
    return out


def plan_perplexity(cfg, data_dir: str, tokenizer) -> PerplexityPlan:
    seq_len, budget = cfg.ppl_seq_len, cfg.ppl_tokens
    if cfg.ppl_data:
        sequences, source = _text_sequences(cfg.ppl_data, tokenizer, seq_len, budget)
    else:
        sequences, source = _shard_sequences(data_dir, tokenizer, seq_len, budget)
    if not sequences:
        raise Lm2Error(f"perplexity: {source.get('path', 'the data')} has fewer than 2 tokens to score")
    return PerplexityPlan(seq_len, sequences, source, bucket_edges(max(len(s) - 1 for s in sequences)))


def _shard_sequences(data_dir: str, tokenizer, seq_len: int, budget: int):
    from lm2cli.data.shards import TokenShards

    try:
        shards = TokenShards(data_dir)
    except Lm2Error as e:
        raise Lm2Error(f"perplexity on the validation shards: {e} (or set eval.ppl_data to text files, or leave "
                       f"perplexity out of eval.run)") from None
    if shards.meta.get("tokenizer_sha256") != tokenizer.sha256:
        raise Lm2Error(f"perplexity: the shards in {data_dir} were tokenized with another tokenizer than the "
                       f"model's; point data.dir at the model's own data or set eval.ppl_data to text files")
    val = shards.split("val")
    return windows(val, seq_len, budget), {"kind": "validation shards", "path": str(Path(data_dir) / "val.bin"),
                                           "fingerprint": shards.meta.get("fingerprint")}


def _text_sequences(patterns: list[str], tokenizer, seq_len: int, budget: int):
    from lm2cli.data.files import resolve_files
    from lm2cli.fileio import sha256_file

    files = resolve_files(list(patterns), key="eval.ppl_data", suffixes=(".txt",))
    sequences = []
    for path in files:
        if budget <= 0:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise Lm2Error(f"eval.ppl_data: {path} is not UTF-8 text (byte offset {e.start})") from None
        ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int64)
        file_sequences = windows(ids, seq_len, budget)
        budget -= sum(len(s) - 1 for s in file_sequences)
        sequences += file_sequences
    return sequences, {"kind": "text files", "files": [str(f) for f in files],
                       "sha256": {str(f): sha256_file(f) for f in files}}


@dataclass
class PositionLoss:
    """Loss sums by position bucket."""

    edges: list[int]
    loss: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)

    def __post_init__(self):
        self.loss = np.zeros(len(self.edges) - 1)
        self.count = np.zeros(len(self.edges) - 1, dtype=np.int64)

    def add(self, losses: torch.Tensor, start: int) -> None:
        """`losses` (B, T) of positions start..start+T-1 (every entry a real target)."""
        per_position = losses.sum(dim=0, dtype=torch.float64).cpu().numpy()
        positions = np.arange(start, start + len(per_position))
        which = np.searchsorted(self.edges, positions, side="right") - 1
        np.add.at(self.loss, which, per_position)
        np.add.at(self.count, which, losses.shape[0])

    def rows(self) -> list[dict]:
        out = []
        for i, (lo, hi) in enumerate(zip(self.edges, self.edges[1:], strict=False)):
            if self.count[i]:
                mean = self.loss[i] / self.count[i]
                out.append({"bucket": bucket_label(lo, hi), "from": lo, "to": hi, "tokens": int(self.count[i]),
                            "loss": round(mean, 6), "ppl": round(math.exp(min(mean, 700.0)), 4)})
        return out


@torch.no_grad()
def evaluate_perplexity(runner, tokenizer, plan: PerplexityPlan, name: str, on_done=None) -> dict:
    """Score every sequence of the plan with the model behind `runner` (a StateRunner)."""
    byte_lengths = torch.from_numpy(tokenizer.token_byte_lengths())
    total, positions = Scores(), PositionLoss(plan.edges)
    by_length: dict[int, list[np.ndarray]] = {}
    for s in plan.sequences:
        by_length.setdefault(len(s), []).append(s)
    for group in by_length.values():  # equal lengths batch exactly: no padding anywhere
        for i in range(0, len(group), runner.batch_size):
            rows = torch.from_numpy(np.stack(group[i:i + runner.batch_size]))
            total += score_sequences(runner, rows, byte_lengths, positions)
            if on_done is not None:
                on_done(rows.shape[0])
    return {"model": name, "tokens": total.targets, "sequences": len(plan.sequences), "loss": round(total.loss, 6),
            "ppl": round(total.perplexity, 4),
            "bpb": None if total.bits_per_byte is None else round(total.bits_per_byte, 6),
            "buckets": positions.rows()}


def score_sequences(runner, rows: torch.Tensor, byte_lengths: torch.Tensor, positions: PositionLoss) -> Scores:
    """Scores of a batch of equal-length sequences (B, L + 1), fed chunk by chunk through one model state."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    state = runner.model.init_state(rows.shape[0], device=runner.device)
    total = Scores()
    chunk = runner.chunk_for(rows.shape[0])
    for start in range(0, inputs.shape[1], chunk):
        chunk_targets = targets[:, start:start + chunk]
        logits, state = runner.forward(inputs[:, start:start + chunk].to(runner.device), state)
        chunk_targets_dev = chunk_targets.to(logits.device)
        losses = token_losses(logits, chunk_targets_dev)
        total += score_logits(logits, chunk_targets_dev, float(byte_lengths[chunk_targets].sum()), losses=losses)
        positions.add(losses, start)
    return total
