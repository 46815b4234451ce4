"""`lm2 finetune`: row assembly and loss masks, curriculum stages with exact resume, starting weights."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lm2cli import checkpoint as layout
from lm2cli.data.examples import babilong_example, jsonl_example
from lm2cli.scoring import IGNORE
from lm2cli.training import checkpoints as ck
from lm2cli.training.finetune import FinetuneData

from .conftest import PEOPLE, ROOMS, SMALL_MODEL, TINY


@pytest.fixture
def tok(tiny_data):
    from lm2cli.data.tokenizer import Tokenizer

    return Tokenizer.load(tiny_data / "tokenizer.model")


def test_babilong_row_is_assembled_as_specified(tok):
    row = {"input": "  Mary went to the kitchen. John moved to the garden. ", "question": "Where is Mary? ",
           "target": "kitchen"}
    ex = babilong_example(tok, row)
    text = "Mary went to the kitchen. John moved to the garden. Where is Mary?"
    assert ex.prompt == [tok.bos_id] + tok.encode(text) + [tok.answer_id]
    assert tok.answer_id == 4
    assert ex.answer == tok.encode("kitchen") + [tok.eos_id]
    assert tok.decode(ex.answer) == "kitchen"


def test_loss_only_on_answer_and_eos_with_right_padding(tok):
    from lm2cli.recipe import load_recipe

    recipe = load_recipe(TINY, ["train.batch_size=2", "train.eval_batches=1"])
    short = babilong_example(tok, {"input": "Mary went to the hallway.", "question": "Where is Mary?",
                                   "target": "hallway"})
    long = babilong_example(tok, {"input": "Bill went to the office. Mary went to the hallway. Fred moved to "
                                           "the garden.", "question": "Where is Fred?", "target": "garden"})
    data = FinetuneData([short, long], [short], 1000, recipe, tok, stage=0, label="")
    b = data.collate([short, long])
    assert b.inputs.shape == (2, len(long) - 1)
    assert b.inputs[0, len(short) - 1:].tolist() == [tok.pad_id] * (len(long) - len(short))
    for i, ex in enumerate([short, long]):
        t = b.targets[i]
        assert t[t != IGNORE].tolist() == ex.answer  # answer tokens + EOS, nothing else
        assert (t[:len(ex.prompt) - 1] == IGNORE).all()
    assert b.answers and b.n_tokens == len(short) + len(long) - 2


def test_jsonl_rows(tok, tmp_path):
    from lm2cli.data.examples import read_jsonl
    from lm2cli.errors import Lm2Error

    ex = jsonl_example(tok, {"prompt": "Where is Mary?", "response": "kitchen"})
    assert ex.prompt == [tok.bos_id] + tok.encode("Where is Mary?")
    assert ex.answer == tok.encode("kitchen") + [tok.eos_id]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(Lm2Error, match=r"bad.jsonl:2: expected an object with string fields"):
        read_jsonl(bad)


# ------------------------------------------------------------------------------------------ end to end


def qa_rows(n_facts: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        where, facts = {}, []
        for _ in range(n_facts):
            p, r = rng.choice(PEOPLE), rng.choice(ROOMS)
            where[p] = r
            facts.append(f"{p} went to the {r}.")
        p = rng.choice(sorted(where))
        rows.append({"input": " ".join(facts), "question": f"Where is {p}?", "target": where[p]})
    return rows


@pytest.fixture
def babilong_dir(tmp_path) -> Path:
    """Hub layout with a short length (fits one 32-token segment) and a longer one (needs two)."""
    root = tmp_path / "babilong"
    for length, n_facts in (("0k", 2), ("1k", 6)):
        (root / "qa1").mkdir(parents=True, exist_ok=True)
        (root / "qa1" / f"{length}.json").write_text(json.dumps(qa_rows(n_facts, 40, seed=n_facts)))
    return root


def finetune_args(tiny_data, out, *sets):
    flat = [f"data.dir={tiny_data}", *SMALL_MODEL, "train.eval_every=2", "train.save_every=2", *sets]
    return [str(TINY), *[x for s in flat for x in ("--set", s)], "--out", str(out)]


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]


def test_curriculum_from_a_vanilla_checkpoint_with_exact_resume(cli, tiny_data, babilong_dir, tmp_path,
                                                                interrupted_at):
    pre = tmp_path / "pre"
    res = cli("pretrain", *finetune_args(tiny_data, pre, "model.arch=vanilla", "train.steps=4"))
    assert res.code == 0, res.err
    sets = (f"finetune.init_from={pre}", f"finetune.data={babilong_dir}", "finetune.stages=[1, 2]",
            "train.steps=4", "memory.out_gate_bias=-2.0")
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "a", *sets))
    assert res.code == 0, res.err
    assert "new (freshly initialised) memory parameters" in res.out and "blocks 0, 1" in res.out
    assert "[stage 2/2, 2 segments] starting from" in res.out
    assert "\n[stage 2/2, 2 segments] step 5/8 | loss " in res.out  # progress lines carry the stage label
    root = tmp_path / "a/checkpoints"
    b1, b2 = layout.read_pointer(root, "best_stage_1"), layout.read_pointer(root, "best_stage_2")
    assert layout.step_of(b1) <= 4 < layout.step_of(b2) <= 8 and layout.read_pointer(root, "best") == b2
    assert ck.read_trainer_state(root / b2)["stage"] == 1
    rows = metrics(tmp_path / "a")
    val = [r for r in rows if r["kind"] == "val"]
    assert [(r["stage"], r["step"]) for r in val] == [(1, 0), (1, 2), (1, 4), (2, 4), (2, 6), (2, 8)]
    assert val[2]["val_loss"] < val[0]["val_loss"]  # stage 1 learns the answers
    for stage, best in enumerate((b1, b2)):  # exact match as greedy decoding of the same rows measures it
        recorded = ck.read_trainer_state(root / best)["val"]["val_em"]
        assert recorded == pytest.approx(greedy_exact_match(root / best, validation_rows(tmp_path / "a", stage)))

    # Interrupted in stage 2, then resumed: the same run, including the stage boundary.
    with interrupted_at(6, 15):
        res = cli("finetune", *finetune_args(tiny_data, tmp_path / "b", *sets))
    assert res.code == 143 and "lm2 finetune" in res.err
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "b", *sets), "--resume")
    assert res.code == 0, res.err
    assert metrics(tmp_path / "b") == rows
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "b", *sets), "--resume")  # every stage is done
    assert res.code == 0 and "nothing to train: the checkpoint is at step 8, the end of the last of 2" in res.out
    assert metrics(tmp_path / "b") == rows


def test_validation_reports_each_length_of_the_validation_rows(cli, tiny_data, babilong_dir, tmp_path):
    val_dir = tmp_path / "val"
    (val_dir / "qa1").mkdir(parents=True)
    for length, n_facts in (("0k", 1), ("1k", 3)):  # both fit the 2-segment stage
        (val_dir / "qa1" / f"{length}.json").write_text(json.dumps(qa_rows(n_facts, 6, seed=10 + n_facts)))
    run = tmp_path / "run"
    res = cli("finetune", *finetune_args(tiny_data, run, f"finetune.data={babilong_dir}", "finetune.stages=[2]",
                                         f"finetune.val_data={val_dir}", "train.steps=2", "train.eval_batches=3"))
    assert res.code == 0, res.err
    assert " by length 0k " in res.out and "% (6) 1k " in res.out
    newest = run / "checkpoints" / layout.newest_checkpoint(run / "checkpoints")
    recorded = ck.read_trainer_state(newest)["val"]
    examples = validation_rows(run, 0)
    for length in ("0k", "1k"):
        rows = [e for e in examples if e.group == length]
        assert recorded[f"val_rows@{length}"] == len(rows) == 6
        assert recorded[f"val_em@{length}"] == pytest.approx(greedy_exact_match(newest, rows))
    assert recorded["val_em"] == pytest.approx(greedy_exact_match(newest, examples))
    assert [r["val_rows@1k"] for r in metrics(run) if r["kind"] == "val"] == [6, 6]  # step 0 and step 2


def validation_rows(run: Path, stage: int) -> list:
    """The validation examples of curriculum stage `stage` (0-based) of a finished run, chosen as the run did."""
    from lm2cli.data.tokenizer import Tokenizer
    from lm2cli.recipe import load_recipe
    from lm2cli.training.finetune import split_examples, stage_budgets

    recipe = load_recipe(run / "recipe.toml")
    tok = Tokenizer.load(run / "checkpoints" / layout.newest_checkpoint(run / "checkpoints") / "tokenizer.model")
    train, val, _ = split_examples(recipe, tok)
    return FinetuneData(train, val, stage_budgets(recipe)[stage], recipe, tok, stage, "").val


@torch.no_grad()
def greedy_exact_match(ckpt: Path, examples: list) -> float:
    """Share of examples whose answer (EOS included) greedy decoding reproduces, token by token."""
    from lm2cli.checkpoint import load_for_inference

    model, _, _ = load_for_inference(ckpt)
    hits = 0
    for e in examples:
        logits, state = model(torch.tensor([e.prompt]))
        produced = []
        while len(produced) < len(e.answer):
            produced.append(int(logits[0, -1].argmax()))
            logits, state = model(torch.tensor([produced[-1:]]), state)
        hits += produced == e.answer
    return hits / len(examples)


def test_resume_at_a_stage_boundary_starts_the_next_stage(cli, tiny_data, babilong_dir, tmp_path):
    sets = (f"finetune.data={babilong_dir}", "finetune.stages=[1, 2]", "train.steps=2")
    assert cli("finetune", *finetune_args(tiny_data, tmp_path / "a", *sets)).code == 0
    b = tmp_path / "b"
    assert cli("finetune", *finetune_args(tiny_data, b, *sets[:2], "finetune.stages=[1]", "train.steps=2")).code == 0
    res = cli("finetune", *finetune_args(tiny_data, b, *sets), "--resume")  # stage 1 is done: go on to stage 2
    assert res.code == 0, res.err
    assert "[stage 2/2, 2 segments] starting from" in res.out
    assert metrics(b) == metrics(tmp_path / "a")


def test_no_row_fits_a_stage(cli, tiny_data, babilong_dir, tmp_path):
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "r", f"finetune.data={babilong_dir}",
                                         "memory.segment_len=8", "train.steps=1"))
    assert res.code == 2 and "no training row fits 8 tokens" in res.err and "lm2 babilong" in res.err


def hf_llama_dir(path: Path, tok_path: Path) -> Path:
    """A tiny Hugging Face Llama checkpoint written by hand (HF parameter names, config.json)."""
    d, layers, heads, kv, hidden, vocab = 32, 2, 2, 1, 96, 400
    torch.manual_seed(0)
    dh = d // heads
    w = {"model.embed_tokens.weight": torch.randn(vocab, d) * 0.02, "model.norm.weight": torch.ones(d),
         "lm_head.weight": torch.randn(vocab, d) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = torch.randn(heads * dh, d) * 0.02
        w[p + "self_attn.k_proj.weight"] = torch.randn(kv * dh, d) * 0.02
        w[p + "self_attn.v_proj.weight"] = torch.randn(kv * dh, d) * 0.02
        w[p + "self_attn.o_proj.weight"] = torch.randn(d, heads * dh) * 0.02
        w[p + "mlp.gate_proj.weight"] = torch.randn(hidden, d) * 0.02
        w[p + "mlp.up_proj.weight"] = torch.randn(hidden, d) * 0.02
        w[p + "mlp.down_proj.weight"] = torch.randn(d, hidden) * 0.02
        w[p + "input_layernorm.weight"] = torch.ones(d)
        w[p + "post_attention_layernorm.weight"] = torch.ones(d)
    path.mkdir()
    save_file(w, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "intermediate_size": hidden, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "max_position_embeddings": 512}))
    (path / "tokenizer.model").write_bytes(tok_path.read_bytes())
    return path


def test_an_rmt_starts_from_a_vanilla_run_with_fresh_memory_tokens(cli, tiny_data, babilong_dir, tmp_path):
    """RMT's papers add memory tokens to a pretrained decoder: the vanilla backbone loads bit for bit and only
    the memory tokens are new. Another backbone shape is still refused naming the key."""
    from lm2cli.checkpoint import load_for_inference

    pre = tmp_path / "pre"
    res = cli("pretrain", *finetune_args(tiny_data, pre, "model.arch=vanilla", "train.steps=2"))
    assert res.code == 0, res.err
    sets = (f"finetune.init_from={pre}", f"finetune.data={babilong_dir}", "finetune.stages=[1]", "train.steps=1",
            "train.lr=1e-12", "train.min_lr=0", "train.warmup_steps=0", "model.arch=rmt", "memory.slots=4")
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "r", *sets))
    assert res.code == 0, res.err
    assert "new (freshly initialised) memory parameters: 1 tensors (rmt_memory, ...)" in res.out
    vanilla, _, _ = load_for_inference(pre)
    rmt, _, recipe = load_for_inference(tmp_path / "r")
    assert recipe.model.arch == "rmt" and rmt.rmt_memory.shape[0] == 4
    backbone = vanilla.state_dict()
    for name, value in rmt.state_dict().items():
        if name != "rmt_memory":  # lr 1e-12: one step moves nothing visible
            torch.testing.assert_close(value, backbone[name], rtol=0, atol=1e-8)
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "w", *sets, "model.n_layers=3"))
    assert res.code == 2 and "model.n_layers = 2 in the checkpoint, 3 now" in res.err


def test_init_from_hugging_face_llama_adds_fresh_memory(cli, tiny_data, tmp_path):
    hf = hf_llama_dir(tmp_path / "hf", tiny_data / "tokenizer.model")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{r['input']} {r['question']}", "response": r["target"]}) + "\n"
                            for r in qa_rows(2, 30, seed=5)))
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "r", f"finetune.init_from={hf}",
                                         "finetune.format=jsonl", f"finetune.data={data}", "train.steps=2",
                                         "model.d_model=64", "train.lr=1e-9", "train.min_lr=0"))
    assert res.code == 0, res.err
    assert "Hugging Face Llama weights" in res.out and "d_model=32" in res.out
    assert "new (freshly initialised) memory parameters" in res.out
    from safetensors.torch import load_file

    from lm2cli.checkpoint import load_for_inference

    model, _, recipe = load_for_inference(tmp_path / "r")
    assert recipe.model.d_model == 32 and recipe.model.tie_embeddings is False  # shapes from config.json
    hf_w = load_file(str(hf / "model.safetensors"))  # lr 1e-9: the trained weights are still HF's
    assert torch.allclose(model.tok_emb.weight, hf_w["model.embed_tokens.weight"], atol=1e-6)
    assert torch.allclose(model.blocks[1].ffn.w_down.weight, hf_w["model.layers.1.mlp.down_proj.weight"], atol=1e-6)


def test_hf_directory_without_sentencepiece_tokenizer(cli, tiny_data, tmp_path):
    hf = hf_llama_dir(tmp_path / "hf", tiny_data / "tokenizer.model")
    (hf / "tokenizer.model").unlink()
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "r", f"finetune.init_from={hf}", "train.steps=1"))
    assert res.code == 2 and "no tokenizer.model" in res.err


def test_next_stage_starts_from_the_best_checkpoint_not_the_newest(cli, tiny_data, babilong_dir, tmp_path,
                                                                   monkeypatch):
    """Stage 1's validation losses are scripted so that its best checkpoint (step 1) is older than its newest
    (step 2): stage 2 must begin with step 1's weights."""
    from safetensors.torch import load_file

    import lm2cli.training.loop as loop

    real = loop.evaluate
    scripted = {0: 5.0, 1: 1.0, 2: 3.0}
    at_stage_2_start = {}

    def evaluate(s, data):
        result = real(s, data)
        if s.stage == 0:
            return dict(result, val_loss=scripted[s.step], val_ppl=math.exp(scripted[s.step]))
        if s.step == 2 and not at_stage_2_start:  # the validation before stage 2's first step
            at_stage_2_start.update({k: v.detach().clone() for k, v in s.model.state_dict().items()})
        return result

    monkeypatch.setattr(loop, "evaluate", evaluate)
    sets = (f"finetune.data={babilong_dir}", "finetune.stages=[1, 2]", "train.steps=2", "train.eval_every=1",
            "train.save_every=1")
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "r", *sets))
    assert res.code == 0, res.err
    root = tmp_path / "r/checkpoints"
    assert layout.read_pointer(root, "best_stage_1") == "step_00000001"
    assert f"starting from {root / 'step_00000001'}" in res.out
    best, newest = (load_file(str(root / n / "model.safetensors")) for n in ("step_00000001", "step_00000002"))
    assert at_stage_2_start and all(torch.equal(at_stage_2_start[k], best[k]) for k in best)
    assert any(not torch.equal(best[k], newest[k]) for k in best)  # the two candidates really differ


def test_init_from_says_which_checkpoint_of_a_run_it_takes(cli, tiny_data, babilong_dir, tmp_path):
    """A run directory gives its best checkpoint (by validation loss), and the log says so; a checkpoint directory
    is taken as named; finetune.init_checkpoint = "latest" takes the run's newest."""
    pre = tmp_path / "pre"
    assert cli("pretrain", *finetune_args(tiny_data, pre, "train.steps=4")).code == 0
    root = pre / "checkpoints"
    best = layout.read_pointer(root, "best")
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "a", f"finetune.init_from={pre}",
                                         f"finetune.data={babilong_dir}", "train.steps=1"))
    assert res.code == 0, res.err
    assert f"starting from {root / best} (the run's best by validation loss;" in res.out
    named = root / "step_00000004"
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "b", f"finetune.init_from={named}",
                                         f"finetune.data={babilong_dir}", "train.steps=1"))
    assert res.code == 0, res.err
    assert f"starting from {named}, weights only" in res.out
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "c", f"finetune.init_from={pre}",
                                         "finetune.init_checkpoint=latest", f"finetune.data={babilong_dir}",
                                         "train.steps=1"))
    assert res.code == 0, res.err
    assert f'starting from {named} (the run\'s newest: finetune.init_checkpoint = "latest")' in res.out


def test_init_from_a_checkpoint_of_another_shape_is_one_error(cli, tiny_data, babilong_dir, tmp_path):
    pre = tmp_path / "pre"
    assert cli("pretrain", *finetune_args(tiny_data, pre, "train.steps=1")).code == 0
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "ft", f"finetune.init_from={pre}",
                                         f"finetune.data={babilong_dir}", "model.d_model=64", "train.steps=1"))
    assert res.code == 2 and "Traceback" not in res.err
    error = [line for line in res.err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "model.d_model = 32 in the checkpoint, 64 now" in error[0]  # names the key
    assert not (tmp_path / "ft/checkpoints").exists()


def test_jsonl_rows_longer_than_seq_len_are_left_out_and_counted(cli, tiny_data, tmp_path):
    rows = qa_rows(2, 30, seed=8)
    short = [{"prompt": f"{r['input']} {r['question']}", "response": r["target"]} for r in rows]
    long = [{"prompt": " ".join(r["input"] for r in rows[:12]), "response": "kitchen"} for _ in range(4)]
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in short[:20] + long))
    val.write_text("".join(json.dumps(r) + "\n" for r in short[20:]))
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "r", "finetune.format=jsonl", f"finetune.data={data}",
                                         f"finetune.val_data={val}", "train.steps=1"))
    assert res.code == 0, res.err
    assert "20 training rows of at most 65 tokens (4 longer rows left out)" in res.out


def test_replayed_rows_join_the_training_rows_and_never_validate(tok, babilong_dir, tmp_path):
    from lm2cli.recipe import load_recipe
    from lm2cli.training.finetune import split_examples

    replay = tmp_path / "replay"
    (replay / "qa1").mkdir(parents=True)
    (replay / "qa1" / "0k.json").write_text(json.dumps(qa_rows(1, 5, seed=99)))
    for val_data in ("", str(babilong_dir)):  # validation held out of finetune.data, or its own set
        sets = [f"finetune.data={json.dumps(str(babilong_dir))}", f"finetune.val_data={json.dumps(val_data)}"]
        recipe = load_recipe(TINY, sets)
        train0, val0, _ = split_examples(recipe, tok)
        recipe = load_recipe(TINY, [*sets, f"finetune.replay_data={json.dumps(str(replay))}"])
        train, val, note = split_examples(recipe, tok)
        replayed = [babilong_example(tok, r).prompt for r in json.loads((replay / "qa1/0k.json").read_text())]
        assert [e.prompt for e in train] == [e.prompt for e in train0] + replayed
        assert [e.prompt for e in val] == [e.prompt for e in val0]
        assert {e.group for e in train[len(train0):]} == {"0k"}  # a replayed row is scored under its length
        assert "of them 5 replayed from" in note


def test_replay_data_that_is_missing_is_one_error_naming_the_key(cli, tiny_data, babilong_dir, tmp_path):
    res = cli("finetune", *finetune_args(tiny_data, tmp_path / "r", f"finetune.data={babilong_dir}",
                                         f"finetune.replay_data={tmp_path / 'nowhere'}", "train.steps=1"))
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    assert "finetune.replay_data" in res.err and "nowhere" in res.err and "Traceback" not in res.err
