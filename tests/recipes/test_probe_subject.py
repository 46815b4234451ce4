"""recipes/babilong/probe_subject.py: the linear probe behind docs/results.md's eleventh pass (does a block's input
at a fact's place word carry the fact's person?). The probe must tell encoded from not encoded, probe the place
word's own token, and run end to end on a saved run with one-line errors for bad rows."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from tests.inspection.conftest import CORPUS, save_run

from .conftest import BABILONG


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("probe_subject", BABILONG / "probe_subject.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["probe_subject"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    from lm2cli.data.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 50, model_type="bpe", vocab_size=300, byte_fallback=True,
                           character_coverage=1.0, sample_sentences=10_000, answer_token="<ans>",
                           extra_symbols=[], seed=1)


PEOPLE, PLACES = ["Mary", "John", "Sandra", "Daniel"], ["office", "garden", "hallway", "bathroom"]


def rows(n: int, seed: int) -> list[dict]:
    rng = __import__("random").Random(seed)
    out = []
    for _ in range(n):
        facts = [f"{rng.choice(PEOPLE)} went to the {rng.choice(PLACES)}." for _ in range(3)]
        text, spans = "", []
        for fact in facts:
            start = len(text) + (1 if text else 0)
            text = f"{text} {fact}" if text else fact
            spans.append([start, start + len(fact)])
        out.append({"input": text, "question": f"Where is {facts[-1].split()[0]}?", "fact_spans": spans})
    return out


def test_the_probe_tells_an_encoded_person_from_noise(probe):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=gen)
    noise = torch.randn(400, 16, generator=gen)
    encoded = noise.clone()
    encoded[:, :4] += 6 * torch.nn.functional.one_hot(y, 4).float()
    assert probe.probe_accuracy(encoded[:300], y[:300], encoded[300:], y[300:], 4) > 0.95
    assert probe.probe_accuracy(noise[:300], y[:300], noise[300:], y[300:], 4) < 0.5


def test_it_probes_the_place_words_last_token_and_the_answer_separator(probe, tokenizer):
    row = rows(1, 0)[0]
    items = probe.probe_items([row], tokenizer, "place")
    assert [person for _, _, person in items] == [s.split()[0] for s in row["input"].split(". ")]
    for (ids, pos, _), (start, end) in zip(items, row["fact_spans"], strict=True):
        place = row["input"][start:end].rstrip(".").split()[-1]
        assert tokenizer.decode(ids[:pos + 1]).endswith(place)
        assert not tokenizer.decode(ids[:pos]).endswith(place)
    (ids, pos, person), = probe.probe_items([row], tokenizer, "question")
    assert ids[pos] == tokenizer.answer_id and person == row["question"].split()[-1].rstrip("?")
    assert probe.probe_items([{**row, "question": "  "}], tokenizer, "question") == []  # nothing asked: skipped


def test_end_to_end_on_a_saved_run_and_one_line_errors(probe, tokenizer, tmp_path, capsys):
    run = save_run(tmp_path / "run", tokenizer, "lm2", "memory.write=delta")
    (tmp_path / "train.json").write_text(json.dumps(rows(40, 1)))
    (tmp_path / "test.json").write_text(json.dumps(rows(10, 2)))
    code = probe.main([str(run), "--train", str(tmp_path / "train.json"), "--test", str(tmp_path / "test.json"),
                       "--json", str(tmp_path / "out.json")])
    assert code == 0, capsys.readouterr().err
    (result,) = json.loads((tmp_path / "out.json").read_text())
    assert result["test_items"] == 30 and len(result["accuracy_by_block_input"]) == 2  # recipes/tiny.toml: 2 blocks
    assert all(0.0 <= a <= 1.0 for a in result["accuracy_by_block_input"])
    # block 0's input at the place token is the place's embedding alone: no person to find beyond chance
    assert result["accuracy_by_block_input"][0] <= result["majority"] + 0.2
    (tmp_path / "bad.json").write_text(json.dumps([{"input": "Mary went home.", "fact_spans": [[0, 99]]}]))
    capsys.readouterr()
    assert probe.main([str(run), "--train", str(tmp_path / "bad.json"), "--test", str(tmp_path / "test.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json: row 0 lacks" in err
