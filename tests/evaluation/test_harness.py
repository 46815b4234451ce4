"""The lm-evaluation-harness bridge, offline, with a local task file and a small local dataset."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from lm2cli.evaluation.harness import Lm2LM, cut_at_stop  # noqa: E402
from lm2cli.evaluation.multiple_choice import encode_pair  # noqa: E402

from .conftest import tiny_model, write_checkpoint  # noqa: E402


def req(kind: str, *args) -> Instance:
    return Instance(kind, {}, tuple(args), 0)


def full_logprob(model, ids: list[int], start: int) -> float:
    """log P(ids[start:] | ids[:start]) from one plain forward pass."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), None)
    logp = torch.log_softmax(logits[0, start - 1:-1], dim=-1)
    return float(logp.gather(1, torch.tensor(ids[start:])[:, None]).sum())


def test_requests_match_plain_forward_passes(tokenizer):
    model, recipe = tiny_model(tokenizer, "attention.window=24")
    lm = Lm2LM(model=model, tokenizer=tokenizer, recipe=recipe, device="cpu", batch_size=3)
    pairs = [("Mary went to the garden. Where is Mary?", " garden"), ("Mary went to the garden. Where is Mary?",
             " kitchen"), ("", "John"), ("Sandra went to the office.", " Where is Sandra? office")]
    got = lm.loglikelihood([req("loglikelihood", c, k) for c, k in pairs])
    for (context, cont), (logprob, _greedy) in zip(pairs, got, strict=True):
        ctx, cont_ids = encode_pair(tokenizer, context, cont)
        assert logprob == pytest.approx(full_logprob(model, ctx + cont_ids, len(ctx)), abs=1e-4)
    text = "Daniel went to the hallway. " * 12
    (rolling,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    assert rolling == pytest.approx(full_logprob(model, ids, 1), abs=1e-3)
    outs = lm.generate_until([req("generate_until", "Where is Mary?", {"until": ["\n"], "max_gen_toks": 6}),
                              req("generate_until", "John went", {"until": "zzz", "max_gen_toks": 4})])
    assert len(outs) == 2 and all(isinstance(o, str) and "\n" not in o for o in outs)
    assert cut_at_stop("kitchen\nQuestion: x", ["Question", "\n"]) == "kitchen"


def test_full_attention_rolling_windows_cover_long_texts(tokenizer):
    model, recipe = tiny_model(tokenizer, "model.max_seq_len=64")
    lm = Lm2LM(model=model, tokenizer=tokenizer, recipe=recipe, device="cpu")
    (value,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", "Bill went to the park. " * 30)])
    assert value < 0 and lm.max_length == 64


def test_lm2_eval_runs_a_local_task_offline(cli, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"{p} went to the {r}. Where is {p}?",
                                          "choices": ["kitchen", "garden"], "answer": int(r == "garden")})
                              for p, r in [("Mary", "kitchen"), ("John", "garden"), ("Sandra", "garden")]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(f"""task: lm2_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    run = write_checkpoint(tmp_path / "run", tokenizer, "attention.window=24")
    out = tmp_path / "res"
    r = cli("eval", run, "--set", 'eval.run=["harness"]', "--set", 'eval.harness_tasks=["lm2_toy"]',
            "--set", f"eval.harness_include={tasks}", "--out", out)
    assert r.code == 0, r.err
    harness = json.loads((out / "results.json").read_text())["harness"]
    (acc,) = [x for x in harness["results"] if x["metric"] == "acc"]
    assert acc["task"] == "lm2_toy" and acc["value"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "lm2_toy" in r.out


def test_dtype_reaches_the_runner_and_a_bad_one_is_refused(tokenizer):
    from lm2cli.errors import Lm2Error

    model, recipe = tiny_model(tokenizer, "attention.window=24")
    assert Lm2LM(model=model, tokenizer=tokenizer, recipe=recipe, device="cpu").runner.autocast_dtype is None
    lm = Lm2LM(model=model, tokenizer=tokenizer, recipe=recipe, device="cpu", dtype="bf16")
    assert lm.runner.autocast_dtype is torch.bfloat16
    with pytest.raises(Lm2Error, match="dtype = 'fp16'"):
        Lm2LM(model=model, tokenizer=tokenizer, recipe=recipe, device="cpu", dtype="fp16")
