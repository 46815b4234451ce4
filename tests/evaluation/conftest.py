"""Fixtures for the evaluation tests: a small tokenizer, tiny real models (LM2, RMT, vanilla), checkpoints written
without training, hand-made BABILong directories, and test-only models with known answers (an oracle, a
constant answer, a uniform distribution)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

PEOPLE = ["Mary", "John", "Sandra", "Daniel"]
ROOMS = ["kitchen", "garden", "office", "hallway", "bedroom", "bathroom"]
FILLER = ["The rain kept falling on the old town.", "A dog barked somewhere far away.",
          "Nobody remembered the name of the ship.", "The bread in the window smelled of butter."]


def babi_row(rng: random.Random, filler_sentences: int = 0) -> dict:
    where: dict[str, str] = {}
    facts = []
    for _ in range(rng.randint(2, 6)):
        p, r = rng.choice(PEOPLE), rng.choice(ROOMS)
        where[p] = r
        facts.append(f"{p} went to the {r}.")
    haystack = [rng.choice(FILLER) for _ in range(filler_sentences)]
    text = []
    slots = sorted(rng.randint(0, len(haystack)) for _ in facts)  # facts keep their order among the filler
    k = 0
    for i in range(len(haystack) + 1):
        while k < len(facts) and slots[k] == i:
            text.append(facts[k])
            k += 1
        if i < len(haystack):
            text.append(haystack[i])
    person = rng.choice(sorted(where))
    return {"input": " ".join(text), "question": f"Where is {person}?", "target": where[person]}


def write_babilong(root: Path, tasks=("qa1", "qa2"), lengths=("0k", "1k"), samples: int = 12, seed: int = 0) -> Path:
    """A hand-made directory in the hub layout: qaN/<length>.json, rows {input, question, target}."""
    rng = random.Random(seed)
    for task in tasks:
        for length in lengths:
            filler = 0 if length == "0k" else 20
            rows = [babi_row(rng, filler) for _ in range(samples)]
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{length}.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="session")
def tokenizer():
    from lm2cli.data.tokenizer import train_tokenizer

    rng = random.Random(1)
    lines = [babi_row(rng, 3)["input"] for _ in range(400)] + [f"Where is {p}? {r}" for p in PEOPLE for r in ROOMS]
    return train_tokenizer(lines, model_type="bpe", vocab_size=300, byte_fallback=True, character_coverage=1.0,
                           sample_sentences=100_000, answer_token="<ans>", extra_symbols=[], seed=1)


TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "memory.slots=4",
        "memory.heads=2", "memory.segment_len=16"]


def tiny_recipe(*sets: str):
    from lm2cli.recipe import load_recipe

    return load_recipe(None, [*TINY, *sets])


def tiny_model(tokenizer, *sets: str, seed: int = 0):
    from lm2cli.model import build_model

    torch.manual_seed(seed)
    recipe = tiny_recipe(*sets)
    return build_model(recipe, tokenizer.vocab_size).eval(), recipe


def write_checkpoint(run_dir: Path, tokenizer, *sets: str, seed: int = 0, step: int = 1) -> Path:
    """A run directory with one checkpoint of a randomly initialised tiny model (no training needed)."""
    from lm2cli.checkpoint import save_model_files, write_state_file

    model, recipe = tiny_model(tokenizer, *sets, seed=seed)
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    save_model_files(ckpt, model, recipe, tokenizer)
    write_state_file(ckpt, {"step": step})  # the manifest (sizes, sha256) every reader verifies
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
    return run_dir


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: more threads than free cores makes every op wait (see tests/training/conftest.py)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- test-only models


class TableModel(torch.nn.Module):
    """Follows the lm2 model contract (init_state, forward(ids, state) -> (logits, state), batch first in every
    state tensor) and answers from a table: after a prompt it knows, it emits that prompt's answer tokens, then
    EOS. Its state is simply every token seen so far. Only the last position of each call gets logits, which
    is all greedy decoding reads."""

    def __init__(self, vocab_size: int, eos_id: int, table: dict[tuple[int, ...], list[int]]):
        super().__init__()
        self.vocab_size, self.eos_id, self.table = vocab_size, eos_id, table
        self.prompt_lengths = sorted({len(k) for k in table})

    def init_state(self, batch_size: int, device=None):
        return torch.zeros(batch_size, 0, dtype=torch.long, device=device)

    def next_token(self, seen: list[int]) -> int:
        for n in self.prompt_lengths:
            answer = self.table.get(tuple(seen[:n]))
            if answer is not None and len(seen) >= n:
                k = len(seen) - n
                return answer[k] if k < len(answer) else self.eos_id
        return self.eos_id

    def forward(self, ids: torch.Tensor, state=None, logits_at=None):
        seen = torch.cat([self.init_state(ids.shape[0]) if state is None else state, ids], dim=1)
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size)
        for b in range(ids.shape[0]):
            logits[b, -1, self.next_token(seen[b].tolist())] = 10.0
        return (logits if logits_at is None else logits[logits_at]), seen


class UniformModel(torch.nn.Module):
    """Every token equally likely: perplexity = vocabulary size, loss = ln V at every position."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def init_state(self, batch_size: int, device=None):
        return torch.zeros(batch_size, 1)

    def forward(self, ids: torch.Tensor, state=None, logits_at=None):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size)
        return (logits if logits_at is None else logits[logits_at]), state
