"""What one optimizer step and one validation really do: exact match and loss on hand-made logits, gradient
clipping as the optimizer sees it, memory carried from one batch to the next and the bank that is saved."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lm2cli import checkpoint as layout
from lm2cli.checkpoint import load_for_inference
from lm2cli.scoring import IGNORE
from lm2cli.training import checkpoints as ck
from lm2cli.training.loop import evaluate
from lm2cli.training.runtime import Runtime
from lm2cli.training.types import Batch

# ------------------------------------------------------------------------------------ evaluate, by hand

X = IGNORE


class ScriptedModel(torch.nn.Module):
    """Returns the given logits for each call in turn, whatever the input (the lm2 model contract: `logits_at`
    packs the positions it names)."""

    def __init__(self, logits: list[torch.Tensor]):
        super().__init__()
        self.logits = list(logits)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inputs, state=None, keep_state=True, logits_at=None):
        return packed(self.logits.pop(0), logits_at), None


class KeyedModel(ScriptedModel):
    """Returns logits[n] for a batch whose inputs are all n, in whatever order the batches come."""

    def forward(self, inputs, state=None, keep_state=True, logits_at=None):
        return packed(self.logits[int(inputs[0, 0])], logits_at), None


def packed(logits: torch.Tensor, logits_at: torch.Tensor | None) -> torch.Tensor:
    return logits if logits_at is None else logits[logits_at]


class ScriptedData:
    def __init__(self, batches, groups=()):
        self.batches, self.val_groups = batches, groups

    def val_batches(self, rank, world):
        return iter(self.batches)


def one_hot_logits(argmax: list[list[int]], vocab: int = 3, scale: float = 2.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(argmax), vocab).float() * scale


def session_for(model) -> SimpleNamespace:
    rt = Runtime(torch.device("cpu"), "fp32", "test")
    return SimpleNamespace(model=model, rt=rt, fsdp=False, recipe=SimpleNamespace(memory=SimpleNamespace(carry=False)))


def test_evaluate_exact_match_loss_and_bits_per_byte_on_hand_made_logits():
    # Row 0: both answer positions right, its unscored first position wrong -> counts.
    # Row 1: one answer position wrong -> does not count. Row 2: no answer at all -> not a row of the metric.
    # Row 3 (second batch): right -> counts. Exact match 2/3.
    targets = [torch.tensor([[X, 1, 2], [X, 0, 1], [X, X, X]]), torch.tensor([[X, 2, 0]])]
    argmax = [[[2, 1, 2], [0, 0, 2], [1, 1, 1]], [[1, 2, 0]]]
    batches = [Batch(torch.zeros_like(t), t, n_tokens=t.numel(), n_bytes=b, answers=True)
               for t, b in zip(targets, (5.0, 3.0), strict=True)]
    model = ScriptedModel([one_hot_logits(a) for a in argmax])
    result = evaluate(session_for(model), ScriptedData(batches))

    hit, miss = -math.log(math.e ** 2 / (math.e ** 2 + 2)), -math.log(1 / (math.e ** 2 + 2))
    n_hits, n_misses = 5, 1  # scored positions: row 0 two hits, row 1 a hit and a miss, row 3 two hits
    total = n_hits * hit + n_misses * miss
    assert result["val_em"] == pytest.approx(2 / 3)
    assert result["val_loss"] == pytest.approx(total / 6)
    assert result["val_ppl"] == pytest.approx(math.exp(total / 6))
    assert result["val_bpb"] == pytest.approx(total / (math.log(2) * 8.0))
    assert model.training  # evaluation leaves the model in the mode it found


def test_evaluate_reports_each_validation_group_and_their_total():
    # Group "1k": one right row of two (one batch); group "0k": two batches, right, right and wrong rows.
    targets = {"0k": [torch.tensor([[X, 1]]), torch.tensor([[X, 2], [X, 0]])], "1k": [torch.tensor([[X, 1], [X, 2]])]}
    argmax = {"0k": [[[0, 1]], [[0, 2], [0, 1]]], "1k": [[[0, 1], [0, 0]]]}
    order = [(g, i) for g in ("1k", "0k") for i in range(len(targets[g]))]  # batches arrive in any order
    batches = [Batch(torch.full_like(targets[g][i], n), targets[g][i], n_tokens=2, answers=True, group=g)
               for n, (g, i) in enumerate(order)]
    logits = [one_hot_logits(argmax[g][i]) for g, i in order]
    result = evaluate(session_for(KeyedModel(logits)), ScriptedData(batches, groups=("0k", "1k")))

    hit, miss = -math.log(math.e ** 2 / (math.e ** 2 + 2)), -math.log(1 / (math.e ** 2 + 2))
    assert (result["val_em@0k"], result["val_rows@0k"]) == (pytest.approx(2 / 3), 3)
    assert (result["val_em@1k"], result["val_rows@1k"]) == (pytest.approx(1 / 2), 2)
    assert result["val_loss@0k"] == pytest.approx((2 * hit + miss) / 3)
    assert result["val_loss@1k"] == pytest.approx((hit + miss) / 2)
    assert result["val_em"] == pytest.approx(3 / 5) and result["val_loss"] == pytest.approx((3 * hit + 2 * miss) / 5)
    assert "val_ppl@0k" not in result  # perplexity is the total's only


def test_evaluate_reports_no_exact_match_for_plain_text_rows():
    t = torch.tensor([[1, 2, 0]])
    batch = Batch(torch.zeros_like(t), t, n_tokens=3, answers=False)
    result = evaluate(session_for(ScriptedModel([one_hot_logits([[1, 2, 0]])])), ScriptedData([batch]))
    assert "val_em" not in result and "val_bpb" not in result
    assert result["val_loss"] == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 2)))


# ------------------------------------------------------------------------------------ through the CLI


def rows(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_grad_clip_bounds_the_gradient_the_optimizer_applies(cli, tiny_args, tmp_path):
    applied = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        applied.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        res = cli("pretrain", *tiny_args("train.steps=3", "train.grad_clip=0.05", "train.eval_every=0",
                                         "train.eval_batches=1"))
    finally:
        handle.remove()
    assert res.code == 0, res.err
    logged = [r["grad_norm"] for r in rows(tmp_path / "run", "train")]
    assert len(logged) == 3 and min(logged) > 0.5  # the norm before clipping is logged; clipping had work to do
    assert applied == pytest.approx([0.05] * 3, rel=1e-4)


def carried_banks(ckpt) -> list[torch.Tensor]:
    """The banks of memory_state.safetensors, one per memory block (named tensors, docs/training.md)."""
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "memory_state.safetensors"))
    return [tensors[f"rank0.block{i}.bank"] for i in range(2)]


def test_carried_memory_feeds_the_next_step_and_is_the_bank_saved(cli, tiny_args, tmp_path, monkeypatch):
    from lm2cli.model.model import LanguageModel

    fed = []
    real_forward = LanguageModel.forward

    def forward(self, input_ids, state=None, *args, **kwargs):
        if torch.is_grad_enabled():  # training steps, not validation
            fed.append(None if state is None else [ls.memory.bank.clone() for ls in state.layers])
        return real_forward(self, input_ids, state, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "forward", forward)
    base = ("train.steps=3", "train.save_every=1", "train.eval_every=0", "train.eval_batches=1")
    assert cli("pretrain", *tiny_args(*base, "memory.carry=true", out=tmp_path / "carry")).code == 0
    monkeypatch.setattr(LanguageModel, "forward", real_forward)
    assert cli("pretrain", *tiny_args(*base, out=tmp_path / "fresh")).code == 0

    assert len(fed) == 3 and fed[0] is None  # the first batch starts fresh
    root = tmp_path / "carry/checkpoints"
    for step in (1, 2):  # what step k saved is what step k + 1 started from
        saved = carried_banks(root / layout.checkpoint_name(step))
        assert len(saved) == len(fed[step]) == 2
        assert all(torch.equal(a, b) for a, b in zip(saved, fed[step], strict=True))
    identity = torch.eye(4, 32).expand_as(fed[1][0])  # memory.slots = 4 one-hot slots of width d = 32
    assert all((bank - identity).abs().max() > 1e-3 for bank in fed[1])  # a written bank, not the initial one
    carry, fresh = rows(tmp_path / "carry", "train"), rows(tmp_path / "fresh", "train")
    assert carry[0]["loss"] == fresh[0]["loss"]  # same weights, same first batch, both from the initial bank
    assert carry[1]["loss"] != fresh[1]["loss"] and carry[2]["loss"] != fresh[2]["loss"]


def test_validation_out_of_memory_is_a_warning_and_training_goes_on(cli, tiny_args, tmp_path, monkeypatch):
    import lm2cli.training.loop as loop

    real = loop.evaluate

    def oom_at_step_2(s, data):
        if s.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(s, data)

    monkeypatch.setattr(loop, "evaluate", oom_at_step_2)
    res = cli("pretrain", *tiny_args("train.steps=4", "train.eval_every=2", "train.eval_batches=1"))
    assert res.code == 0, res.err
    assert "validation at step 2 ran out of memory and was skipped" in res.out
    assert [r["step"] for r in rows(tmp_path / "run", "val")] == [0, 4]
    assert [r["step"] for r in rows(tmp_path / "run", "train")] == [1, 2, 3, 4]
    state = ck.read_trainer_state(tmp_path / "run/checkpoints/step_00000002")
    assert state["eval_pending"] is False  # a resume does not redo it


def test_mfu_is_logged_against_the_device_peak(cli, tiny_args, tmp_path, monkeypatch):
    """CPUs report no MFU; with a known peak (here a pretend 1 TFLOP/s device) it is flops/token x tok/s / peak."""
    monkeypatch.setattr(Runtime, "peak_flops", lambda self: 1e12)
    res = cli("pretrain", *tiny_args("train.steps=2", "train.eval_every=0", "train.eval_batches=1"))
    assert res.code == 0, res.err
    ckpt = tmp_path / "run/checkpoints/step_00000002"
    assert "flops_per_token" not in ck.read_trainer_state(ckpt)  # a property of the model, not of the run's state
    model, _, recipe = load_for_inference(ckpt)
    flops = model.flops_per_token(recipe.train.seq_len)
    train = rows(tmp_path / "run", "train")
    assert all(r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 1e12) for r in train)
    assert "| mfu " in res.out


def test_moving_a_batch_keeps_its_counts_and_kind():
    from lm2cli.training.loop import to_device

    t = torch.tensor([[1, 2, X]])
    batch = Batch(t, t, n_tokens=2, n_bytes=7.0, answers=True)
    assert to_device(batch, torch.device("cpu")) is batch
    moved = to_device(batch, torch.device("meta"))
    assert moved.inputs.device.type == moved.targets.device.type == "meta"
    assert (moved.n_tokens, moved.n_bytes, moved.answers) == (2, 7.0, True)
