"""BABILong-style sets: the injector, the builder command and its meta.json, the loader (local and hub)."""

from __future__ import annotations

import json
import math
import random

import pytest

from lm2cli.data.babi import Sample
from lm2cli.data.babilong import build_row, inject_facts, length_tokens, load_babilong
from lm2cli.data.examples import babilong_lengths
from lm2cli.data.haystack import BuiltinHaystack, SentenceSampler, split_sentences
from lm2cli.errors import Lm2Error

from .conftest import needs_shared, shared_dir
from .test_prepare import write_recipe

FACTS = ["Mary moved to the bathroom.", "John went to the hallway.", "Mary got the football there.",
         "Mary travelled to the office."]


def sample(facts=FACTS):
    return Sample("qa2", list(facts), "Where is the football? ", "office", [facts[2], facts[3]], [2, 3])


def test_lengths_are_thousands():
    assert [length_tokens(x) for x in ("0k", "1k", "4k", "128k", "1M")] == [0, 1000, 4000, 128000, 1_000_000]


def test_injection_keeps_fact_order_and_allows_shared_gaps():
    facts = [[100 + i] for i in range(30)]
    sentences = [[7, 7, 7] for _ in range(3)]
    tokens, positions = inject_facts(facts, sentences, random.Random(1))
    assert [t for t in tokens if t >= 100] == [100 + i for i in range(30)]  # order kept
    assert positions == sorted(positions) and len(set(positions)) < len(positions)  # shared gaps
    assert len(tokens) == 30 + 9


def test_window_keeps_facts_inside_and_too_narrow_window_fails():
    facts = [[100 + i] for i in range(20)]
    sentences = [[7] for _ in range(100)]
    _, positions = inject_facts(facts, sentences, random.Random(2), window=(0.0, 0.25))
    assert all(0 <= p <= 25 for p in positions)
    _, positions = inject_facts(facts, sentences, random.Random(2), window=(0.5, 0.6))
    assert all(50 <= p <= 60 for p in positions)
    with pytest.raises(Lm2Error, match="fact_window .* leaves no place"):
        inject_facts(facts, [[7], [7]], random.Random(2), window=(0.6, 0.9))


def rebuild(fact_ids, sentences, positions):
    """The token sequence a row's recorded positions describe: fact j just before haystack sentence
    positions[j] (at the end when it equals the number of sentences)."""
    tokens = []
    for i in range(len(sentences) + 1):
        tokens += [t for j, p in enumerate(positions) if p == i for t in fact_ids[j]]
        if i < len(sentences):
            tokens += sentences[i]
    return tokens


def test_facts_are_inserted_before_the_recorded_sentence():
    facts = [[100 + i, 200 + i] for i in range(5)]
    sentences = [[1000 + i] * 3 for i in range(12)]
    for seed in range(20):
        tokens, positions = inject_facts(facts, sentences, random.Random(seed))
        assert tokens == rebuild(facts, sentences, positions)


def test_fact_positions_spread_over_the_window_and_vary_between_rows():
    facts = [[100 + i] for i in range(4)]
    sentences = [[7] for _ in range(100)]
    drawn = [inject_facts(facts, sentences, random.Random(seed), window=(0.2, 0.6))[1] for seed in range(50)]
    everything = [p for positions in drawn for p in positions]
    assert 20 <= min(everything) <= 24 and 56 <= max(everything) <= 60  # the whole window is used
    assert len({tuple(p) for p in drawn}) > 40  # rows differ
    assert sum(len(set(p)) > 1 for p in drawn) > 40  # the facts of a row are spread, not stacked in one gap


class RecordingSampler:
    def __init__(self, sampler):
        self.sampler, self.last = sampler, None

    def sample(self, n_tokens):
        self.last = self.sampler.sample(n_tokens)
        return self.last


def test_a_row_is_its_haystack_with_the_facts_where_it_records_them(small_tokenizer):
    sampler = RecordingSampler(make_sampler(small_tokenizer))
    fact_ids = small_tokenizer.encode_batch(FACTS)
    seen = set()
    for k in range(5):
        row, _ = build_row(sample(), 1000, 300, small_tokenizer, sampler, random.Random(k), window=(0.25, 0.75))
        n = row["n_sentences"]
        assert n == len(sampler.last) > 10
        assert all(math.ceil(0.25 * n) <= p <= math.floor(0.75 * n) for p in row["fact_positions"])
        rebuilt = rebuild(fact_ids, sampler.last, row["fact_positions"])
        assert small_tokenizer.decode(rebuilt).strip() == row["input"]
        seen.add(tuple(row["fact_positions"]))
    assert len(seen) == 5


def make_sampler(tok, seed=0, side="test"):
    return SentenceSampler(BuiltinHaystack(side, 5), tok, random.Random(seed))


@pytest.mark.parametrize("length", [1000, 2000, 4000])
def test_budget_is_hit_exactly_and_survives_a_decode_round_trip(small_tokenizer, length):
    sampler = make_sampler(small_tokenizer)
    for k in range(3):
        row, reason = build_row(sample(), length, 300, small_tokenizer, sampler, random.Random(k))
        assert reason is None
        assert abs(row["n_tokens"] - (length - 300)) <= 2
        text = row["input"]
        positions = [text.index(f) for f in FACTS]
        assert positions == sorted(positions)  # facts appear, in story order
        assert row["question"] == "Where is the football? " and row["target"] == "office"


def test_zero_k_is_the_facts_joined_by_single_spaces(small_tokenizer):
    row, _ = build_row(sample(), 0, 300, small_tokenizer, make_sampler(small_tokenizer), random.Random(0))
    assert row["input"] == " ".join(FACTS)


def test_fact_filter_and_facts_over_budget_drop_samples(small_tokenizer):
    many = [f"Mary moved to the {r}." for r in ["office", "garden"] * 60]
    sampler = make_sampler(small_tokenizer)
    assert build_row(sample(many), 1000, 300, small_tokenizer, sampler, random.Random(0)) == (None, "fact_filter")
    long_facts = ["Mary " + "very " * 60 + "slowly moved to the office."] * 4
    assert build_row(sample(long_facts), 1000, 300, small_tokenizer, sampler,
                     random.Random(0)) == (None, "facts_over_budget")


def test_sentence_splitter_guards_abbreviations_and_collapses_whitespace():
    text = 'Mr. Darcy bowed.  Mrs. Bennet\nsmiled! "Is it?" asked Dr. Grant. It was, e.g. a test. Done'
    assert split_sentences(text) == ["Mr. Darcy bowed.", "Mrs. Bennet smiled!", '"Is it?" asked Dr. Grant.',
                                     "It was, e.g. a test.", "Done"]


def babilong_recipe(tmp_path, tokenizer, **babilong):
    model = tmp_path / "tok.model"
    tokenizer.save(model)
    values = {"dir": str(tmp_path / "bl"), "tasks": ["qa1", "qa2"], "lengths": ["0k", "1k", "2k"], "samples": 6}
    values.update(babilong)
    return write_recipe(tmp_path, tokenizer={"path": str(model)}, babilong=values)


def test_command_writes_the_hub_layout_and_meta(cli, tmp_path, small_tokenizer):
    recipe = babilong_recipe(tmp_path, small_tokenizer)
    res = cli("babilong", recipe)
    assert res.code == 0, res.err
    out = tmp_path / "bl"
    for task in ("qa1", "qa2"):
        for length in ("0k", "1k", "2k"):
            rows = json.loads((out / task / f"{length}.json").read_text())
            assert len(rows) == 6 and all({"input", "question", "target"} <= set(r) for r in rows)
            if length != "0k":
                assert all(abs(r["n_tokens"] - (length_tokens(length) - 300)) <= 2 for r in rows)
    zero, two = (json.loads((out / "qa1" / f"{n}.json").read_text()) for n in ("0k", "2k"))
    assert [r["question"] for r in zero] == [r["question"] for r in two]  # the same samples at every length
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "babilong" and meta["split"] == "test" and meta["facts_source"] == "synthetic"
    assert meta["haystack"]["kind"] == "synthetic" and "test side" in meta["haystack"]["name"]
    assert meta["tokenizer"]["sha256"] == small_tokenizer.sha256 and meta["tokenizer"]["vocab_size"] == 400
    assert meta["lengths"] == {"0k": 0, "1k": 1000, "2k": 2000} and meta["margin"] == 300
    assert meta["max_n_facts"] == "budget//8" and meta["whitespace"] == "collapsed"
    assert meta["length_unit"] == "tokens" and meta["generator"] == "lm2 bAbI-world generator"
    assert meta["fact_window"] == [0.0, 1.0] and meta["samples_per_length"] == 6
    documented = {"format", "lm2_version", "split", "generator", "facts_source", "haystack", "length_unit",
                  "tokenizer", "margin", "lengths", "samples_per_length", "seed", "max_n_facts",
                  "min_sentence_tokens", "max_sentence_tokens", "fact_window", "haystack_skip_names", "whitespace",
                  "sentence_splitter",
                  "mean_chars", "rows", "dropped", "files", "fingerprint"}  # docs/data.md
    assert documented <= set(meta) and meta["seed"] == 1234
    assert "not the official BABILong release" in meta["note"]
    assert meta["mean_chars"]["2k"] > meta["mean_chars"]["1k"] > meta["mean_chars"]["0k"]
    assert load_babilong(out, "1k", "qa2") == [{k: r[k] for k in ("input", "question", "target")}
                                              for r in json.loads((out / "qa2" / "1k.json").read_text())]
    res = cli("babilong", recipe)
    assert res.code == 0 and "up to date" in res.out


def test_command_places_facts_within_the_fact_window(cli, tmp_path, small_tokenizer):
    recipe = babilong_recipe(tmp_path, small_tokenizer, tasks=["qa1"], lengths=["2k"], samples=8,
                             fact_window=[0.0, 0.25])
    assert cli("babilong", recipe).code == 0
    rows = json.loads((tmp_path / "bl" / "qa1" / "2k.json").read_text())
    shares = [p / r["n_sentences"] for r in rows for p in r["fact_positions"]]
    assert all(0.0 <= x <= 0.25 for x in shares)
    assert min(shares) < 0.1 and max(shares) > 0.15  # spread over the window, from its start
    assert json.loads((tmp_path / "bl" / "meta.json").read_text())["fact_window"] == [0.0, 0.25]


def test_intermediate_lengths_for_a_gentle_curriculum(cli, tmp_path, small_tokenizer):
    """256 and 512 tokens: rows between 0k (facts only) and 1k, within their token budget, in length order."""
    recipe = babilong_recipe(tmp_path, small_tokenizer, tasks=["qa1"], lengths=["256", "512"], samples=6, margin=20)
    assert cli("babilong", recipe).code == 0
    meta = json.loads((tmp_path / "bl" / "meta.json").read_text())
    assert meta["lengths"] == {"256": 256, "512": 512}
    for name, budget in meta["lengths"].items():
        rows = json.loads((tmp_path / "bl" / "qa1" / f"{name}.json").read_text())
        sizes = [len(small_tokenizer.encode(r["input"])) for r in rows]
        assert len(rows) == 6 and max(sizes) <= budget - 20 and min(sizes) > budget // 2, (name, sizes)
    assert babilong_lengths(str(tmp_path / "bl"), ["qa1"], None) == ["256", "512"]


def test_identical_seeds_identical_files_and_train_differs_from_test(cli, tmp_path, small_tokenizer):
    recipe = babilong_recipe(tmp_path, small_tokenizer, tasks=["qa1"], lengths=["1k"])
    assert cli("babilong", recipe).code == 0
    first = (tmp_path / "bl" / "qa1" / "1k.json").read_text()
    assert cli("babilong", recipe, "--force").code == 0
    assert (tmp_path / "bl" / "qa1" / "1k.json").read_text() == first
    assert cli("babilong", recipe, "--set", "babilong.split=train", "--set", "babilong.margin=20",
               "--out", tmp_path / "train").code == 0
    train = json.loads((tmp_path / "train" / "qa1" / "1k.json").read_text())
    test = json.loads(first)
    assert json.loads((tmp_path / "train" / "meta.json").read_text())["split"] == "train"
    train_sentences = {s for r in train for s in split_sentences(r["input"])}
    test_sentences = {s for r in test for s in split_sentences(r["input"])}
    overlap = len(train_sentences & test_sentences) / len(test_sentences)
    assert overlap < 0.3  # different haystack streams (short templated sentences may still coincide)


def test_reading_real_format_facts_from_a_directory(cli, tmp_path, small_tokenizer):
    recipe = babilong_recipe(tmp_path, small_tokenizer, tasks=["qa1"], lengths=["0k"])
    res = cli("babilong", recipe, "--babi-text", tmp_path / "babi", "--train-questions", "50",
              "--test-questions", "20")
    assert res.code == 0, res.err
    assert (tmp_path / "babi" / "qa1_single-supporting-fact_test.txt").read_text().startswith("1 ")
    res = cli("babilong", recipe, "--set", f"babilong.facts='{tmp_path / 'babi'}'")
    assert res.code == 0, res.err
    meta = json.loads((tmp_path / "bl" / "meta.json").read_text())
    assert meta["facts_source"].startswith("babi-v1.2:") and meta["generator"] == "bAbI v1.2 files"
    res = cli("babilong", recipe, "--set", f"babilong.facts='{tmp_path / 'nowhere'}'")
    assert res.code == 2 and "expected \"synthetic\" or a bAbI v1.2 directory" in res.err


def test_haystack_from_text_files(cli, tmp_path, small_tokenizer):
    books = tmp_path / "books"
    books.mkdir()
    sentence = "The long grey road wound past the quiet farms and over the stony hill at dusk. "
    (books / "one.txt").write_text((sentence * 3 + "\n\n") * 300)
    recipe = babilong_recipe(tmp_path, small_tokenizer, tasks=["qa1"], lengths=["1k"], haystack=str(books))
    res = cli("babilong", recipe)
    assert res.code == 0, res.err
    rows = json.loads((tmp_path / "bl" / "qa1" / "1k.json").read_text())
    assert "long grey road" in rows[0]["input"]
    meta = json.loads((tmp_path / "bl" / "meta.json").read_text())
    assert meta["haystack"]["kind"] == "books" and meta["haystack"]["files"][0].endswith("one.txt")


def haystack_only(row: dict) -> str:
    """The row's input with its facts cut out."""
    text, end = [], 0
    for start, stop in row["fact_spans"]:
        text.append(row["input"][end:start])
        end = stop
    return "".join(text) + row["input"][end:]


def test_haystack_sentences_naming_babi_people_can_be_kept_out(cli, tmp_path, small_tokenizer):
    """A novel's own Mary is a distractor no bAbI story has: with babilong.haystack_skip_names no haystack
    sentence names a bAbI person, and meta.json counts what was skipped; without it they stay."""
    books = tmp_path / "books"
    books.mkdir()
    plain = "The long grey road wound past the quiet farms and over the stony hill at dusk. "
    named = "Then Mary walked slowly into the old kitchen to find her brother John there. "
    lookalike = "The maryland johnson and the billiards danced in the garden all the night long. "
    (books / "one.txt").write_text((plain + named + lookalike + "\n\n") * 400)
    recipe = babilong_recipe(tmp_path, small_tokenizer, tasks=["qa1"], lengths=["1k"], haystack=str(books))
    rows = {}
    for skip in (False, True):
        res = cli("babilong", recipe, "--set", f"babilong.haystack_skip_names={str(skip).lower()}")
        assert res.code == 0, res.err
        rows[skip] = json.loads((tmp_path / "bl" / "qa1" / "1k.json").read_text())
        meta = json.loads((tmp_path / "bl" / "meta.json").read_text())
        assert meta["haystack_skip_names"] is skip
    assert all("Mary walked slowly" in haystack_only(r) for r in rows[False])
    for row in rows[True]:
        hay = haystack_only(row)
        assert "Mary" not in hay and "John" not in hay and "long grey road" in hay
        assert "maryland johnson and the billiards" in hay  # whole words only
        assert abs(row["n_tokens"] - 700) <= 2  # the budget is still filled
    assert meta["haystack_sentences_skipped_for_names"]["qa1"]["1k"] >= len(rows[True])
    assert [r["question"] for r in rows[True]] == [r["question"] for r in rows[False]]  # same stories


def test_a_set_built_before_haystack_skip_names_keeps_its_fingerprint(small_tokenizer, tmp_path):
    """Off, the option changes no row, so a set built before it existed stays up to date (no rebuild after an
    upgrade): its fingerprint is the section without the new key. On, the fingerprint changes."""
    import dataclasses
    import hashlib

    from lm2cli.data.babilong import _fingerprint
    from lm2cli.recipe import load_recipe

    recipe = load_recipe(babilong_recipe(tmp_path, small_tokenizer))
    section = dataclasses.asdict(recipe.babilong)
    for key in ("dir", "haystack_skip_names"):
        section.pop(key)
    before = json.dumps({"babilong": section, "tokenizer": small_tokenizer.sha256, "haystack": {"h": 1},
                         "facts": {"f": 1}, "format": 2}, sort_keys=True)
    assert _fingerprint(recipe, small_tokenizer, {"h": 1}, {"f": 1}) == hashlib.sha256(before.encode()).hexdigest()
    on = dataclasses.replace(recipe, babilong=dataclasses.replace(recipe.babilong, haystack_skip_names=True))
    assert _fingerprint(on, small_tokenizer, {"h": 1}, {"f": 1}) != _fingerprint(recipe, small_tokenizer, {"h": 1},
                                                                                  {"f": 1})


@pytest.mark.parametrize("sets, message", [
    (["babilong.margin=1500"], "babilong.margin = 1500 leaves no context at length 1k"),
    (["babilong.haystack='no/such/place.txt'"], "not found"),
    (["tokenizer.path=''", "data.dir='nowhere'"], "run `lm2 tokenize RECIPE` first"),
])
def test_bad_babilong_input_is_one_line(cli, tmp_path, small_tokenizer, sets, message):
    recipe = babilong_recipe(tmp_path, small_tokenizer)
    args = [a for s in sets for a in ("--set", s)]
    res = cli("babilong", recipe, *args)
    assert res.code == 2 and message in res.err and res.err.count("\n") == 1


SHARED_BOOKS = shared_dir("books")


@needs_shared("books", "persuasion.txt")
def test_real_books_as_haystack(small_tokenizer):
    from lm2cli.data.haystack import haystack_for

    sampler = SentenceSampler(haystack_for(str(SHARED_BOOKS / "persuasion.txt"), "test", 1), small_tokenizer,
                              random.Random(0))
    row, _ = build_row(sample(), 4000, 300, small_tokenizer, sampler, random.Random(0))
    assert abs(row["n_tokens"] - 3700) <= 2 and "  " not in row["input"]


# ---------------------------------------------------------------------------------------------- loader

ROWS = [{"input": "Mary went to the office.", "question": "Where is Mary? ", "target": "office", "extra": 1}]


class FakeDatasetDict(dict):
    pass


def fake_hub(order):
    """A load_dataset stand-in holding qa1 at 1k, in the current (length, task) or the old (task, length) order."""
    calls = []

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        if name not in ("RMT-team/babilong", "RMT-team/babilong-1k-samples"):
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        outer, inner = ("1k", "qa1") if order == "new" else ("qa1", "1k")
        if config != outer:
            raise ValueError(f"BuilderConfig '{config}' not found. Available: ['{outer}']")
        return FakeDatasetDict({inner: ROWS})

    return load_dataset, calls


@pytest.mark.parametrize("order", ["new", "old"])
@pytest.mark.parametrize("name", ["RMT-team/babilong", "booydar/babilong", "booydar/babilong-1k-samples"])
def test_hub_loader_handles_both_orders_and_aliases(monkeypatch, order, name):
    import datasets

    load_dataset, calls = fake_hub(order)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = load_babilong(name, "1k", "qa1")
    assert rows == [{k: ROWS[0][k] for k in ("input", "question", "target")}]
    assert calls[0][0].startswith("RMT-team/")


def test_hub_loader_offline_and_bad_rows(monkeypatch, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'RMT-team/babilong' on the Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(Lm2Error, match=r"cannot be reached .* build a local set with `lm2 babilong RECIPE`"):
        load_babilong("RMT-team/babilong", "1k", "qa1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ValueError("not cached")))
    with pytest.raises(Lm2Error, match="HF_DATASETS_OFFLINE is set"):
        load_babilong("RMT-team/babilong", "1k", "qa1")
    (tmp_path / "qa1").mkdir()
    (tmp_path / "qa1" / "1k.json").write_text(json.dumps([{"input": "x", "question": "y"}]))
    with pytest.raises(Lm2Error, match="row 0 needs text fields input, question and target"):
        load_babilong(tmp_path, "1k", "qa1")
    with pytest.raises(Lm2Error, match="no qa2/1k.json"):
        load_babilong(tmp_path, "1k", "qa2")


@pytest.mark.parametrize("extra, expected", [
    ({"fact_spans": [[0, 5], [6, 9]], "support": [1]}, True),
    ({"fact_spans": [[0, 5], [6, 9]], "support": [0]}, False),
    ({"fact_spans": [[0, 5], [6, 9], [10, 12]], "support": [0, 1]}, False),  # qa2: the newest support counts
    ({}, None),  # hub rows say nothing
    ({"fact_spans": [[0, 5]], "support": [True]}, None),  # a bool is not an index
    ({"fact_spans": [[0, 5]], "support": [1]}, None),  # out of range
    ({"fact_spans": [[0, 5]], "support": [-1]}, None),
    ({"fact_spans": "0-5", "support": [0]}, None),
    ({"fact_spans": [[0, 5]], "support": []}, None),
])
def test_support_is_last_fact_reads_only_rows_that_add_up(extra, expected):
    from lm2cli.data.babilong import support_is_last_fact

    assert support_is_last_fact({"input": "x", "question": "q", "target": "t", **extra}) is expected
