"""The analysis on a recorder fed known weights: every number below is computed by hand."""

from __future__ import annotations

import json

import pytest
import torch

from lm2cli.inspection import analysis
from lm2cli.inspection.capture import Inspection
from lm2cli.inspection.recording import TraceRecorder

S, N = 4, 2  # two slots, segments of four tokens, two written segments and an open one of two tokens
SLOT0 = [[0.1, 0.4, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25]]  # segment 0 (facts at 1, 2), segment 1
SLOT1 = [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]
FACTS = [False, True, True, False, False, False, False, False, False, False]
ANSWER = 9
ANSWER_READ = [0.7, 0.3]


def near(value):
    return pytest.approx(value, abs=1e-4)  # summaries round to 4 decimals


def fed_recorder() -> TraceRecorder:
    """A recorder fed through its model hooks (batch 1, one head) with the weights above."""
    rec = TraceRecorder(layers=[0])
    rec.seed({0: torch.zeros(N, 3)})
    reads = torch.tensor([[0.5, 0.5]] * 9 + [ANSWER_READ])
    for start, end in ((0, 4), (4, 8), (8, 10)):
        rec.on_read(0, start, reads[start:end][None, None])
        rec.on_out_gate(0, start, torch.full((1, end - start, 3), 0.25 if start < 8 else 0.75))
    for w in range(2):
        attention = torch.tensor([SLOT0[w], SLOT1[w]])[None, None]
        in_gate = torch.tensor([[0.2, 0.6, 0.7], [0.1, 0.1, 0.1]])[None]
        bank = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])[None] * (w + 1)
        rec.on_write(0, 4 * (w + 1), attention, in_gate, 1 - in_gate, bank)
    return rec


def inspection(rec: TraceRecorder, fact_mask=FACTS) -> Inspection:
    return Inspection(arch="lm2", checkpoint="hand", heads="mean", slots=N, segment_len=S, slot_window=(0, N),
                      tokens=list(range(10)), pieces=[f"t{i}" for i in range(10)], n_prompt=10,
                      layers={0: rec.traces[0].tensors()}, fact_mask=fact_mask, answer_pos=ANSWER)


def test_fact_attention_ratio_of_a_hand_built_case():
    facts = analysis.fact_attention(fed_recorder().traces[0].tensors(), S, FACTS, ANSWER)
    # write mass on facts: slot 0 0.4 + 0.4, slot 1 0.25 + 0.25 = 1.3 of 4 (two slots x two segments);
    # fact tokens: 2 of the 8 written tokens -> (1.3 / 4) / (2 / 8) = 1.3
    assert facts["ratio"] == pytest.approx(1.3)
    assert facts["fact_tokens_written"] == 2 and facts["tokens_written"] == 8
    # over the segment with facts: slot 0 puts 0.8 on them, slot 1 0.5; their share of it is 2 / 4
    assert facts["slot_ratio"] == pytest.approx([1.6, 1.0])
    assert facts["fact_slots"] == [0]  # 1.6 is a clear preference, 1.0 none
    assert facts["answer_read_on_fact_slots"] == pytest.approx(0.7)  # the answer reads slot 0 with 0.7
    assert facts["answer_read_even"] == pytest.approx(0.5)  # one fact slot of two


def test_no_clear_fact_slot_gives_no_answer_number():
    rec = fed_recorder()
    tensors = rec.traces[0].tensors()
    tensors["write"][0, 0] = torch.tensor([0.2, 0.3, 0.3, 0.2])  # slot 0: 0.6 of the mass on half the tokens
    facts = analysis.fact_attention(tensors, S, FACTS, ANSWER)
    assert facts["slot_ratio"] == pytest.approx([1.2, 1.0]) and facts["fact_slots"] == []
    assert "answer_read_on_fact_slots" not in facts


def test_no_fact_written_gives_no_ratio():
    tensors = fed_recorder().traces[0].tensors()
    only_open = [False] * 8 + [True, True]  # facts in the open segment were never written
    assert analysis.fact_attention(tensors, S, only_open, ANSWER) is None


def test_slot_ranking_and_top_written_tokens():
    tensors = fed_recorder().traces[0].tensors()
    ranking = analysis.slot_ranking(tensors, 10)
    # read mass: 9 tokens x 0.5 + 0.7 = 5.2 of 10 for slot 0
    assert ranking["read_mass"] == pytest.approx([0.52, 0.48])
    assert ranking["by_read"] == [0, 1]
    # change: slot 0 |[3,4,0]| = 5 then 5 more; slot 1: 1 then 1
    assert ranking["change"] == pytest.approx([10.0, 2.0]) and ranking["by_change"] == [0, 1]
    top = analysis.top_written_tokens(tensors, S, k=2)
    assert [p for p, _ in top[0]] in ([1, 2], [2, 1]) and top[0][0][1] == pytest.approx(0.4)
    assert top[1][0] == (4, pytest.approx(0.7))  # slot 1's strongest write: token 4 of segment 1


def test_segment_stats_gates_and_norms():
    stats = analysis.segment_stats(fed_recorder().traces[0].tensors(), S, 10)
    first, second, open_segment = stats
    assert first["tokens"] == [0, 4] and second["tokens"] == [4, 8]
    assert first["in_gate"] == near((0.5 + 0.1) / 2)  # slot means 1.5/3 and 0.1
    assert first["in_gate_open"] == near((2 / 3 + 0) / 2)
    assert first["forget_gate_open"] == near((1 / 3 + 1) / 2)
    assert first["out_gate"] == 0.25 and first["out_gate_open"] == 0
    assert first["memory_norm"] == near(((25 + 1) / 2) ** 0.5)
    assert second["mean_change"] == near((5 + 1) / 2)
    assert open_segment == {"segment": 2, "tokens": [8, 10], "open": True, "out_gate": 0.75, "out_gate_open": 1.0}


def test_explainer_records_name_each_slot_and_its_top_written_tokens():
    ins = inspection(fed_recorder())
    summary = analysis.summarize(ins, top_tokens=2)
    records = list(analysis.explainer_records(ins, summary, lambda ids: "".join(f"<{i}>" for i in ids), k=2))
    assert [(r["layer"], r["slot"]) for r in records] == [(0, 0), (0, 1)]
    assert records[0]["read_rank"] == 0 and records[0]["fact_ratio"] == pytest.approx(1.6)
    best = records[1]["top_written"][0]
    assert best["position"] == 4 and best["token"] == "t4" and best["weight"] == pytest.approx(0.7)
    assert best["context"] == "<0><1><2><3>[[<4>]]<5><6><7><8>"
    json.dumps(records)  # JSON-able, for slots.jsonl
    assert summary["layers"]["0"]["facts"]["ratio"] == pytest.approx(1.3)
